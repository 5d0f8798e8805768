//! Counters of one gateway process (the DMZ or a connector), written in the Prometheus text
//! format (version 0.0.4) for the admin listener's `/metrics` ([`crate::admin`]).
//!
//! Hand-written rather than through a metrics crate: every label set is fixed at compile time
//! (roles, error codes, authentication failure reasons, egress paths), so the whole registry is
//! a few arrays of atomics. Nothing is allocated per client, per token or per destination, and
//! no label ever carries text from the network: a failed login's token id, a destination or an
//! instance name can never become a time series, so their number is bounded by this file.
//!
//! Besides the counters, [`Metrics`] keeps a small ring of recent refusals for the admin page
//! ([`Metrics::recent_refusals`]); its size is fixed ([`RECENT_REFUSALS`]).

mod udp;
pub use udp::{UdpDrop, UdpMetrics};

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tunnel::ErrorCode;

/// Refusals the admin page shows (the oldest dropped first).
pub const RECENT_REFUSALS: usize = 50;

/// Handshake latency bucket bounds, seconds (connection accepted → session up at the DMZ;
/// dial started → session up at a connector). From 1 ms: on a LAN a handshake takes 2-5 ms.
const BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Number of [`ErrorCode`] values (`to_u8` is 0..=15). Was 15 after `suspended` (15) came:
/// its refusals counted as `cancelled`.
const CODES: usize = 16;

/// A session's role, the `role` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Agent = 0,
    Connector = 1,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Connector => "connector",
        }
    }
    const ALL: [Role; 2] = [Role::Agent, Role::Connector];
}

/// Why a client was not let in: the `reason` label of `sallyport_auth_failures_total`. A fixed
/// set; never the token id or anything else the client wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// Not a token at all (bad syntax, bad id).
    Malformed = 0,
    /// The token id is not in the token file (or was deleted: revoked).
    Unknown = 1,
    /// A v1 secret that does not match, or a v2 key that is not the one on file.
    WrongSecret = 2,
    Expired = 3,
    /// Claims or signature that do not check out (not yet valid, another deployment, issuer).
    InvalidToken = 4,
    /// A v1 token on the v2 handshake or the reverse, or v1 after its cut-off date.
    WrongVersion = 5,
    /// The v2 (or v1 inner) handshake did not complete: not for this gateway's key, a bad
    /// message, silence until the deadline.
    Handshake = 6,
    /// The token's sessions are at their limit.
    SessionLimit = 7,
}

impl AuthFailure {
    const ALL: [AuthFailure; 8] = [
        AuthFailure::Malformed,
        AuthFailure::Unknown,
        AuthFailure::WrongSecret,
        AuthFailure::Expired,
        AuthFailure::InvalidToken,
        AuthFailure::WrongVersion,
        AuthFailure::Handshake,
        AuthFailure::SessionLimit,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Malformed => "malformed",
            AuthFailure::Unknown => "unknown_token",
            AuthFailure::WrongSecret => "wrong_secret",
            AuthFailure::Expired => "expired",
            AuthFailure::InvalidToken => "invalid_token",
            AuthFailure::WrongVersion => "wrong_version",
            AuthFailure::Handshake => "handshake",
            AuthFailure::SessionLimit => "session_limit",
        }
    }

    /// The reason for a refused token file check.
    pub fn of(e: &crate::auth::AuthError) -> AuthFailure {
        use crate::auth::AuthError as E;
        match e {
            E::Malformed { .. } | E::BadId { .. } => AuthFailure::Malformed,
            E::UnknownId { .. } => AuthFailure::Unknown,
            E::WrongSecret { .. } | E::WrongKey { .. } => AuthFailure::WrongSecret,
            E::Expired { .. } => AuthFailure::Expired,
            E::V2Only { .. } | E::V1Only { .. } => AuthFailure::WrongVersion,
            _ => AuthFailure::InvalidToken,
        }
    }
}

/// How a connector reaches the gateway: the `path` label of `sallyport_egress_path`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EgressPath {
    Direct = 0,
    HttpProxy = 1,
    Socks = 2,
    /// A proxy a PAC file (given, or found by WPAD) named.
    Pac = 3,
}

impl EgressPath {
    const ALL: [EgressPath; 4] = [
        EgressPath::Direct,
        EgressPath::HttpProxy,
        EgressPath::Socks,
        EgressPath::Pac,
    ];
    fn as_str(self) -> &'static str {
        match self {
            EgressPath::Direct => "direct",
            EgressPath::HttpProxy => "http-proxy",
            EgressPath::Socks => "socks",
            EgressPath::Pac => "pac",
        }
    }

    /// The path a probe candidate stands for.
    pub fn of(c: &egress::probe::Candidate) -> EgressPath {
        use egress::probe::Origin;
        if c.origin != Origin::Named || c.source.starts_with("PAC") {
            return EgressPath::Pac;
        }
        match c.proxy {
            egress::Proxy::Direct => EgressPath::Direct,
            egress::Proxy::Http { .. } => EgressPath::HttpProxy,
            egress::Proxy::Socks5 { .. } => EgressPath::Socks,
        }
    }
}

/// One refusal for the admin page. `what` is already cleaned (see [`crate::logsafe`]) by the
/// caller and is shown HTML-escaped; it is never a metric label.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub at: SystemTime,
    pub code: ErrorCode,
    /// Who asked (a token id the DMZ authenticated), where to, and why.
    pub who: String,
    pub dest: String,
    pub reason: String,
}

/// Every counter of one process; shared as `Arc<Metrics>`.
pub struct Metrics {
    sessions: [AtomicI64; 2],
    sessions_total: [AtomicU64; 2],
    streams_open: AtomicI64,
    streams_total: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    refusals: [AtomicU64; CODES],
    auth_failures: [[AtomicU64; 8]; 2],
    handshake_buckets: [AtomicU64; BUCKETS.len()],
    handshake_count: AtomicU64,
    handshake_sum_micros: AtomicU64,
    egress: [AtomicI64; 4],
    resumes: AtomicU64,
    /// Streams that wait on a young DMZ instance for their connector to attach.
    waiting: AtomicI64,
    /// The signed revocation list in force: when it was signed (Unix seconds; 0: no list).
    revocation_signed_at: AtomicU64,
    recent: Mutex<VecDeque<Refusal>>,
    /// Datagrams (SOCKS5 UDP).
    pub udp: UdpMetrics,
    /// Which families are written: the DMZ has no egress path, a connector no auth failures.
    dmz: bool,
}

impl Metrics {
    /// The DMZ's registry.
    pub fn dmz() -> Metrics {
        Metrics::new(true)
    }

    /// A connector's registry.
    pub fn connector() -> Metrics {
        Metrics::new(false)
    }

    fn new(dmz: bool) -> Metrics {
        Metrics {
            sessions: Default::default(),
            sessions_total: Default::default(),
            streams_open: AtomicI64::new(0),
            streams_total: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            refusals: Default::default(),
            auth_failures: Default::default(),
            handshake_buckets: Default::default(),
            handshake_count: AtomicU64::new(0),
            handshake_sum_micros: AtomicU64::new(0),
            egress: Default::default(),
            resumes: AtomicU64::new(0),
            waiting: AtomicI64::new(0),
            revocation_signed_at: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_REFUSALS)),
            udp: UdpMetrics::default(),
            dmz,
        }
    }

    /// A session came up (after `took` of handshake); counted until the guard drops.
    pub fn session_up(&self, role: Role, took: Duration) -> Gauge<'_> {
        self.sessions_total[role as usize].fetch_add(1, Relaxed);
        self.handshake(took);
        Gauge::new(&self.sessions[role as usize])
    }

    fn handshake(&self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.handshake_buckets[i].fetch_add(1, Relaxed);
        }
        self.handshake_count.fetch_add(1, Relaxed);
        self.handshake_sum_micros
            .fetch_add(took.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// A stream was opened; counted as open until the guard drops.
    pub fn stream_open(&self) -> Gauge<'_> {
        self.streams_total.fetch_add(1, Relaxed);
        Gauge::new(&self.streams_open)
    }

    /// Bytes a stream carried: `up` from the agent towards the service, `down` back.
    pub fn bytes(&self, up: u64, down: u64) {
        self.bytes_up.fetch_add(up, Relaxed);
        self.bytes_down.fetch_add(down, Relaxed);
    }

    /// A stream open was refused with `code`; `who`, `dest`, `reason` (clean text) go to the
    /// admin page's ring only.
    pub fn refused(&self, code: ErrorCode, who: &str, dest: &str, reason: &str) {
        self.refusals[code.to_u8() as usize % CODES].fetch_add(1, Relaxed);
        let cut = |s: &str| s.chars().take(200).collect::<String>();
        let mut ring = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() >= RECENT_REFUSALS {
            ring.pop_front();
        }
        ring.push_back(Refusal {
            at: SystemTime::now(),
            code,
            who: cut(who),
            dest: cut(dest),
            reason: cut(reason),
        });
    }

    /// The recent refusals, newest first.
    pub fn recent_refusals(&self) -> Vec<Refusal> {
        let ring = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().rev().cloned().collect()
    }

    /// A client of `role` was not let in, for `why`.
    pub fn auth_failed(&self, role: Role, why: AuthFailure) {
        self.auth_failures[role as usize][why as usize].fetch_add(1, Relaxed);
    }

    /// A connector session runs over `path`; counted until the guard drops.
    pub fn egress_path(&self, path: EgressPath) -> Gauge<'_> {
        Gauge::new(&self.egress[path as usize])
    }

    /// The DMZ passed a resume on and the connector holding the stream took it: a stream
    /// survived a lost session on a new one. (A connector counts the resumes its streams take
    /// in `tunnel::resumable::stats`, which its `/metrics` reads.)
    pub fn resumed(&self) {
        self.resumes.fetch_add(1, Relaxed);
    }

    /// A stream waits for its connector on a young DMZ instance (`limits.route_wait_at_start`);
    /// counted until the guard drops.
    pub fn waiting_for_connector(&self) -> Gauge<'_> {
        Gauge::new(&self.waiting)
    }

    /// Sessions of `role` up now.
    pub fn sessions(&self, role: Role) -> i64 {
        self.sessions[role as usize].load(Relaxed)
    }

    /// Streams open now, and opened since start.
    pub fn streams(&self) -> (i64, u64) {
        (
            self.streams_open.load(Relaxed),
            self.streams_total.load(Relaxed),
        )
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(8 * 1024);
        let role_label = "role";
        family(
            &mut o,
            "sallyport_sessions",
            "gauge",
            if self.dmz {
                "Sessions up now, by the role of the peer."
            } else {
                "Sessions up now to the DMZ gateway."
            },
        );
        for &r in self.roles() {
            let _ = writeln!(
                o,
                "sallyport_sessions{{{role_label}=\"{}\"}} {}",
                r.as_str(),
                self.sessions[r as usize].load(Relaxed)
            );
        }
        family(
            &mut o,
            "sallyport_sessions_total",
            "counter",
            "Sessions that came up since start.",
        );
        for &r in self.roles() {
            let _ = writeln!(
                o,
                "sallyport_sessions_total{{{role_label}=\"{}\"}} {}",
                r.as_str(),
                self.sessions_total[r as usize].load(Relaxed)
            );
        }
        family(
            &mut o,
            "sallyport_streams_open",
            "gauge",
            "Streams open now.",
        );
        let _ = writeln!(
            o,
            "sallyport_streams_open {}",
            self.streams_open.load(Relaxed)
        );
        family(
            &mut o,
            "sallyport_streams_total",
            "counter",
            "Streams opened since start.",
        );
        let _ = writeln!(
            o,
            "sallyport_streams_total {}",
            self.streams_total.load(Relaxed)
        );
        family(
            &mut o,
            "sallyport_stream_bytes_total",
            "counter",
            "Bytes carried by streams that ended: up is from the agent towards the service.",
        );
        let _ = writeln!(
            o,
            "sallyport_stream_bytes_total{{direction=\"up\"}} {}",
            self.bytes_up.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "sallyport_stream_bytes_total{{direction=\"down\"}} {}",
            self.bytes_down.load(Relaxed)
        );
        family(
            &mut o,
            "sallyport_open_refusals_total",
            "counter",
            "Stream opens refused, by error code (docs/protocol.md#error-codes).",
        );
        for i in 0..CODES as u8 {
            let code = ErrorCode::from_u8(i);
            if code.to_u8() != i {
                continue;
            }
            let _ = writeln!(
                o,
                "sallyport_open_refusals_total{{code=\"{}\"}} {}",
                code.as_str(),
                self.refusals[i as usize].load(Relaxed)
            );
        }
        if self.dmz {
            family(
                &mut o,
                "sallyport_auth_failures_total",
                "counter",
                "Clients not let in, by role and a fixed set of reasons.",
            );
            for r in Role::ALL {
                for why in AuthFailure::ALL {
                    let _ = writeln!(
                        o,
                        "sallyport_auth_failures_total{{role=\"{}\",reason=\"{}\"}} {}",
                        r.as_str(),
                        why.as_str(),
                        self.auth_failures[r as usize][why as usize].load(Relaxed)
                    );
                }
            }
        }
        family(
            &mut o,
            "sallyport_handshake_seconds",
            "histogram",
            if self.dmz {
                "From accepting a connection to its session being up."
            } else {
                "From starting to dial the gateway to the session being up."
            },
        );
        let mut cumulative = 0u64;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.handshake_buckets[i].load(Relaxed);
            let _ = writeln!(
                o,
                "sallyport_handshake_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        let count = self.handshake_count.load(Relaxed);
        let _ = writeln!(
            o,
            "sallyport_handshake_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            o,
            "sallyport_handshake_seconds_sum {}",
            self.handshake_sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(o, "sallyport_handshake_seconds_count {count}");
        if !self.dmz {
            family(
                &mut o,
                "sallyport_egress_path",
                "gauge",
                "Sessions to the gateway up now, by the way out they took.",
            );
            for p in EgressPath::ALL {
                let _ = writeln!(
                    o,
                    "sallyport_egress_path{{path=\"{}\"}} {}",
                    p.as_str(),
                    self.egress[p as usize].load(Relaxed)
                );
            }
        }
        let resumable = tunnel::resumable::stats();
        family(
            &mut o,
            "sallyport_stream_resumes_total",
            "counter",
            if self.dmz {
                "Resumes (new attachments of a stream after its path was lost) this instance passed on and the connector holding the stream accepted; the connectors count the same resumes, so do not add the two jobs."
            } else {
                "Resumes (new attachments of a stream after its path was lost) this connector's streams accepted."
            },
        );
        let resumes = if self.dmz {
            self.resumes.load(Relaxed)
        } else {
            resumable.resumed
        };
        let _ = writeln!(o, "sallyport_stream_resumes_total {resumes}");
        if self.dmz {
            family(
                &mut o,
                "sallyport_streams_waiting_for_connector",
                "gauge",
                "New streams waiting now for a connector that may serve them to attach (only within limits.route_wait_at_start of the instance's first authenticated session).",
            );
            let _ = writeln!(
                o,
                "sallyport_streams_waiting_for_connector {}",
                self.waiting.load(Relaxed)
            );
        } else {
            family(
                &mut o,
                "sallyport_streams_suspended",
                "gauge",
                "Resumable streams held now after their path (the agent's session or this connector's) was lost, for the grace, until a resume arrives.",
            );
            let _ = writeln!(o, "sallyport_streams_suspended {}", resumable.suspended);
            family(
                &mut o,
                "sallyport_stream_resumes_expired_total",
                "counter",
                "Resumable streams ended because no resume arrived within the grace.",
            );
            let _ = writeln!(
                o,
                "sallyport_stream_resumes_expired_total {}",
                resumable.expired
            );
            family(
                &mut o,
                "sallyport_stream_resume_retained_bytes",
                "gauge",
                "Bytes resumable streams keep now until the agent acknowledges them (bounded by the resume budget).",
            );
            let _ = writeln!(
                o,
                "sallyport_stream_resume_retained_bytes {}",
                resumable.retained
            );
        }
        let signed = self.revocation_signed_at.load(Relaxed);
        if self.dmz {
            family(
                &mut o,
                "sallyport_revocation_list_signed_timestamp_seconds",
                "gauge",
                "When the signed revocation list in force was signed (Unix time; 0: no list configured); past v2.revoked_max_age, tokens accepted by claims alone are refused.",
            );
            let _ = writeln!(
                o,
                "sallyport_revocation_list_signed_timestamp_seconds {signed}"
            );
        }
        self.udp.render(&mut o);
        o
    }

    /// The signed revocation list now in force was signed at `unix` seconds.
    pub fn revocation_list(&self, unix: u64) {
        self.revocation_signed_at.store(unix, Relaxed);
    }

    fn roles(&self) -> &'static [Role] {
        if self.dmz {
            &Role::ALL
        } else {
            // A connector's sessions all go to the DMZ.
            &[Role::Connector]
        }
    }
}

fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

/// One unit of a gauge, given back on drop.
pub struct Gauge<'a>(&'a AtomicI64);

impl<'a> Gauge<'a> {
    fn new(g: &'a AtomicI64) -> Gauge<'a> {
        g.fetch_add(1, Relaxed);
        Gauge(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_go_back_down_and_the_histogram_is_cumulative() {
        let m = Metrics::dmz();
        {
            let _s = m.session_up(Role::Agent, Duration::from_millis(30));
            let _t = m.stream_open();
            assert_eq!(m.sessions(Role::Agent), 1);
            let text = m.render();
            assert!(
                text.contains("sallyport_sessions{role=\"agent\"} 1"),
                "{text}"
            );
            assert!(text.contains("sallyport_streams_open 1"), "{text}");
            let _w = m.waiting_for_connector();
            m.resumed();
            let text = m.render();
            assert!(text.contains("sallyport_streams_waiting_for_connector 1"));
            assert!(text.contains("sallyport_stream_resumes_total 1"));
        }
        assert!(m
            .render()
            .contains("sallyport_streams_waiting_for_connector 0"));
        let text = m.render();
        assert!(
            text.contains("sallyport_sessions{role=\"agent\"} 0"),
            "{text}"
        );
        assert!(text.contains("sallyport_sessions_total{role=\"agent\"} 1"));
        assert!(text.contains("sallyport_handshake_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("sallyport_handshake_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("sallyport_handshake_seconds_bucket{le=\"+Inf\"} 1"));
    }

    /// A flood of refusals and failed logins with made-up destinations and ids adds no series
    /// and keeps the ring at its size.
    #[test]
    fn untrusted_text_never_becomes_a_label_and_the_ring_is_bounded() {
        let m = Metrics::dmz();
        let before = m.render().lines().count();
        for i in 0..10_000 {
            let dest = format!("evil-{i}.internal:1");
            m.refused(ErrorCode::NoRoute, "alice", &dest, "no connector serves it");
            m.auth_failed(Role::Agent, AuthFailure::Unknown);
        }
        let text = m.render();
        assert_eq!(text.lines().count(), before);
        assert!(!text.contains("evil-"));
        assert_eq!(m.recent_refusals().len(), RECENT_REFUSALS);
        assert_eq!(m.recent_refusals()[0].dest, "evil-9999.internal:1");
        assert!(text.contains(
            "sallyport_auth_failures_total{role=\"agent\",reason=\"unknown_token\"} 10000"
        ));
    }
}
