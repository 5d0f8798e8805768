//! The light session client of `bench/idle.sh`: many real agent sessions to one DMZ gateway
//! from one process, kept idle.
//!
//! ```text
//! sp-idle --gateway wss://127.0.0.1:PORT/ --token-file agent.token --ca ca.crt \
//!     --steps 1000,2000 [--concurrency 16] [--max-seconds 900] \
//!     [--burst-to 127.0.0.1:PORT --burst 262144]
//! ```
//!
//! Each session is the agent's own: `uplink::Uplink::connect` over WebSocket (TLS, the upgrade
//! with protocol v2's first message, the Noise handshake, the tunnel hello), with the agent's
//! tunnel defaults, so the session's own tasks answer the gateway's `PING`s and ping it in turn.
//! Nothing else is sent. After each step (sessions up in total) it prints one JSON line on
//! stdout and waits for a line on stdin before the next step; after the last step, or on end of
//! input, it closes every session and prints a last line. It stops by itself after
//! `--max-seconds` in any case.
//!
//! With `--burst-to` (an echo service the connector may reach), after the last step each
//! session in turn opens one stream there, sends `--burst` bytes and reads them back, then
//! leaves the session idle again: what a desktop that moved some data and went quiet costs. It
//! prints a line and waits for a line on stdin again.

use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
struct Args {
    /// The DMZ gateway, e.g. `wss://127.0.0.1:8443/`.
    #[arg(long)]
    gateway: String,
    /// An agent token (`sp2_…`) in a 0600 file.
    #[arg(long)]
    token_file: PathBuf,
    /// The CA of the gateway's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Sessions up in total after each step, ascending.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    steps: Vec<usize>,
    /// Session set-ups in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// An echo service (`host:port`) each session sends a burst to after the last step.
    #[arg(long)]
    burst_to: Option<String>,
    /// Bytes each session sends (and reads back) in its burst.
    #[arg(long, default_value_t = 256 * 1024)]
    burst: usize,
    /// The whole run ends after this long, whatever happens.
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let end = Duration::from_secs(args.max_seconds);
    match tokio::time::timeout(end, run(args)).await {
        Ok(r) => r,
        Err(_) => {
            eprintln!("sp-idle: --max-seconds reached, stopping");
            Ok(())
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let up = Arc::new(uplink(&args)?);
    let mut sessions: Vec<tunnel::Session> = Vec::new();
    let mut failed = 0usize;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    for (i, &target) in args.steps.iter().enumerate() {
        let started = Instant::now();
        let want = target.saturating_sub(sessions.len());
        let (opened, f) = open(&up, want, args.concurrency.max(1)).await;
        failed += f;
        sessions.extend(opened);
        let alive = sessions.iter().filter(|s| !s.is_closed()).count();
        println!(
            "{{\"step\": {i}, \"sessions\": {}, \"alive\": {alive}, \"failed\": {failed}, \"took_s\": {:.2}}}",
            sessions.len(),
            started.elapsed().as_secs_f64()
        );
        if stdin.next_line().await?.is_none() {
            break;
        }
    }
    if let Some(to) = &args.burst_to {
        let (host, port) = to
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("--burst-to {to}: expected host:port"))?;
        let dest = tunnel::Dest::new(host, port);
        let started = Instant::now();
        let (ok, failed) = bursts(&sessions, &dest, args.burst, args.concurrency.max(1)).await;
        println!(
            "{{\"burst\": {}, \"ok\": {ok}, \"failed\": {failed}, \"took_s\": {:.2}}}",
            args.burst,
            started.elapsed().as_secs_f64()
        );
        let _ = stdin.next_line().await?;
    }
    let alive = sessions.iter().filter(|s| !s.is_closed()).count();
    for s in &sessions {
        s.close(tunnel::ErrorCode::Shutdown, "sp-idle done");
    }
    println!(
        "{{\"end\": true, \"sessions\": {}, \"alive\": {alive}, \"failed\": {failed}}}",
        sessions.len()
    );
    Ok(())
}

/// Opens `n` sessions, `concurrency` at a time; the sessions that came up and the failures.
async fn open(
    up: &Arc<uplink::Uplink>,
    n: usize,
    concurrency: usize,
) -> (Vec<tunnel::Session>, usize) {
    let mut set = tokio::task::JoinSet::new();
    let (mut done, mut failed) = (Vec::with_capacity(n), 0usize);
    let mut started = 0;
    while started < n || !set.is_empty() {
        while started < n && set.len() < concurrency {
            let up = up.clone();
            set.spawn(async move { up.connect(uplink::TransportChoice::WebSocket).await });
            started += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok((c, _)))) => {
                // The agent accepts no streams: its `Incoming` is dropped, as the agent does.
                done.push(c.session);
            }
            Some(Ok(Err(e))) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("sp-idle: a session failed: {e}");
                }
            }
            Some(Err(e)) => {
                failed += 1;
                eprintln!("sp-idle: a task failed: {e}");
            }
            None => break,
        }
    }
    (done, failed)
}

/// One burst per session, `concurrency` at a time: the sessions whose echo came back whole,
/// and the others.
async fn bursts(
    sessions: &[tunnel::Session],
    dest: &tunnel::Dest,
    bytes: usize,
    concurrency: usize,
) -> (usize, usize) {
    let data: Arc<[u8]> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mut set = tokio::task::JoinSet::new();
    let (mut ok, mut failed, mut next) = (0, 0, 0);
    while next < sessions.len() || !set.is_empty() {
        while next < sessions.len() && set.len() < concurrency {
            let (s, d, data) = (sessions[next].clone(), dest.clone(), data.clone());
            set.spawn(async move { echo(&s, d, &data).await });
            next += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(()))) => ok += 1,
            Some(Ok(Err(e))) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("sp-idle: a burst failed: {e}");
                }
            }
            Some(Err(_)) => failed += 1,
            None => break,
        }
    }
    (ok, failed)
}

/// Sends `data` on a new stream to `dest` and reads the echo back.
async fn echo(s: &tunnel::Session, dest: tunnel::Dest, data: &[u8]) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = s.open(dest, tunnel::Meta::default())?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let send = async {
        wr.write_all(data).await?;
        wr.shutdown().await
    };
    let recv = async {
        let mut back = Vec::with_capacity(data.len());
        rd.read_to_end(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    let (sent, back) = tokio::join!(send, recv);
    sent?;
    anyhow::ensure!(back? == data, "the echo differs from what was sent");
    Ok(())
}

/// The agent's uplink with the agent's tunnel defaults, direct to the gateway.
fn uplink(args: &Args) -> anyhow::Result<uplink::Uplink> {
    let text = std::fs::read_to_string(&args.token_file)?;
    let token: tunnel::token::Token = text
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.token_file.display()))?;
    let tls = egress::client_config(&egress::TlsOptions {
        ca: args.ca.clone(),
        pin: false,
        key_pin: None,
        inner_channel: false,
        any_certificate: true,
    })?;
    let mut session = tunnel::Config::new(tunnel::Role::Agent, true);
    session.accept_streams = false;
    session.instance_id = "sp-idle".into();
    Ok(uplink::Uplink {
        gateway: egress::GatewayUrl::parse(&args.gateway)?,
        failover: Vec::new(),
        way: egress::Way::new(egress::Egress::direct()),
        tls: Some(tls),
        connect_timeout: Duration::from_secs(10),
        session,
        credential: uplink::Credential::V2(uplink::TokenCell::new(Arc::new(token))),
        token_source: args.token_file.display().to_string(),
        transport: uplink::TransportChoice::WebSocket,
        http_mode: None,
        always_inner: false,
        random_masks: false,
    })
}
