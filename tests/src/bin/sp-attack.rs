//! The attacker of `bench/hostile.sh`: one client address playing, at once and for a bounded
//! time, every pre-authentication attack the DMZ gateway answers, plus a `PING` flood from an
//! authenticated session.
//!
//! ```text
//! sp-attack run --gateway 127.0.0.1:PORT [--ca ca.crt | --plain] --source 127.0.0.2 \
//!     --token-file rogue.token --duration 60 --rate 20 --burst 64 [--kinds body,slowloris,inner,ping]
//! sp-attack pattern-sha256 N      # SHA-256 of the N bytes sp-testsvc's /bytes/N serves
//! ```
//!
//! New connections are opened at `--rate` per second (after `--burst` at once), in turn:
//! - `body`: `POST /agent/http` with `Content-Length: 1100000`, 1 KiB of body, then silence;
//! - `slowloris`: a request head sent one byte per second;
//! - `inner`: `POST /agent/http?inner=1` carrying a real inner-channel first message built
//!   from the gateway's public `/key`, never followed by the token.
//!
//! Each connection is held until the gateway closes it (or 20 s, or the end). Meanwhile `ping`
//! keeps one authenticated WebSocket session (its own agent token) that sends `PING` frames as
//! fast as the gateway takes them and never reads; when the gateway ends it, it reconnects
//! after a second.
//!
//! It stops by itself after `--duration` seconds (or on SIGTERM/SIGINT) and prints one JSON
//! line of counts on stdout. Every loop is bounded by that end.

use clap::{Parser, Subcommand};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::time::Instant as TInstant;
use tunnel::TransportTx;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Run(RunArgs),
    /// Prints the SHA-256 of the first N bytes of the e2e test pattern.
    PatternSha256 {
        n: u64,
    },
}

#[derive(Parser, Clone)]
struct RunArgs {
    /// The DMZ gateway's address.
    #[arg(long)]
    gateway: SocketAddr,
    /// The CA that signed the gateway's certificate (TLS); without it, `--plain`.
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long)]
    plain: bool,
    /// The name in the gateway's certificate.
    #[arg(long, default_value = "127.0.0.1")]
    server_name: String,
    /// The attacker's source address.
    #[arg(long, default_value = "127.0.0.2")]
    source: IpAddr,
    /// An agent token of the attacker's own (for `ping`).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Seconds until it stops by itself.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// New attack connections per second (`handshakes_per_ip` by default: 20).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Connections opened at once at the start (the bucket's burst, `handshake_burst`: 64).
    #[arg(long, default_value_t = 64)]
    burst: u32,
    /// Which attacks: any of body, slowloris, inner, ping.
    #[arg(
        long,
        default_value = "body,slowloris,inner,ping",
        value_delimiter = ','
    )]
    kinds: Vec<String>,
    /// Authenticated PING-flooding sessions (the token allows `sessions_per_agent_token`, 16).
    #[arg(long, default_value_t = 1)]
    ping_sessions: u32,
    /// Most attack connections held at once (a bound on the attacker itself).
    #[arg(long, default_value_t = 4096)]
    max_conns: usize,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxIo = Box<dyn Io>;

#[derive(Default)]
struct Stats {
    attempted: AtomicU64,
    connect_failed: AtomicU64,
    /// TLS (or, plain, the first write) failed: the gateway closed without an answer
    /// (rate limit, or no connection permit).
    refused: AtomicU64,
    established: AtomicU64,
    /// Attack connections the gateway ended, and how long they were held in total (ms).
    closed_by_gateway: AtomicU64,
    held_ms: AtomicU64,
    /// Still open when their own 20 s or the run ended.
    outlived: AtomicU64,
    body: AtomicU64,
    slowloris: AtomicU64,
    inner: AtomicU64,
    /// `inner` attempts answered 200 (a pending session created).
    inner_created: AtomicU64,
    key_fetched: AtomicU64,
    ping_sessions: AtomicU64,
    ping_session_failed: AtomicU64,
    pings: AtomicU64,
}

struct Ctx {
    args: RunArgs,
    tls: Option<tokio_rustls::TlsConnector>,
    end: TInstant,
    stats: Stats,
    key: std::sync::Mutex<Option<tunnel::inner::PublicKey>>,
    /// The PING session is about to reconnect: the next tick opens no attack connection.
    ping_wants: std::sync::atomic::AtomicBool,
}

/// Most one attack connection is held.
const HOLD_MAX: Duration = Duration::from_secs(20);

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::PatternSha256 { n } => println!("{}", sallyport_e2e::pattern_sha256(n)),
        Cmd::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let code = rt.block_on(run(args));
            // Held connections' tasks are abandoned: the process ends here.
            rt.shutdown_timeout(Duration::from_millis(200));
            std::process::exit(code);
        }
    }
}

fn tls_connector(ca: &PathBuf) -> Result<tokio_rustls::TlsConnector, String> {
    let pem = std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

async fn run(args: RunArgs) -> i32 {
    let tls = match (&args.ca, args.plain) {
        (Some(ca), false) => match tls_connector(ca) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("sp-attack: {e}");
                return 2;
            }
        },
        (None, true) => None,
        _ => {
            eprintln!("sp-attack: give exactly one of --ca and --plain");
            return 2;
        }
    };
    let started = Instant::now();
    let end = TInstant::now() + Duration::from_secs_f64(args.duration);
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        tls,
        end,
        stats: Stats::default(),
        key: std::sync::Mutex::new(None),
        ping_wants: Default::default(),
    });
    let has = |k: &str| args.kinds.iter().any(|x| x == k);
    let mut conn_kinds: Vec<&'static str> = Vec::new();
    for k in ["body", "slowloris", "inner"] {
        if has(k) {
            conn_kinds.push(k);
        }
    }
    if has("inner") {
        fetch_key(&ctx).await;
    }
    if has("ping") {
        // The session connects before the flood takes the address's handshake budget.
        let n = u64::from(args.ping_sessions.max(1));
        for _ in 0..n {
            tokio::spawn(ping_flood(ctx.clone()));
        }
        let until = TInstant::now() + Duration::from_secs(5);
        while ctx.stats.ping_sessions.load(Relaxed) + ctx.stats.ping_session_failed.load(Relaxed)
            < n
            && TInstant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let permits = Arc::new(Semaphore::new(args.max_conns));
    let stop = async {
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
                _ = tokio::time::sleep_until(end) => {}
            }
        }
        #[cfg(not(unix))]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = tokio::time::sleep_until(end) => {}
        }
    };
    tokio::pin!(stop);
    let mut next = 0usize;
    let mut spawn_one = |ctx: &Arc<Ctx>| {
        if conn_kinds.is_empty() {
            return;
        }
        // A reconnecting PING session takes this connection's place in the rate.
        if ctx.ping_wants.swap(false, Relaxed) {
            return;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            return;
        };
        let kind = conn_kinds[next % conn_kinds.len()];
        next += 1;
        let ctx = ctx.clone();
        tokio::spawn(async move {
            attack_conn(&ctx, kind).await;
            drop(permit);
        });
    };
    for _ in 0..args.burst {
        spawn_one(&ctx);
    }
    let after_burst = Instant::now();
    let attempted_in_burst = u64::from(args.burst);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(0.01)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await;
    let mut last_report = Instant::now();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => spawn_one(&ctx),
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            let s = &ctx.stats;
            eprintln!(
                "sp-attack: {:.0} s: {} connections attempted, {} refused, {} PINGs",
                started.elapsed().as_secs_f64(),
                s.attempted.load(Relaxed),
                s.refused.load(Relaxed),
                s.pings.load(Relaxed)
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // New connections per second once the opening burst is spent.
    let steady = (ctx
        .stats
        .attempted
        .load(Relaxed)
        .saturating_sub(attempted_in_burst)) as f64
        / after_burst.elapsed().as_secs_f64();
    let s = &ctx.stats;
    let g = |a: &AtomicU64| a.load(Relaxed);
    let closed = g(&s.closed_by_gateway);
    println!(
        "{{\"seconds\": {secs:.3}, \"attempted\": {}, \"connect_failed\": {}, \"refused\": {}, \"established\": {}, \
\"conn_per_s\": {:.1}, \"conn_per_s_after_burst\": {steady:.1}, \"established_per_s\": {:.1}, \"closed_by_gateway\": {closed}, \"mean_held_s\": {:.2}, \"outlived\": {}, \
\"body\": {}, \"slowloris\": {}, \"inner\": {}, \"inner_created\": {}, \"key_fetched\": {}, \
\"ping_sessions\": {}, \"ping_session_failed\": {}, \"pings\": {}, \"pings_per_s\": {:.0}}}",
        g(&s.attempted),
        g(&s.connect_failed),
        g(&s.refused),
        g(&s.established),
        g(&s.attempted) as f64 / secs,
        g(&s.established) as f64 / secs,
        if closed > 0 { g(&s.held_ms) as f64 / 1000.0 / closed as f64 } else { 0.0 },
        g(&s.outlived),
        g(&s.body),
        g(&s.slowloris),
        g(&s.inner),
        g(&s.inner_created),
        g(&s.key_fetched),
        g(&s.ping_sessions),
        g(&s.ping_session_failed),
        g(&s.pings),
        g(&s.pings) as f64 / secs,
    );
    0
}

/// A TCP connection from the attacker's address, with TLS unless plain. `Err(true)`: the
/// gateway closed during the handshake (refused).
async fn connect(ctx: &Ctx) -> Result<BoxIo, bool> {
    let sock = if ctx.args.source.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|_| false)?;
    sock.bind(SocketAddr::new(ctx.args.source, 0))
        .map_err(|_| false)?;
    let tcp =
        match tokio::time::timeout(Duration::from_secs(5), sock.connect(ctx.args.gateway)).await {
            Ok(Ok(t)) => t,
            _ => return Err(false),
        };
    let _ = tcp.set_nodelay(true);
    match &ctx.tls {
        None => Ok(Box::new(tcp)),
        Some(c) => {
            let name = ServerName::try_from(ctx.args.server_name.clone()).map_err(|_| false)?;
            match tokio::time::timeout(Duration::from_secs(10), c.connect(name, tcp)).await {
                Ok(Ok(s)) => Ok(Box::new(s)),
                _ => Err(true),
            }
        }
    }
}

async fn fetch_key(ctx: &Ctx) {
    let until = TInstant::now() + Duration::from_secs(5);
    while TInstant::now() < until {
        if let Ok(mut s) = connect(ctx).await {
            let _ = s
                .write_all(b"GET /key HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
                .await;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
            let text = String::from_utf8_lossy(&answer);
            if let Some(k) = text.lines().find_map(|l| l.strip_prefix("inner ")) {
                if let Ok(k) = k.trim().parse::<tunnel::inner::PublicKey>() {
                    *ctx.key.lock().unwrap() = Some(k);
                    ctx.stats.key_fetched.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("sp-attack: could not fetch /key; inner floods send garbage hellos");
}

/// One attack connection of `kind`, held until the gateway ends it (or 20 s, or the end).
async fn attack_conn(ctx: &Ctx, kind: &str) {
    let s = &ctx.stats;
    s.attempted.fetch_add(1, Relaxed);
    let io = match connect(ctx).await {
        Ok(io) => io,
        Err(true) => {
            s.refused.fetch_add(1, Relaxed);
            return;
        }
        Err(false) => {
            s.connect_failed.fetch_add(1, Relaxed);
            return;
        }
    };
    s.established.fetch_add(1, Relaxed);
    let (first, drip): (Vec<u8>, &[u8]) = match kind {
        "body" => {
            s.body.fetch_add(1, Relaxed);
            let mut v = b"POST /agent/http HTTP/1.1\r\nHost: gw\r\nContent-Length: 1100000\r\n\r\n"
                .to_vec();
            v.extend_from_slice(&[b'x'; 1024]);
            (v, b"")
        }
        "slowloris" => {
            s.slowloris.fetch_add(1, Relaxed);
            (
                Vec::new(),
                b"GET /agent HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n",
            )
        }
        _ => {
            s.inner.fetch_add(1, Relaxed);
            let key = *ctx.key.lock().unwrap();
            let hello = match key.and_then(|k| tunnel::inner::Initiator::start(&k, &[0u8; 32]).ok())
            {
                Some((_init, hello)) => hello.to_vec(),
                None => vec![0u8; 64],
            };
            let mut v = format!(
                "POST /agent/http?inner=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n",
                hello.len()
            )
            .into_bytes();
            v.extend_from_slice(&hello);
            (v, b"")
        }
    };
    let held_since = Instant::now();
    let until = std::cmp::min(ctx.end, TInstant::now() + HOLD_MAX);
    let (mut rd, mut wr) = tokio::io::split(io);
    if !first.is_empty() && wr.write_all(&first).await.is_err() {
        s.closed_by_gateway.fetch_add(1, Relaxed);
        return;
    }
    let mut drip_at = 0usize;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut buf = vec![0u8; 4096];
    let mut seen_200 = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {
                s.outlived.fetch_add(1, Relaxed);
                return;
            }
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if kind == "inner" && !seen_200 && buf[..n].starts_with(b"HTTP/1.1 200") {
                        seen_200 = true;
                        s.inner_created.fetch_add(1, Relaxed);
                    }
                }
            },
            _ = tick.tick(), if drip_at < drip.len() => {
                if wr.write_all(&drip[drip_at..drip_at + 1]).await.is_err() {
                    break;
                }
                let _ = wr.flush().await;
                drip_at += 1;
            }
        }
    }
    s.closed_by_gateway.fetch_add(1, Relaxed);
    s.held_ms
        .fetch_add(held_since.elapsed().as_millis() as u64, Relaxed);
}

/// One authenticated session that floods `PING` and never reads; reconnects a second after the
/// gateway ends it, until the end.
async fn ping_flood(ctx: Arc<Ctx>) {
    let s = &ctx.stats;
    let token = match &ctx.args.token_file {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => t.trim().to_string(),
            Err(e) => {
                eprintln!("sp-attack: cannot read {}: {e}", p.display());
                return;
            }
        },
        None => {
            eprintln!("sp-attack: ping needs --token-file");
            return;
        }
    };
    let scheme = if ctx.tls.is_some() { "wss" } else { "ws" };
    let url = format!("{scheme}://{}/agent", ctx.args.gateway);
    while TInstant::now() < ctx.end {
        let session = ping_session(&ctx, &url, &token);
        tokio::select! {
            _ = tokio::time::sleep_until(ctx.end) => return,
            r = session => {
                if let Err(why) = r {
                    s.ping_session_failed.fetch_add(1, Relaxed);
                    eprintln!("sp-attack: ping session ended ({why}); reconnecting in 1 s");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        ctx.ping_wants.store(true, Relaxed);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One flooding session: connect, upgrade with the token, hello, then `PING`s until an error.
async fn ping_session(ctx: &Ctx, url: &str, token: &str) -> Result<(), &'static str> {
    let s = &ctx.stats;
    let io = connect(ctx).await.map_err(|_| "connect")?;
    let ws = tunnel::ws::client(io, url, Some(token), 65536, Duration::from_secs(5))
        .await
        .map_err(|_| "upgrade")?;
    // The receiving half is never polled: nothing the gateway sends is read.
    let (mut tx, _rx) = tunnel::Transport::split(ws);
    let hello = tunnel::Hello {
        version: tunnel::PROTOCOL_VERSION,
        role: tunnel::Role::Agent,
        stream_window: 512 * 1024,
        session_window: 16 * 1024 * 1024,
        max_frame: 65536,
        instance_id: "sp-attack".into(),
        features: 0,
        resume_id: String::new(),
    };
    tx.send(tunnel::Frame::Hello(hello).encode())
        .await
        .map_err(|_| "hello")?;
    tx.flush().await.map_err(|_| "hello")?;
    s.ping_sessions.fetch_add(1, Relaxed);
    let mut n = 0u64;
    loop {
        for _ in 0..256 {
            tx.send(tunnel::Frame::Ping(n).encode())
                .await
                .map_err(|_| "send")?;
            n += 1;
        }
        tx.flush().await.map_err(|_| "send")?;
        s.pings.fetch_add(256, Relaxed);
    }
}
