//! `sallyport demo`: the whole system on loopback, no setup.
//!
//! Brings up, in this one process: a small "internal" HTTP service, the DMZ gateway (TLS with a
//! throwaway CA), a connector (dialling out to the gateway, allowed to reach only that service,
//! under the name `backend.internal`), and the agent. Then it pushes real requests through the
//! agent's SOCKS5 and HTTP ports, prints the curl lines to try, and runs until Ctrl-C.

use crate::config::{AgentConfig, Secret};
use crate::connect::via_agent;
use anyhow::{bail, Context};
use gateway::auth::{self, ReloadingStore};
use gateway::connector::ConnectorConfig;
use gateway::dmz::{Dmz, DmzConfig};
use gateway::policy::{Policy, Route, Rule};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const INTERNAL_NAME: &str = "backend.internal";

/// Options of `sallyport demo`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub socks: SocketAddr,
    pub http: SocketAddr,
    /// Push the traffic, print, and exit instead of running until Ctrl-C.
    pub once: bool,
}

/// A tiny HTTP/1.1 service that answers every request with a greeting (keep-alive aware enough
/// for curl).
async fn internal_service(listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let (mut s, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                while let Some(end) = find_head_end(&buf) {
                    buf.drain(..end);
                    let body = format!("hello from {INTERNAL_NAME}, reached through sallyport\n");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if buf.len() > 64 * 1024 {
                    return;
                }
            }
        });
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Runs the demo until `shutdown` (or, with `once`, until the traffic went through).
pub async fn run(opts: DemoOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("sallyport-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run_in(&dir, opts, shutdown).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(dir: &Path, opts: DemoOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    // 1. The internal service.
    let svc = TcpListener::bind("127.0.0.1:0").await?;
    let svc_port = svc.local_addr()?.port();
    tokio::spawn(internal_service(svc, shutdown.clone()));

    // 2. The DMZ gateway, TLS with a throwaway CA.
    let pki = gateway::certs::trial_pki(&["localhost".into(), "127.0.0.1".into()])?;
    let ca_path = dir.join("ca.crt");
    std::fs::write(&ca_path, &pki.ca_cert_pem)?;
    let route = format!("{INTERNAL_NAME}:{svc_port}");
    // The agent's token is protocol v2: signed by a throwaway issuer, bound to the gateway's
    // key; the agent never sends it.
    let inner_key = Arc::new(tunnel::inner::KeyPair::generate());
    let issuer = tunnel::token::Issuer::generate();
    let agent_tokens = dir.join("agents.toml");
    let agent_token = auth::mint_v2(
        &agent_tokens,
        auth::MintV2 {
            kind: tunnel::token::Kind::Agent,
            id: "demo-agent".into(),
            name: None,
            groups: vec!["demo".into()],
            routes: vec![],
            expires: Some(std::time::SystemTime::now() + Duration::from_secs(86_400)),
            issuer: &issuer,
            gateway_keys: vec![inner_key.public().0],
            deployment: None,
            renewer: None,
        },
    )?;
    let conn_tokens = dir.join("connectors.toml");
    let conn_token = auth::mint_v2(
        &conn_tokens,
        auth::MintV2 {
            kind: tunnel::token::Kind::Connector,
            id: "demo-connector".into(),
            name: None,
            groups: vec![],
            routes: vec!["*.internal:*".into()],
            expires: None,
            issuer: &issuer,
            gateway_keys: vec![inner_key.public().0],
            deployment: None,
            renewer: None,
        },
    )?;
    let mut v2 = gateway::dmz::v2::V2Config::new(inner_key.clone());
    v2.issuers = vec![issuer.public()];
    let dmz_cfg = DmzConfig {
        drain_delay: std::time::Duration::ZERO,
        listen: "127.0.0.1:0".parse()?,
        tls: Some(gateway::certs::server_config_from_pem(
            pki.cert_pem.as_bytes(),
            pki.key_pem.as_bytes(),
        )?),
        prefix: String::new(),
        agent_tokens: Arc::new(ReloadingStore::open(&agent_tokens)?),
        connector_tokens: Arc::new(ReloadingStore::open(&conn_tokens)?),
        trusted_proxies: vec![],
        forwarded_header: Default::default(),
        instance_id: "demo-dmz".into(),
        limits: Default::default(),
        session: tunnel::Config::new(tunnel::Role::Dmz, false),
        reload_every: Duration::from_secs(2),
        inner_key: Some(inner_key.clone()),
        tls_key_pin: None,
        v2,
        admin: None,
    };
    let dmz = Dmz::bind(dmz_cfg).await?;
    let gw = format!("wss://127.0.0.1:{}/", dmz.local_addr().port());
    tokio::spawn(dmz.serve(shutdown.clone()));

    // 3. The connector: dials out, allowed to reach only the internal service.
    let gateway_url = egress::GatewayUrl::parse(&gw)?;
    let rules: Vec<Rule> = vec![route.parse()?, format!("127.0.0.1/32:{svc_port}").parse()?];
    let resume = std::sync::Arc::new(gateway::connector::resume::Resumes::default());
    let conn_cfg = ConnectorConfig {
        gateways: vec![gateway_url.clone()],
        token: auth::TokenSecret::new(conn_token.expose()),
        v2: Some(Arc::new(conn_token)),
        tls: Some(gateway::connector::tls_config_v2()?),
        policy: Arc::new(Policy::with_local_addresses(rules)),
        // Advertise the whole site; the allow-list decides (so :1 is refused with a reason).
        udp: Arc::new(gateway::policy::Policy::new(Vec::new(), Vec::new())),
        routes: vec!["*.internal:*".parse::<Route>()?],
        way: egress::Way::new(egress::Egress::direct()),
        hosts: HashMap::from([(INTERNAL_NAME.to_string(), vec!["127.0.0.1".parse()?])]),
        sessions: 2,
        connect_timeout: Duration::from_secs(5),
        protocol_timeout: gateway::connector::PROTOCOL_TIMEOUT,
        token_source: "the demo".into(),
        transport: uplink::TransportChoice::Auto,
        http_mode: None,
        always_inner: false,
        random_masks: false,
        instance_id: "demo-connector".into(),
        session: {
            let mut s = tunnel::Config::new(tunnel::Role::Connector, true);
            s.resume = true;
            s.resume_id = resume.id.clone();
            s
        },
        admin: None,
        ops: Default::default(),
        issuer: None,
        resume,
    };
    tokio::spawn(gateway::connector::run(conn_cfg, shutdown.clone()));

    // 4. The agent.
    let agent_cfg = AgentConfig {
        gateway: gateway_url,
        failover: Vec::new(),
        token: Secret::new(agent_token.expose()),
        token_source: "the demo".into(),
        tls: Some(egress::client_config(&egress::TlsOptions {
            any_certificate: true,
            ..Default::default()
        })?),
        way: egress::Way::new(egress::Egress::direct()),
        gateway_ca_names: Vec::new(),
        gateway_anchor: Some(egress::CaAnchor::from_file(&ca_path)?),
        socks: Some(opts.socks),
        http: Some(opts.http),
        forwards: vec![],
        allow_remote_clients: false,
        local_auth: None,
        open_timeout: Duration::from_secs(10),
        resume_grace: tunnel::resumable::DEFAULT_GRACE,
        connect_timeout: Duration::from_secs(5),
        session_wait: Duration::from_secs(10),
        control: None,
        instance_id: "demo-agent".into(),
        session: {
            let mut s = tunnel::Config::new(tunnel::Role::Agent, true);
            s.resume = true;
            s
        },
        gateway_key: None,
        inner_key: None,
        always_inner: false,
        random_masks: false,
        transport: crate::config::TransportChoice::Auto,
        http_mode: None,
        websocket_retry: crate::pool::RETRY_WEBSOCKET,
        v2: Some(uplink::TokenCell::new(Arc::new(agent_token))),
        token_home: crate::config::TokenHome::Nowhere,
    };
    let agent = crate::Agent::bind(agent_cfg).await?;
    let addrs = agent.addrs();
    let socks = addrs
        .iter()
        .find(|(f, _)| *f == "socks5")
        .map(|(_, a)| *a)
        .context("no socks port")?;
    let http = addrs
        .iter()
        .find(|(f, _)| *f == "http")
        .map(|(_, a)| *a)
        .context("no http port")?;
    tokio::spawn(agent.serve(shutdown.clone()));

    // 5. Real traffic through SOCKS5 and through the HTTP proxy port.
    let url = format!("http://{INTERNAL_NAME}:{svc_port}/");
    // The connector dials out at the same time as the agent: until its routes reach the DMZ,
    // a request is refused ("no connector serves"). Wait for that, bounded, by retrying.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let via_socks = loop {
        match request_via_socks(socks, svc_port).await {
            Ok(body) => break body,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(e).context("request through SOCKS5"),
        }
    };
    let via_http = request_via_http_proxy(http, &url)
        .await
        .context("request through the HTTP proxy port")?;
    println!("sallyport demo: gateway {gw}, connector dialled out, agent on {socks} (SOCKS5) and {http} (HTTP)");
    println!("through SOCKS5 -> {}", via_socks.trim());
    println!("through HTTP   -> {}", via_http.trim());
    println!();
    println!("try it yourself:");
    println!("  curl --socks5-hostname {socks} {url}");
    println!("  curl -x http://{http} {url}");
    println!("  curl --socks5-hostname {socks} http://{INTERNAL_NAME}:1/   # not in the allow-list: refused");
    if opts.once {
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(200)).await;
        return Ok(());
    }
    println!("running until Ctrl-C");
    shutdown.cancelled().await;
    Ok(())
}

async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .context("response timed out")??;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&buf) {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if buf.len() >= end + len {
                let status = head.lines().next().unwrap_or("").to_string();
                if !status.contains(" 200 ") {
                    bail!(
                        "answer was {status}: {}",
                        String::from_utf8_lossy(&buf[end..])
                    );
                }
                return Ok(String::from_utf8_lossy(&buf[end..end + len]).into_owned());
            }
        }
    }
    bail!("connection closed before a full response")
}

async fn request_via_socks(socks: SocketAddr, port: u16) -> anyhow::Result<String> {
    let mut s = via_agent(socks, INTERNAL_NAME, port).await?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {INTERNAL_NAME}\r\n\r\n").as_bytes())
        .await?;
    read_response(&mut s).await
}

async fn request_via_http_proxy(http: SocketAddr, url: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(http).await?;
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: {INTERNAL_NAME}\r\n\r\n").as_bytes())
        .await?;
    read_response(&mut s).await
}
