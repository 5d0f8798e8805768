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

/// How often a process looks whether it went quiet ([`give_back_when_quiet`]).
pub const QUIET_CHECK: std::time::Duration = std::time::Duration::from_secs(15);

/// What the desktop agent counts as a transfer: 1 MiB arrived in a [`QUIET_CHECK`] (a
/// session's pings are a few dozen bytes every 20 s).
pub const AGENT_TRANSFER: u64 = 1 << 20;

/// What a gateway role counts as a transfer: 16 MiB arrived in a [`QUIET_CHECK`]. The pings of
/// its idle sessions move [`tunnel::splice::activity`] by about 30 bytes per session per check,
/// 1.5 MB for 50,000 desktops: still quiet.
pub const GATEWAY_TRANSFER: u64 = 16 << 20;

/// Quiet checks at least between two gives back (5 minutes): a peer that alternates 16 MiB
/// bursts with quiet checks cannot make a DMZ walk its heap more often.
pub const CHECKS_BETWEEN_GIVES: u32 = 20;

/// The rule of [`give_back_when_quiet`], without a clock: fed [`tunnel::splice::activity`] at
/// each [`QUIET_CHECK`], it says to give freed memory back at the first quiet check (less than
/// `transfer` bytes arrived since the one before) after a busy one (at least `transfer`), at
/// most once in [`CHECKS_BETWEEN_GIVES`] checks (a give-back due sooner waits, and is not
/// lost). Pings never make a check busy, however long they go on: a DMZ with 50,000 idle
/// desktops does not walk its heap again and again for them (a walk took 2.9-3.4 ms at 2,000
/// sessions after a burst; at 50,000, an estimate by size, tens of ms, during which the
/// worker's allocations that glibc's per-thread cache cannot serve wait).
#[derive(Debug)]
pub struct QuietCheck {
    transfer: u64,
    last: u64,
    busy: bool,
    since_give: u32,
}

impl QuietCheck {
    /// `transfer`: bytes per check that make it busy; `now`: the count at the start.
    pub fn new(transfer: u64, now: u64) -> QuietCheck {
        QuietCheck {
            transfer,
            last: now,
            busy: false,
            since_give: CHECKS_BETWEEN_GIVES,
        }
    }

    /// A check with the count at `now`: whether to give freed memory back.
    pub fn check(&mut self, now: u64) -> bool {
        let arrived = now.wrapping_sub(self.last);
        self.last = now;
        self.since_give = self.since_give.saturating_add(1);
        if arrived >= self.transfer {
            self.busy = true;
            return false;
        }
        if self.busy && self.since_give >= CHECKS_BETWEEN_GIVES {
            self.busy = false;
            self.since_give = 0;
            return true;
        }
        false
    }
}

/// Every role keeps the memory it freed while bytes flow ([`keep_freed_memory`]: no page
/// faults per read buffer); once quiet after a transfer ([`QuietCheck`]), it frees the read
/// buffers kept for reuse ([`tunnel::splice::release_spares`]) and gives the free memory back
/// to the system ([`give_back_freed_memory`]), so an idle process holds little more than
/// before its transfer: a DMZ whose 2,000 desktops each moved 256 KiB, 37 KiB per session
/// against 31 before any transfer, where it kept 45 without this (docs/benchmarks.md, "Idle
/// sessions").
pub async fn give_back_when_quiet(transfer: u64, shutdown: CancellationToken) {
    let mut rule = QuietCheck::new(transfer, tunnel::splice::activity());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(QUIET_CHECK) => {}
        }
        if rule.check(tunnel::splice::activity()) {
            tunnel::splice::release_spares();
            // malloc_trim walks the heap under the allocator's locks: off the runtime's
            // workers, so the tasks that do not allocate meanwhile go on.
            let started = std::time::Instant::now();
            let _ = tokio::task::spawn_blocking(give_back_freed_memory).await;
            tracing::debug!(took = ?started.elapsed(), "quiet after a transfer: freed memory given back");
        }
    }
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

    /// A DMZ with thousands of idle desktops counted their pings as activity (a read buffer
    /// taken per ping) and would never have looked quiet: the count is bytes now, and a
    /// gateway's threshold stays above 50,000 sessions' pings, which never make a check busy
    /// however long they go on (each would walk the heap again).
    #[test]
    fn pings_of_idle_sessions_are_quiet_and_a_transfer_is_given_back_once() {
        use super::{QuietCheck, GATEWAY_TRANSFER as T};
        let pings = 50_000 * 30;
        let mut rule = QuietCheck::new(T, 0);
        let mut count = 0;
        let mut at = |arrived: u64| {
            count += arrived;
            rule.check(count)
        };
        // Idle from the start: nothing to give back, for a day of checks.
        assert!((0..5760).all(|_| !at(pings)));
        // A check that saw a transfer: busy, not now; the next quiet one gives back, once.
        assert!(!at(64 * T));
        assert!(at(pings));
        assert!((0..5760).all(|_| !at(pings)));
        // A transfer spread over checks: given back after its last busy one.
        assert!(!at(T) && !at(2 * T));
        assert!(at(0) && !at(0));
        // Bursts between quiet checks right after: the next give-back waits out the spacing,
        // and is not lost.
        let spaced = super::CHECKS_BETWEEN_GIVES as usize;
        let gives: Vec<bool> = (0..2 * spaced)
            .map(|i| at(if i % 2 == 0 { T } else { 0 }))
            .collect();
        let at_checks: Vec<usize> = (0..gives.len()).filter(|i| gives[*i]).collect();
        assert_eq!(at_checks, vec![spaced - 1, 2 * spaced - 1]);
        // The agent's threshold is lower (its own pings are a few dozen bytes): a 2 MiB
        // download makes its check busy, and a gateway's not.
        let mut agent = QuietCheck::new(super::AGENT_TRANSFER, 0);
        let mut gateway = QuietCheck::new(T, 0);
        assert!(!agent.check(2 << 20) && agent.check(2 << 20));
        assert!(!gateway.check(2 << 20) && !gateway.check(2 << 20));
    }
}
