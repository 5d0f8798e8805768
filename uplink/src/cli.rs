//! What both binaries do before and after their command: parse the command line (a usage
//! error exits 64 like any other bad input; `--help` and `--version` exit 0), start logging,
//! build the runtime, turn Ctrl-C and SIGTERM into a shutdown, and map an error to its exit
//! code (64 bad configuration, 1 anything else).

use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Exit code of a configuration or usage error (BSD `EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// Parses the command line; on a usage error, prints clap's message and says the exit code.
pub fn parse<C: clap::Parser>() -> Result<C, ExitCode> {
    C::try_parse().map_err(|e| {
        let code = if e.use_stderr() { EXIT_CONFIG } else { 0 };
        let _ = e.print();
        ExitCode::from(code)
    })
}

/// Starts logging with `filter` (RUST_LOG syntax); `quiet` commands (those that talk on
/// stdout) log only warnings unless a filter other than the default `info` was asked for.
pub fn logging(filter: &str, quiet: bool) {
    let quiet_default = quiet && filter == "info";
    egress::logging::init(if quiet_default { "warn" } else { filter });
}

/// Prints `program: error: …` (with its causes, each said once) and gives the exit code: 64
/// when `bad_config`, else 1.
pub fn fail(program: &str, e: &(dyn std::error::Error + 'static), bad_config: bool) -> ExitCode {
    eprintln!("{program}: error: {}", crate::error::one_line(e));
    ExitCode::from(if bad_config { EXIT_CONFIG } else { 1 })
}

/// How many tasks a worker runs between two looks at the sockets (tokio's default is 61). A
/// relay under a bulk transfer always has a task ready, so its sockets are polled only every
/// this many tasks: at 61 a keystroke's echo waited 14-18 ms median behind a download through
/// the same session, at 8 about 10 ms, for the same throughput and CPU (docs/benchmarks.md).
pub const EVENT_INTERVAL: u32 = 8;

/// The runtime with `threads` workers (default: [`default_threads`]): tokio's single-threaded
/// scheduler for one (no work-stealing bookkeeping, no cross-thread wake-ups: 4-8 % off a new
/// connection's time through the chain), the multi-threaded one for more.
pub fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let n = threads.unwrap_or_else(|| {
        default_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
    });
    let mut b = if n <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(n.min(256));
        b
    };
    b.event_interval(EVENT_INTERVAL).enable_all().build()
}

/// Keeps freed memory for reuse instead of handing it back to the kernel at once (every role
/// calls it first thing). With glibc's defaults (the top of the heap trimmed as soon as 128 KiB
/// sit free there, large blocks mapped on their own above a threshold that moves) the DMZ
/// faulted in 35,000-55,000 fresh pages per GB relayed, each zeroed by the kernel (4 % of its
/// CPU in the profile); with blocks below 4 MiB taken from the heap and up to 16 MiB of it kept
/// free, 2,200 (`bench/run.sh` prints page faults per GB by process). The desktop agent kept
/// glibc's defaults until a sending end that waits for its stream (instead of reading ahead
/// into the bytes it retains) freed and refaulted its read buffers: page faults were then 10 %
/// of its CPU per byte. It calls [`give_back_freed_memory`] once it goes quiet, so its idle
/// memory stays what it was.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets two of the allocator's parameters; called before any thread
    // starts, as glibc asks.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

/// Hands the free memory the allocator keeps (see [`keep_freed_memory`]) back to the kernel:
/// for a process that went quiet after a transfer.
pub fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; it takes the allocator's
    // locks like any allocation.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The gateway roles' worker threads on a host with `cores` cores: half of them, at least one.
/// The kernel's TCP work for the bytes a worker relays (copies, the loopback or NIC path,
/// softirqs) is 45-60 % of the CPU per byte in the profiles (docs/benchmarks.md), and it runs on
/// the same cores: with one worker per core on two cores, the chain moved 0.83x (0.78-1.07 per
/// round) what one worker did, with 1.29x the CPU per GB.
pub fn default_threads(cores: usize) -> usize {
    (cores / 2).max(1)
}

/// Cancels `token` on Ctrl-C or SIGTERM (call inside the runtime).
pub fn shutdown_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        token.cancel();
    });
}

#[cfg(test)]
mod tests {
    /// One worker per core lost to one worker on two cores (the kernel's TCP work needs the
    /// other core): the default is half the cores, never zero.
    #[test]
    fn the_gateway_default_leaves_half_the_cores_to_the_kernel() {
        let d: Vec<usize> = [1, 2, 3, 4, 16].map(super::default_threads).to_vec();
        assert_eq!(d, vec![1, 1, 1, 2, 8]);
    }
}
