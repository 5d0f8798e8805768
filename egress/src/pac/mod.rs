//! # Proxy auto-config (PAC) and WPAD
//!
//! Corporate networks often publish which proxy to use as a PAC file: a JavaScript function
//! `FindProxyForURL(url, host)` returning e.g. `"PROXY proxy1.corp:3128; PROXY proxy2.corp:3128;
//! DIRECT"`, found at a configured URL or by WPAD (`http://wpad.<search domain>/wpad.dat`). The
//! agent asks the PAC which way leads to the gateway; this module turns the answer into an ordered
//! failover list of [`Proxy`] values.
//!
//! | item | what |
//! |---|---|
//! | [`parse_result`] | `PROXY a:3128; SOCKS5 b:1080; DIRECT` → `[Http, Socks5, Direct]` |
//! | [`Pac`] | a compiled script: [`Pac::new`], then [`Pac::find_proxy`] (blocking, sandboxed) |
//! | [`PacLimits`] | memory, time and size bounds of the sandbox |
//! | [`PacEnv`], [`SystemEnv`] | what the DNS/clock helpers see (injectable for tests) |
//! | [`fetch`] | download a PAC from `http://…`, `file://…` or a path, always directly |
//! | [`wpad_urls`], [`dns_suffixes`] | the WPAD candidates for this machine's DNS search domains |
//!
//! ## The sandbox
//!
//! A PAC file comes from the network (WPAD can be answered by anyone on the LAN), so it is run as
//! untrusted code, in QuickJS (`rquickjs`):
//!
//! * **A fresh engine per evaluation.** Every [`Pac::find_proxy`] (and the check in [`Pac::new`])
//!   creates its own QuickJS runtime and context, loads the helpers and the script, calls the
//!   function and drops everything. Nothing survives between calls (no state a script could
//!   poison, no leak growth), [`Pac`] is `Send + Sync` and cheap to clone, and one runaway call
//!   cannot disturb the next. The cost is starting the engine and parsing the helpers and the
//!   script each time: under a millisecond for a typical corporate PAC in a debug build, most
//!   of it the fixed start-up (the `pac_realistic_pac_is_fast` test prints both), and the agent
//!   asks once per connection attempt.
//! * **Limits** ([`PacLimits`]): memory (QuickJS's allocator limit, default 16 MiB), time (default
//!   2 s per evaluation, *including* engine start and script load: an interrupt handler checks a
//!   deadline, and the DNS helpers only wait for what is left of it), script size (1 MiB) and
//!   result size (8 KiB, at most 32 entries).
//! * **A watchdog.** Some work cannot be interrupted by QuickJS (a pathological regular
//!   expression in the script, for instance). Each evaluation therefore runs on its own thread;
//!   if it has not answered shortly after the time limit the caller gets the timeout error anyway
//!   and the thread is abandoned. At most [`MAX_ABANDONED`] abandoned evaluations may be alive
//!   at once; beyond that, new evaluations are refused rather than piling up threads.
//! * **Clean teardown.** QuickJS asserts (aborting the process) that a freed runtime holds no
//!   objects. Promise jobs left pending by a script (`import()`, `.then`, `async`) are freed
//!   with the runtime only when the `Promise` intrinsic is present, so the sandbox has it,
//!   although PAC scripts have no use for it; `pac_exotic_javascript_neither_crashes_nor_leaks`
//!   keeps this honest.
//! * **No I/O** beyond the standard helpers: no `std`/`os` modules, no module loader, no
//!   typed arrays or `Proxy`. Only the DNS helpers, `myIpAddress` and the clock reach outside,
//!   through [`PacEnv`].
//!
//! ## The helpers
//!
//! The Netscape set (`isPlainHostName`, `dnsDomainIs`, `localHostOrDomainIs`, `isResolvable`,
//! `isInNet`, `dnsResolve`, `convert_addr`, `myIpAddress`, `dnsDomainLevels`, `shExpMatch`,
//! `weekdayRange`, `dateRange`, `timeRange`, `alert`) and Microsoft's IPv6 extensions
//! (`isResolvableEx`, `isInNetEx`, `dnsResolveEx`, `myIpAddressEx`, `sortIpAddressList`,
//! `getClientVersion`; `FindProxyForURLEx` is preferred when the script defines it). The pure
//! ones are JavaScript (`helpers.js`, written after the behaviour of Mozilla's and Chromium's
//! `pac_utils.js`); the others are Rust. Differences from the browsers, all deliberate:
//!
//! * `shExpMatch` is a glob match in Rust (`*` any run, `?` one character, everything else
//!   literal, whole string), not a regular expression built from the pattern: same answers, but
//!   no regex metacharacter surprises and no backtracking blow-up on many `*`.
//! * `timeRange(h1, h2)` and `dateRange` ranges wrap around (`timeRange(22, 6)` is the night)
//!   where Mozilla's code returns false; argument lists the specification does not define give
//!   false instead of throwing.
//! * Date and time helpers read [`PacEnv::now`]; local time is QuickJS's (the OS time zone)
//!   unless [`PacEnv::utc_offset_minutes`] says otherwise; a trailing `"GMT"` argument means UTC.
//! * `alert` logs at INFO (at most 32 messages of 1 KiB per evaluation).
//!
//! The host given to `FindProxyForURL` is lower-cased, and the URL trimmed as Chromium does:
//! never credentials or a `#fragment`, and for `https://` and `wss://` only
//! `scheme://host[:port]/`, so a PAC from the network learns nothing of encrypted requests
//! beyond their destination (it could leak paths through DNS lookups). A script may make at most
//! 32 distinct DNS lookups per evaluation; further names do not resolve.
//!
//! ## Results
//!
//! See [`parse_result`]: `DIRECT`; `PROXY h[:p]` and `HTTP h[:p]` (HTTP proxy, default port
//! 80 as in browsers); `SOCKS5 h[:p]` and `SOCKS h[:p]` (SOCKS5 with the proxy resolving names,
//! default port 1080). SOCKS4 is not implemented: `SOCKS` is treated as SOCKS5, as curl does
//! with libproxy's `socks://`, which nearly every SOCKS server today speaks; one that only speaks
//! SOCKS4 fails the handshake and the next entry is tried. `HTTPS h:p` (TLS to the proxy),
//! `SOCKS4`, `QUIC` and unknown entries are skipped with a warning.
//!
//! ## WPAD
//!
//! [`wpad_urls`] lists `http://wpad.<domain>/wpad.dat` for the search domain and its parents,
//! never above the organisation's registrable domain (no `wpad.com`, `wpad.co.uk`: whoever
//! registers those would proxy every machine that walks up to them). [`dns_suffixes`] reads the
//! search domains from `/etc/resolv.conf` (empty on Windows for now).

mod engine;
mod fetch;
mod result;
mod wpad;

pub use engine::MAX_ABANDONED;
pub use fetch::{fetch, FetchProblem, MAX_PAC_SIZE};
pub use result::{format_result, parse_result, MAX_RESULT_ENTRIES, MAX_RESULT_LEN};
pub use wpad::{dns_suffixes, parse_resolv_conf, wpad_urls};

use crate::proxy::Proxy;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs, UdpSocket};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

/// Why a PAC could not be used. The messages name the PAC and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum PacError {
    /// A PAC result string (from [`parse_result`]) that gives no usable way out.
    #[error("PAC result `{result}`: {problem}")]
    Result {
        /// The result, shortened for the message.
        result: String,
        problem: ResultProblem,
    },
    /// The script could not be loaded or run, or its answer was unusable.
    #[error("PAC at {pac}: {problem}")]
    Script { pac: String, problem: ScriptProblem },
    /// The PAC file could not be downloaded or read.
    #[error("PAC at {pac}: {problem}")]
    Fetch { pac: String, problem: FetchProblem },
}

/// What is wrong with a PAC result string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResultProblem {
    #[error("is {0} bytes, longer than the 8 KiB a PAC result may be")]
    TooLong(usize),
    #[error("no usable entry (expected `DIRECT`, `PROXY host:port` or `SOCKS5 host:port`, separated by `;`; HTTPS and SOCKS4 proxies are not supported)")]
    NoUsableEntry,
}

/// What went wrong loading or running a PAC script.
#[derive(Debug, thiserror::Error)]
pub enum ScriptProblem {
    #[error("the script is {size} bytes, more than the {} limit", size_text(*.limit))]
    TooLarge { size: usize, limit: usize },
    #[error("the script does not load: {0}")]
    Load(String),
    #[error("the script defines no function FindProxyForURL (is this really a PAC file?)")]
    NoEntryPoint,
    #[error("{function} threw: {message}")]
    Threw {
        function: &'static str,
        message: String,
    },
    #[error("{function} returned {got}, not a string")]
    NotString { function: &'static str, got: String },
    #[error("{function} returned `{result}`: {problem}")]
    Result {
        function: &'static str,
        result: String,
        problem: ResultProblem,
    },
    #[error("timed out after {0:?} (an endless loop in the script, or DNS lookups that hang?)")]
    Timeout(Duration),
    #[error("ran out of memory (the limit is {})", size_text(*.0))]
    OutOfMemory(usize),
    #[error("{0} earlier evaluations are still stuck; not starting another (fix the PAC, then restart the agent)")]
    TooManyStuck(usize),
    #[error("JavaScript engine failure: {0}")]
    Engine(String),
}

/// "1 MiB", "16 MiB", "1500 bytes".
pub(crate) fn size_text(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes & ((1 << 20) - 1) == 0 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes & ((1 << 10) - 1) == 0 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

/// `s` cut to about `max` bytes (on a character boundary) with `…` when cut; for messages.
pub(crate) fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Bounds of the PAC sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacLimits {
    /// Memory the JavaScript engine may allocate (default 16 MiB).
    pub memory: usize,
    /// Wall-clock time per evaluation, engine start and script load included (default 2 s).
    pub time: Duration,
    /// Largest script accepted (default 1 MiB).
    pub script_size: usize,
}

impl Default for PacLimits {
    fn default() -> Self {
        PacLimits {
            memory: 16 << 20,
            time: Duration::from_secs(2),
            script_size: MAX_PAC_SIZE,
        }
    }
}

/// What the PAC helpers see of the machine: DNS, its own addresses, the clock. [`SystemEnv`] is
/// the real one; tests inject their own so they are deterministic and touch no network.
pub trait PacEnv: Send + Sync + 'static {
    /// The addresses of `host` in the resolver's order; empty when it does not resolve. Must
    /// return within `timeout` (what is left of the evaluation's time limit).
    fn resolve(&self, host: &str, timeout: Duration) -> Vec<IpAddr>;
    /// This machine's addresses, the one used to reach the Internet first. Empty means unknown
    /// (`myIpAddress` then answers `127.0.0.1`).
    fn local_addresses(&self) -> Vec<IpAddr>;
    /// The current time, for `weekdayRange`, `dateRange` and `timeRange`.
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
    /// Local time's offset from UTC in minutes east (60 for CET). `None`: the OS's time zone, as
    /// QuickJS's `Date` sees it.
    fn utc_offset_minutes(&self) -> Option<i32> {
        None
    }
}

/// The real machine: the system resolver (`getaddrinfo` through std, on a helper thread so it
/// can be abandoned at the deadline), the local address the route to the Internet uses, the
/// system clock and time zone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemEnv;

impl PacEnv for SystemEnv {
    fn resolve(&self, host: &str, timeout: Duration) -> Vec<IpAddr> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return vec![ip];
        }
        // getaddrinfo has no timeout: ask on a helper thread and stop waiting at the deadline
        // (the thread finishes on its own; its answer is dropped).
        if host.is_empty() || host.len() > 253 || host.contains('\0') || timeout.is_zero() {
            return Vec::new();
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let name = host.to_string();
        let spawned = std::thread::Builder::new()
            .name("pac-dns".into())
            .spawn(move || {
                let addrs: Vec<IpAddr> = (name.as_str(), 0)
                    .to_socket_addrs()
                    .map(|it| it.map(|a| a.ip()).collect())
                    .unwrap_or_default();
                let _ = tx.send(addrs);
            });
        if spawned.is_err() {
            return Vec::new();
        }
        let mut addrs = rx.recv_timeout(timeout).unwrap_or_default();
        let mut seen = Vec::with_capacity(addrs.len());
        addrs.retain(|a| {
            let new = !seen.contains(a);
            seen.push(*a);
            new
        });
        addrs
    }

    fn local_addresses(&self) -> Vec<IpAddr> {
        // The address the kernel would use toward a public address (Google's DNS, as Chromium
        // does): connecting a UDP socket only picks a route, no packet is sent.
        let probe = |bind: IpAddr, to: IpAddr| -> Option<IpAddr> {
            let s = UdpSocket::bind((bind, 0)).ok()?;
            s.connect((to, 53)).ok()?;
            let ip = s.local_addr().ok()?.ip();
            (!ip.is_unspecified()).then_some(ip)
        };
        [
            probe(
                Ipv4Addr::UNSPECIFIED.into(),
                Ipv4Addr::new(8, 8, 8, 8).into(),
            ),
            probe(
                Ipv6Addr::UNSPECIFIED.into(),
                Ipv6Addr::new(0x2001, 0x4860, 0x4860, 0, 0, 0, 0, 0x8888).into(),
            ),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// A PAC script, checked and ready to answer. Cheap to clone; `Send + Sync`.
///
/// Each [`find_proxy`](Pac::find_proxy) runs the script afresh in its own sandbox (see the module
/// documentation) and blocks for up to [`PacLimits::time`]: call it from `spawn_blocking`.
#[derive(Clone)]
pub struct Pac {
    inner: Arc<engine::Script>,
}

impl fmt::Debug for Pac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pac")
            .field("source", &self.inner.name)
            .field("bytes", &self.inner.source.len())
            .field("limits", &self.inner.limits)
            .finish()
    }
}

impl Pac {
    /// Compiles `script` (named `source_name` in messages, e.g. its URL) against the real
    /// machine ([`SystemEnv`]). The script is loaded once in the sandbox to check that it
    /// parses, runs its top-level code within the limits and defines `FindProxyForURL`.
    pub fn new(source_name: &str, script: &str, limits: PacLimits) -> Result<Pac, PacError> {
        Pac::with_env(source_name, script, limits, Arc::new(SystemEnv))
    }

    /// As [`Pac::new`], with the helpers' view of DNS, addresses and time given by `env`.
    pub fn with_env(
        source_name: &str,
        script: &str,
        limits: PacLimits,
        env: Arc<dyn PacEnv>,
    ) -> Result<Pac, PacError> {
        let pac = crate::proxy::redact(source_name);
        let fail = |problem| PacError::Script {
            pac: pac.clone(),
            problem,
        };
        if script.len() > limits.script_size {
            return Err(fail(ScriptProblem::TooLarge {
                size: script.len(),
                limit: limits.script_size,
            }));
        }
        let inner = Arc::new(engine::Script {
            name: pac.clone(),
            source: script.to_string(),
            limits,
            env,
        });
        engine::run(&inner, None).map_err(fail)?;
        Ok(Pac { inner })
    }

    /// Where the script came from, as given to [`Pac::new`] (credentials hidden).
    pub fn source_name(&self) -> &str {
        &self.inner.name
    }

    /// Asks the script how to reach `url` (whose host is `host`): the ordered failover list.
    /// Blocking, for up to the time limit.
    pub fn find_proxy(&self, url: &str, host: &str) -> Result<Vec<Proxy>, PacError> {
        let fail = |problem| PacError::Script {
            pac: self.inner.name.clone(),
            problem,
        };
        let host = host.to_ascii_lowercase();
        let (function, answer) =
            engine::run(&self.inner, Some((url_for_script(url), host))).map_err(fail)?;
        let answer = answer.unwrap_or_default();
        match parse_result(&answer) {
            Ok(list) => {
                tracing::debug!(pac = %self.inner.name, url, result = %shorten(&answer, 200), "PAC answered");
                Ok(list)
            }
            Err(PacError::Result { result, problem }) => Err(fail(ScriptProblem::Result {
                function,
                result,
                problem,
            })),
            Err(other) => Err(other),
        }
    }
}

/// What a script sees of `url`: without credentials and fragment; for `https://` and `wss://`,
/// only `scheme://host[:port]/` (as Chromium does).
fn url_for_script(url: &str) -> String {
    let url = url.split('#').next().unwrap_or("");
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let secure = scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("wss");
    let path = if secure || path.is_empty() { "/" } else { path };
    format!("{scheme}://{authority}{path}")
}

#[cfg(test)]
mod tests;
