//! Configuration of both gateway roles: TOML files, command-line flags that override them, and
//! validation into the typed [`DmzConfig`] / [`ConnectorConfig`] before any port is bound.
//!
//! Every error names what to fix: the flag, or the file, line and key.

use crate::auth::ReloadingStore;
use crate::connector::ConnectorConfig;
use crate::dmz::limits::Limits;
use crate::dmz::DmzConfig;
use crate::policy::{self, Policy, Route, Rule};
use clap::Args;
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use uplink::config::{duration, UplinkArgs};
pub use uplink::config::{invalid, parse_toml, read_toml, relative_to, ConfigError};

// ---------------------------------------------------------------------------------------------
// DMZ

/// `sallyport-gateway dmz` flags.
#[derive(Args, Debug, Default, Clone)]
pub struct DmzArgs {
    /// TOML config file; flags override its values.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:443].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Certificate chain (PEM) for TLS on the listener.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for TLS on the listener.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP/WebSocket, for running behind a TLS-terminating load balancer.
    #[arg(long)]
    pub plain: bool,
    /// Path prefix for the endpoints ({prefix}/agent, {prefix}/connector, {prefix}/healthz).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Agent token file (TOML, reloaded on change).
    #[arg(long)]
    pub agent_tokens: Option<PathBuf>,
    /// Connector token file (TOML, reloaded on change).
    #[arg(long)]
    pub connector_tokens: Option<PathBuf>,
    /// A load balancer address or network whose X-Forwarded-For/Forwarded headers are believed.
    #[arg(long = "trusted-proxy", value_parser = parse_net)]
    pub trusted_proxies: Vec<IpNet>,
    /// The header the trusted load balancer writes the client address into:
    /// `x-forwarded-for` (nginx, HAProxy `option forwardfor`, F5, Cloudflare) or `forwarded`
    /// (RFC 7239); only that one is believed [default: x-forwarded-for].
    #[arg(long)]
    pub forwarded_header: Option<String>,
    /// Name of this instance in logs and hellos [default: host name].
    #[arg(long)]
    pub instance_id: Option<String>,
    /// On SIGTERM, how long `/readyz` answers 503 while sessions are still served, so that the
    /// load balancer's health check takes this instance out before its sessions are sent away
    /// (GOAWAY) [default: 10s; 0s for no drain].
    #[arg(long)]
    pub drain_delay: Option<String>,
    /// Inner-channel key file (created, mode 0600, when missing) [default: inner.key beside
    /// the agent token file].
    #[arg(long)]
    pub inner_key: Option<PathBuf>,
    /// The admin listener: `/metrics` and the admin page.
    #[command(flatten)]
    pub admin: crate::admin::AdminArgs,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct DmzFile {
    pub inner_key: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// `"default"` or `"aes-256-gcm"` (`certs::Ciphers`).
    pub tls_ciphers: Option<String>,
    #[serde(default)]
    pub plain: bool,
    pub prefix: Option<String>,
    pub agent_tokens: Option<PathBuf>,
    pub connector_tokens: Option<PathBuf>,
    /// Addresses (`10.0.0.5`) or networks (`10.0.0.0/24`).
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// `x-forwarded-for` (default) or `forwarded`: the header the load balancer sets.
    pub forwarded_header: Option<String>,
    pub instance_id: Option<String>,
    pub drain_delay: Option<String>,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub tunnel: TunnelFile,
    #[serde(default)]
    pub v2: V2File,
    #[serde(default)]
    pub admin: crate::admin::AdminFile,
}

/// `[v2]`: protocol version 2 (see `docs/protocol.md`).
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct V2File {
    /// Issuers (`ed25519/<base64>`) whose tokens are accepted [default: the keys in
    /// `issuer.pub` beside the agent token file, which `token new` writes].
    #[serde(default)]
    pub issuer_keys: Vec<String>,
    /// This deployment's name; tokens minted for another are refused.
    pub deployment: Option<String>,
    /// `false`: a token signed by an issuer is accepted without an entry in the token file
    /// (every instance of a cluster verifies it alone); only `revoked` takes one back
    /// [default: true].
    pub require_listed: Option<bool>,
    /// Keys of the issuer connector (`renew.pub`) whose renewed agent tokens are accepted
    /// [default: the keys in `renew.pub` beside the agent token file]. Never for connectors.
    #[serde(default)]
    pub renewal_keys: Vec<String>,
    /// The signed revocation list (`sallyport-gateway token revoke` writes it) that every
    /// instance reloads.
    pub revoked: Option<PathBuf>,
    /// Past this age (since the list was signed), tokens accepted by their claims alone are
    /// refused until a newer list arrives (fail closed) [default: 7d].
    pub revoked_max_age: Option<String>,
    /// A second static key file, for rotation: new tokens list both.
    pub next_inner_key: Option<PathBuf>,
    /// The TLS-terminating load balancer in front may read sessions (mode `outer`).
    #[serde(default)]
    pub trust_lb: bool,
    /// The load balancer's certificate keys (`sha256/<base64>`, as `sallyport doctor` prints).
    #[serde(default)]
    pub tls_keys: Vec<String>,
    /// Version 1 bearer tokens are refused after this date (RFC 3339, or `YYYY-MM-DD`)
    /// [default: 90 days after this release].
    pub accept_v1_until: Option<String>,
}

/// Where `token new` keeps the issuer key by default: beside the agent token file.
pub fn default_issuer_key_path(agent_tokens: &Path) -> PathBuf {
    match agent_tokens.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join("issuer.key"),
        _ => PathBuf::from("issuer.key"),
    }
}

/// A key pin `sha256/<base64>` as 32 bytes.
pub fn pin_bytes(pin: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    let b64 = pin.trim().strip_prefix("sha256/").ok_or_else(|| {
        format!("TLS key {pin:?} must look like sha256/<base64> (as `sallyport doctor` prints it)")
    })?;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| format!("TLS key {pin:?}: not base64 of 32 bytes"))
}

/// Ed25519 public keys (`ed25519/…`): those `listed` (named `what` in errors), or else the
/// lines of `file` when it exists.
fn keys_or_file(
    listed: &[String],
    what: &str,
    file: &Path,
) -> Result<Vec<tunnel::token::IssuerKey>, ConfigError> {
    if !listed.is_empty() {
        return listed
            .iter()
            .map(|k| k.parse().map_err(|e| invalid(format!("{what}: {e}"))))
            .collect();
    }
    match std::fs::read_to_string(file) {
        Ok(text) => read_key_lines(&text, file),
        Err(_) => Ok(Vec::new()),
    }
}

/// The keys of a `.pub` file's text, one a line (`#` comments).
fn read_key_lines(text: &str, file: &Path) -> Result<Vec<tunnel::token::IssuerKey>, ConfigError> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            l.parse()
                .map_err(|e| invalid(format!("{}: {e}", file.display())))
        })
        .collect()
}

fn v2_config(
    file: &V2File,
    base: Option<&Path>,
    agent_tokens: &Path,
    current: Arc<tunnel::inner::KeyPair>,
    own_pin: Option<&str>,
) -> Result<crate::dmz::v2::V2Config, ConfigError> {
    let mut keys = vec![current];
    if let Some(p) = &file.next_inner_key {
        let path = relative_to(base, p.clone());
        let (k, _) = crate::dmz::inner::load_or_create(&path).map_err(invalid)?;
        keys.push(Arc::new(k));
    }
    // The public halves `token new` wrote beside the issuer key (the DMZ never needs, nor
    // reads, a private one), unless the config lists keys. Renewal keys (docs/protocol.md,
    // "Renewal") are accepted for agent tokens only.
    let beside = default_issuer_key_path(agent_tokens);
    let issuers = keys_or_file(
        &file.issuer_keys,
        "v2.issuer_keys",
        &beside.with_extension("pub"),
    )?;
    let renewal_keys = keys_or_file(
        &file.renewal_keys,
        "v2.renewal_keys",
        &beside.with_file_name("renew.pub"),
    )?;
    let mut tls_keys = Vec::new();
    if let Some(pin) = own_pin {
        tls_keys.push(pin_bytes(pin).map_err(invalid)?);
    }
    for k in &file.tls_keys {
        tls_keys.push(pin_bytes(k).map_err(|e| invalid(format!("v2.tls_keys: {e}")))?);
    }
    if file.trust_lb && file.tls_keys.is_empty() {
        return Err(invalid(
            "v2.trust_lb needs v2.tls_keys: the load balancer's certificate keys (sha256/…, as `sallyport doctor` prints them)",
        ));
    }
    let accept_v1_until = match &file.accept_v1_until {
        None => crate::dmz::v2::V2Config::default_v1_cutoff(),
        Some(s) => {
            let t = s.trim();
            let full = if t.len() == 10 {
                format!("{t}T00:00:00Z")
            } else {
                t.to_string()
            };
            humantime::parse_rfc3339_weak(&full).map_err(|_| {
                invalid(format!(
                    "v2.accept_v1_until `{s}`: write a date like 2027-03-01 or 2027-03-01T00:00:00Z"
                ))
            })?
        }
    };
    if let Some(d) = &file.deployment {
        if d.is_empty() || d.len() > 64 {
            return Err(invalid("v2.deployment: 1-64 characters"));
        }
    }
    let revoked = match &file.revoked {
        Some(p) => {
            let path = relative_to(base, p.clone());
            if issuers.is_empty() {
                return Err(invalid(
                    "v2.revoked: the list is signed by the issuer, and no issuer key is configured (v2.issuer_keys, or issuer.pub beside the agent token file)",
                ));
            }
            Some(Arc::new(
                crate::auth::ReloadingRevocations::open_with(&path, issuers.clone()).map_err(|e| {
                    invalid(format!(
                        "v2.revoked: {e} (create or re-sign it on the admin host: `sallyport-gateway token revoke --list {} --issuer-key issuer.key`)",
                        path.display()
                    ))
                })?,
            ))
        }
        None => None,
    };
    let require_listed = file.require_listed.unwrap_or(true);
    if !require_listed {
        // Accepting tokens by their signature alone needs a way to take one back, and a name
        // that keeps another deployment's tokens (from a shared issuer) out.
        if issuers.is_empty() {
            return Err(invalid(
                "v2.require_listed = false needs an issuer key (v2.issuer_keys, or issuer.pub beside the agent token file): only signed tokens are accepted unlisted",
            ));
        }
        if revoked.is_none() {
            return Err(invalid(
                "v2.require_listed = false needs v2.revoked (a revocation list, e.g. revoked = \"revoked.txt\"): without one, a token accepted by its signature could never be taken back",
            ));
        }
        if file.deployment.is_none() {
            return Err(invalid(
                "v2.require_listed = false needs v2.deployment (mint tokens with `token new --deployment NAME`): otherwise a token of another deployment signed by the same issuer is accepted here",
            ));
        }
    }
    let revoked_max_age = match &file.revoked_max_age {
        None => Duration::from_secs(7 * 86_400),
        Some(s) => humantime::parse_duration(s.trim()).map_err(|_| {
            invalid(format!(
                "v2.revoked_max_age `{s}`: write a duration like 7d or 36h"
            ))
        })?,
    };
    Ok(crate::dmz::v2::V2Config {
        keys,
        renewal_keys,
        issuers,
        require_listed,
        revoked,
        revoked_max_age,
        deployment: file.deployment.clone(),
        trust_lb: file.trust_lb,
        tls_keys,
        accept_v1_until,
    })
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_connections: Option<usize>,
    pub handshake_timeout: Option<String>,
    pub handshakes_per_ip: Option<f64>,
    pub handshake_burst: Option<f64>,
    pub sessions_per_agent_token: Option<usize>,
    pub sessions_per_connector_token: Option<usize>,
    pub opens_per_token: Option<f64>,
    pub streams_per_session: Option<usize>,
    pub max_streams: Option<usize>,
    pub unauth_per_addr: Option<usize>,
    pub head_timeout: Option<String>,
    pub streams_per_token: Option<usize>,
    pub routes_per_connector: Option<usize>,
    pub open_meta_bytes: Option<usize>,
    pub pending_inner_sessions: Option<usize>,
    pub udp_associations_per_token: Option<usize>,
    pub udp_associations: Option<usize>,
    pub udp_datagrams_per_token: Option<f64>,
    pub udp_datagrams: Option<f64>,
    pub route_wait_at_start: Option<String>,
    pub route_waiting_per_token: Option<usize>,
    pub route_waiting: Option<usize>,
}

/// `[tunnel]`, one struct for every role (`uplink::tuning`).
pub use uplink::tuning::TunnelFile;

pub fn default_instance_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_else(|| "sallyport".to_string())
}

/// Normalises a path prefix: "" or "/x/y" (leading slash, no trailing slash).
pub fn normalize_prefix(p: &str) -> Result<String, ConfigError> {
    let t = p.trim().trim_end_matches('/');
    if t.is_empty() {
        return Ok(String::new());
    }
    if !t.starts_with('/') || t.contains(['?', '#', ' ']) {
        return Err(invalid(format!(
            "--prefix `{p}` must be a path such as /sallyport"
        )));
    }
    Ok(t.to_string())
}

/// A network (`10.0.0.0/24`) or a single address (`10.0.0.5`, taken as /32 or /128).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{s}` is not an address or network such as 10.0.0.5 or 10.0.0.0/24"))
}

/// Where the inner key lives when not configured: beside the agent token file.
pub fn default_inner_key_path(agent_tokens: &Path) -> PathBuf {
    match agent_tokens.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join("inner.key"),
        _ => PathBuf::from("inner.key"),
    }
}

/// The inner key file a DMZ configured by `args` uses (for `sallyport-gateway inner-key`).
pub fn inner_key_path(args: &DmzArgs) -> Result<PathBuf, ConfigError> {
    if let Some(p) = &args.inner_key {
        return Ok(p.clone());
    }
    let file: DmzFile = match &args.config {
        Some(p) => read_toml(p)?,
        None => DmzFile::default(),
    };
    let base = args.config.as_deref();
    if let Some(p) = file.inner_key {
        return Ok(relative_to(base, p));
    }
    let tokens = args
        .agent_tokens
        .clone()
        .or(file.agent_tokens.map(|p| relative_to(base, p)))
        .ok_or_else(|| {
            invalid("give --inner-key FILE, or the DMZ's --config/--agent-tokens to find it")
        })?;
    Ok(default_inner_key_path(&tokens))
}

pub fn dmz_config(args: DmzArgs) -> Result<DmzConfig, ConfigError> {
    let file: DmzFile = match &args.config {
        Some(p) => read_toml(p)?,
        None => DmzFile::default(),
    };
    let base = args.config.as_deref();
    let admin = crate::admin::config(&args.admin, &file.admin, base)?;
    let rel = |p: PathBuf| relative_to(base, p);
    let plain = args.plain || file.plain;
    let cert = args.tls_cert.or(file.tls_cert.map(rel));
    let key = args.tls_key.or(file.tls_key.map(|p| relative_to(base, p)));
    let tls_key_pin = cert.as_deref().and_then(|c| {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let der = CertificateDer::pem_file_iter(c).ok()?.next()?.ok()?;
        egress::cert::key_pin(&der)
    });
    let ciphers: crate::certs::Ciphers = match &file.tls_ciphers {
        Some(c) if plain => {
            return Err(invalid(format!(
                "tls_ciphers = {c:?} with plain (--plain or plain = true): the load balancer's TLS settings choose the ciphers; remove tls_ciphers"
            )))
        }
        Some(c) => c.parse().map_err(invalid)?,
        None => crate::certs::Ciphers::Default,
    };
    let tls = match (plain, cert, key) {
        (true, None, None) => None,
        (true, _, _) => return Err(invalid("--plain and --tls-cert/--tls-key exclude each other: pick one")),
        (false, Some(c), Some(k)) => Some(crate::certs::load_server_config(&c, &k, ciphers).map_err(|e| invalid(e.to_string()))?),
        (false, _, _) => {
            return Err(invalid(
                "TLS needs both --tls-cert and --tls-key (or tls_cert/tls_key in the config); use --plain behind a TLS-terminating load balancer",
            ))
        }
    };
    let agent_tokens = args
        .agent_tokens
        .or(file.agent_tokens.map(|p| relative_to(base, p)))
        .ok_or_else(|| invalid("--agent-tokens FILE is required (create one with `sallyport-gateway token new --kind agent`)"))?;
    let connector_tokens = args
        .connector_tokens
        .or(file.connector_tokens.map(|p| relative_to(base, p)))
        .ok_or_else(|| invalid("--connector-tokens FILE is required (create one with `sallyport-gateway token new --kind connector`)"))?;
    let agent_tokens =
        Arc::new(ReloadingStore::open(&agent_tokens).map_err(|e| invalid(e.to_string()))?);
    let connector_tokens =
        Arc::new(ReloadingStore::open(&connector_tokens).map_err(|e| invalid(e.to_string()))?);
    let mut limits = Limits::default();
    let l = &file.limits;
    if let Some(v) = l.max_connections {
        limits.max_connections = v.max(1);
    }
    if let Some(v) = &l.handshake_timeout {
        limits.handshake_timeout = duration(v, "limits.handshake_timeout")?;
    }
    if let Some(v) = l.handshakes_per_ip {
        limits.handshakes_per_ip = v;
    }
    if let Some(v) = l.handshake_burst {
        limits.handshake_burst = v;
    }
    if let Some(v) = l.sessions_per_agent_token {
        limits.sessions_per_agent_token = v;
    }
    if let Some(v) = l.sessions_per_connector_token {
        limits.sessions_per_connector_token = v;
    }
    if let Some(v) = l.opens_per_token {
        limits.opens_per_token = v;
    }
    if let Some(v) = l.streams_per_session {
        limits.streams_per_session = v;
    }
    if let Some(v) = l.max_streams {
        limits.max_streams = v;
    }
    if let Some(v) = &l.head_timeout {
        limits.head_timeout = duration(v, "limits.head_timeout")?;
    }
    if let Some(v) = &l.route_wait_at_start {
        limits.route_wait_at_start = duration(v, "limits.route_wait_at_start")?;
        let max = crate::dmz::limits::ROUTE_WAIT_MAX;
        if limits.route_wait_at_start > max {
            return Err(invalid(format!(
                "limits.route_wait_at_start: `{v}` is over {}s (an agent gives up on a new connection after 30 s by default)",
                max.as_secs()
            )));
        }
    }
    if let Some(v) = l.route_waiting_per_token {
        limits.route_waiting_per_token = v;
    }
    if let Some(v) = l.route_waiting {
        limits.route_waiting = v;
    }
    if let Some(v) = l.unauth_per_addr {
        limits.unauth_per_addr = v.max(1);
    }
    if let Some(v) = l.streams_per_token {
        limits.streams_per_token = v;
    }
    if let Some(v) = l.routes_per_connector {
        limits.routes_per_connector = v;
    }
    if let Some(v) = l.open_meta_bytes {
        limits.open_meta_bytes = v;
    }
    if let Some(v) = l.pending_inner_sessions {
        limits.pending_inner_sessions = v;
    }
    if let Some(v) = l.udp_associations_per_token {
        limits.udp_associations_per_token = v;
    }
    if let Some(v) = l.udp_associations {
        limits.udp_associations = v;
    }
    if let Some(v) = l.udp_datagrams_per_token {
        limits.udp_datagrams_per_token = v;
    }
    if let Some(v) = l.udp_datagrams {
        limits.udp_datagrams = v;
    }
    let mut session = tunnel::Config::new(tunnel::Role::Dmz, false);
    session.datagrams = true;
    session.resume = true;
    file.tunnel.apply(&mut session)?;
    file.tunnel.refuse_keys_of_others("DMZ", true)?;
    let mut trusted = file
        .trusted_proxies
        .iter()
        .map(|t| parse_net(t).map_err(|e| invalid(format!("trusted_proxies: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    trusted.extend(args.trusted_proxies);
    let forwarded_header = match args
        .forwarded_header
        .as_deref()
        .or(file.forwarded_header.as_deref())
    {
        Some(h) => h.parse().map_err(invalid)?,
        None => crate::dmz::ForwardedHeader::default(),
    };
    let inner_path = args
        .inner_key
        .or(file.inner_key.map(|p| relative_to(base, p)))
        .unwrap_or_else(|| default_inner_key_path(agent_tokens.path()));
    let (inner_key, created) = crate::dmz::inner::load_or_create(&inner_path).map_err(invalid)?;
    if created {
        tracing::info!(path = %inner_path.display(), key = %inner_key.public(), "created the inner-channel key; agents pin it at enrollment");
    }
    let inner_key = Arc::new(inner_key);
    let v2 = v2_config(
        &file.v2,
        base,
        agent_tokens.path(),
        inner_key.clone(),
        tls_key_pin.as_deref(),
    )?;
    let drain_delay = match args.drain_delay.or(file.drain_delay) {
        Some(d) => duration(&d, "drain_delay")?,
        None => Duration::from_secs(10),
    };
    Ok(DmzConfig {
        admin,
        drain_delay,
        v2,
        inner_key: Some(inner_key),
        tls_key_pin,
        listen: args.listen.or(file.listen).unwrap_or_else(|| {
            "0.0.0.0:443"
                .parse()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 443)))
        }),
        tls,
        prefix: normalize_prefix(
            args.prefix
                .as_deref()
                .or(file.prefix.as_deref())
                .unwrap_or(""),
        )?,
        agent_tokens,
        connector_tokens,
        trusted_proxies: trusted,
        forwarded_header,
        instance_id: args
            .instance_id
            .or(file.instance_id)
            .unwrap_or_else(default_instance_id),
        limits,
        session,
        reload_every: Duration::from_secs(2),
    })
}

// ---------------------------------------------------------------------------------------------
// Connector

/// `sallyport-gateway connector` flags.
#[derive(Args, Debug, Default, Clone)]
pub struct ConnectorArgs {
    /// TOML config file; flags override its values.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// How to reach the DMZ (shared with the agent; `--ca` pins the DMZ's CA for v1 tokens).
    #[command(flatten)]
    pub uplink: UplinkArgs,
    /// Allow-list rule: `db.internal:5432`, `*.internal:22`, `10.20.0.0/16:443`, optionally
    /// followed by ` users=a,b groups=c` and ` protocol=tls|ssh|postgres|http|any` (for tls,
    /// ` sni=NAME,*.SUFFIX`). Repeatable.
    #[arg(long = "allow")]
    pub allow: Vec<String>,
    /// UDP allow-list rule (SOCKS5 UDP), same form as --allow: `dns.internal:53 groups=dev`.
    /// Without any, no UDP is relayed. Repeatable.
    #[arg(long = "allow-udp")]
    pub allow_udp: Vec<String>,
    /// Route to advertise to the DMZ (default: the routes of the allow-list). Repeatable.
    #[arg(long = "advertise")]
    pub advertise: Vec<String>,
    /// Static host entry NAME=IP (or NAME=IP,IP,...), consulted before DNS. Repeatable.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Sessions to keep up to the gateway [default: 2].
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Timeout for connecting to internal services and to the gateway [default: 10s].
    #[arg(long)]
    pub connect_timeout: Option<String>,
    /// How long a client on a rule with `protocol=` has to send its first bytes [default: 5s].
    #[arg(long)]
    pub protocol_timeout: Option<String>,
    /// How long a stream whose agent lost its session waits to be resumed before its service
    /// connection is closed [default: 60s].
    #[arg(long)]
    pub resume_grace: Option<String>,
    /// Name of this connector in logs [default: host name].
    #[arg(long)]
    pub instance_id: Option<String>,
    /// The admin listener: `/metrics` and the admin page.
    #[command(flatten)]
    pub admin: crate::admin::AdminArgs,
    /// Be the issuer: answer agents' token renewals with this renewal key (`renew.key`, made by
    /// `token new`), and nothing else (docs/protocol.md, "Renewal"). Advertises only
    /// `issuer.sallyport.invalid:1`, which its token's routes must name exactly.
    #[arg(long)]
    pub renewal_key: Option<PathBuf>,
    /// The issuer: the public key file of the admin's token issuer [default: issuer.pub beside
    /// --renewal-key].
    #[arg(long)]
    pub issuer_pub: Option<PathBuf>,
    /// The issuer: its ledger of the last key signed for each id [default: renew.ledger beside
    /// --renewal-key].
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// The issuer: ids whose renewal the admin stopped, one a line (re-read on every request).
    #[arg(long)]
    pub no_renew: Option<PathBuf>,
    /// The issuer: longest lifetime of a renewed token [default: 90d].
    #[arg(long)]
    pub max_lifetime: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ConnectorFile {
    // The keys of `UplinkArgs` (serde's `flatten` cannot be combined with
    // `deny_unknown_fields`).
    /// One URL, or a list for several DMZ instances.
    pub gateway: Option<uplink::config::Gateways>,
    pub token_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub proxy: Option<String>,
    pub pac: Option<String>,
    pub proxy_user: Option<String>,
    pub proxy_credentials: Option<PathBuf>,
    pub tls: Option<String>,
    pub client_cert: Option<PathBuf>,
    pub client_cert_password_file: Option<PathBuf>,
    #[serde(default)]
    pub allow: Vec<Rule>,
    /// The UDP allow-list (SOCKS5 UDP); empty: no UDP.
    #[serde(default)]
    pub udp: Vec<Rule>,
    #[serde(default)]
    pub advertise: Vec<Route>,
    #[serde(default)]
    pub hosts: HashMap<String, HostsValue>,
    pub sessions: Option<usize>,
    pub connect_timeout: Option<String>,
    pub protocol_timeout: Option<String>,
    pub resume_grace: Option<String>,
    pub instance_id: Option<String>,
    #[serde(default)]
    pub tunnel: TunnelFile,
    #[serde(default)]
    pub admin: crate::admin::AdminFile,
}

impl ConnectorFile {
    /// The keys shared with the agent, as `UplinkArgs`.
    fn uplink(&self) -> UplinkArgs {
        UplinkArgs {
            gateway: self
                .gateway
                .clone()
                .map(|g| g.into_vec())
                .unwrap_or_default(),
            token_file: self.token_file.clone(),
            ca: self.ca.clone(),
            proxy: self.proxy.clone(),
            pac: self.pac.clone(),
            proxy_user: self.proxy_user.clone(),
            proxy_credentials: self.proxy_credentials.clone(),
            tls: self.tls.clone(),
            client_cert: self.client_cert.clone(),
            client_cert_password_file: self.client_cert_password_file.clone(),
        }
    }
}

/// `hosts` values: one address or a list; anything else is kept as read, so that the error
/// can name the key and the expected form (see `hosts_entry`).
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum HostsValue {
    One(IpAddr),
    Many(Vec<IpAddr>),
    Other(toml::Value),
}

/// One `[hosts]` entry as addresses, or an error naming the key and the form expected. An
/// unquoted name with dots (`db.internal = "10.0.0.1"`) is a TOML table (`db` → `internal`):
/// said so, with the quoted form.
fn hosts_entry(key: &str, v: HostsValue, file: &Path) -> Result<Vec<IpAddr>, ConfigError> {
    let example =
        |k: &str| format!("\"{k}\" = \"10.0.0.1\" or \"{k}\" = [\"10.0.0.1\", \"10.0.0.2\"]");
    match v {
        HostsValue::One(a) => Ok(vec![a]),
        HostsValue::Many(a) => Ok(a),
        HostsValue::Other(toml::Value::Table(t)) => {
            // The dotted name the admin wrote, as far as it goes (first entry).
            let mut name = key.to_string();
            let mut inner = Some(&t);
            while let Some((k, v)) = inner.and_then(|t| t.iter().next()) {
                name.push('.');
                name.push_str(k);
                inner = v.as_table();
            }
            Err(invalid(format!(
                "{}: [hosts] key `{name}`: a host name with dots must be quoted, or TOML reads it as nested tables; write {}",
                file.display(),
                example(&name)
            )))
        }
        HostsValue::Other(other) => Err(invalid(format!(
            "{}: [hosts] key `{key}`: expected an IP address or a list of them, as strings, not {}; write {}",
            file.display(),
            match &other {
                toml::Value::String(s) => format!("`{s}`"),
                v => format!("a {}", v.type_str()),
            },
            example(key)
        ))),
    }
}

pub use uplink::config::read_token;

pub fn connector_config(args: ConnectorArgs) -> Result<ConnectorConfig, ConfigError> {
    let file: ConnectorFile = match &args.config {
        Some(p) => read_toml(p)?,
        None => ConnectorFile::default(),
    };
    let base = args.config.as_deref();
    let admin = crate::admin::config(&args.admin, &file.admin, base)?;
    let up = args.uplink.clone().or_file(file.uplink(), base);
    let gateways = up.gateway_urls("")?;
    let gateway = gateways[0].clone();
    if gateways.iter().any(|g| g.tls != gateway.tls) {
        return Err(invalid(
            "--gateway: give every instance the same scheme (all wss:// or all ws://)",
        ));
    }
    let token = read_token(up.token_file.as_deref())?;
    let v2 = if tunnel::token::is_v2(token.expose()) {
        let t: tunnel::token::Token = token
            .expose()
            .parse()
            .map_err(|e: tunnel::token::TokenError| invalid(e.to_string()))?;
        if t.claims().kind != tunnel::token::Kind::Connector {
            return Err(invalid(format!(
                "the token for {} is an agent token; a connector needs one made with `token new --kind connector`",
                t.claims().id
            )));
        }
        Some(Arc::new(t))
    } else {
        None
    };
    let ca = up.ca.clone();
    let tls = if gateway.tls && v2.is_some() {
        Some(crate::connector::tls_config_v2().map_err(|e| invalid(e.to_string()))?)
    } else if gateway.tls {
        Some(crate::connector::tls_config(ca.as_deref()).map_err(|e| invalid(e.to_string()))?)
    } else {
        None
    };
    let mut rules = file.allow;
    for a in &args.allow {
        rules.push(
            a.parse::<Rule>()
                .map_err(|e| invalid(format!("--allow: {e}")))?,
        );
    }
    let issuer = issuer_config(&args)?;
    if rules.is_empty() && issuer.is_none() {
        return Err(invalid("the allow-list is empty: add --allow 'db.internal:5432' (or allow = [...] in the config); a connector without rules serves nothing"));
    }
    let mut udp_rules = file.udp;
    for a in &args.allow_udp {
        udp_rules.push(
            a.parse::<Rule>()
                .map_err(|e| invalid(format!("--allow-udp: {e}")))?,
        );
    }
    if issuer.is_some() && !(rules.is_empty() && udp_rules.is_empty() && args.advertise.is_empty())
    {
        return Err(invalid("--renewal-key makes this connector the issuer, which serves nothing else: run it as its own process, without --allow, --allow-udp or --advertise"));
    }
    let mut routes = file.advertise;
    for a in &args.advertise {
        routes.push(
            a.parse::<Route>()
                .map_err(|e| invalid(format!("--advertise: {e}")))?,
        );
    }
    if issuer.is_some() {
        routes = vec![format!("{}:{}", tunnel::renew::HOST, tunnel::renew::PORT)
            .parse::<Route>()
            .expect("the reserved route parses")];
    } else if routes.is_empty() {
        routes = rules
            .iter()
            .chain(&udp_rules)
            .map(|r| r.route.clone())
            .collect();
        let mut seen = std::collections::HashSet::new();
        routes.retain(|r| seen.insert(r.to_string()));
        // By default, advertise only what a v2 credential covers: an address rule that is
        // there to list a special address (`127.0.0.1/32:23080`) is not a route the DMZ would
        // keep, and advertising it only makes the DMZ warn.
        if let Some(t) = &v2 {
            let covered: Vec<Route> = t
                .claims()
                .routes
                .iter()
                .filter_map(|r| r.parse().ok())
                .collect();
            if !covered.is_empty() {
                routes.retain(|r| covered.iter().any(|c| c.covers(r)));
            }
        }
    }
    let mut hosts: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for (k, v) in file.hosts {
        let ips = hosts_entry(&k, v, base.unwrap_or(Path::new("the config file")))?;
        let name = normalize_host_key(&k)?;
        hosts.insert(name, ips);
    }
    for h in &args.hosts {
        let (name, ips) = h
            .split_once('=')
            .ok_or_else(|| invalid(format!("--host `{h}`: expected NAME=IP[,IP]")))?;
        let ips = ips
            .split(',')
            .map(|s| s.trim().parse::<IpAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("--host `{h}`: {e}")))?;
        hosts.insert(normalize_host_key(name)?, ips);
    }
    let connect_timeout = match args.connect_timeout.or(file.connect_timeout) {
        Some(s) => duration(&s, "connect_timeout")?,
        None => Duration::from_secs(10),
    };
    let protocol_timeout = match args.protocol_timeout.or(file.protocol_timeout) {
        Some(s) => duration(&s, "protocol_timeout")?,
        None => crate::connector::PROTOCOL_TIMEOUT,
    };
    if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&protocol_timeout) {
        return Err(invalid(format!(
            "protocol_timeout {protocol_timeout:?}: must be between 100ms and 60s (how long a client on a rule with protocol= has to send its first bytes)"
        )));
    }
    let sessions = args.sessions.or(file.sessions).unwrap_or(2);
    if sessions == 0 || sessions > 64 {
        return Err(invalid("--sessions must be between 1 and 64"));
    }
    let mut session = tunnel::Config::new(tunnel::Role::Connector, true);
    session.datagrams = true;
    let grace = match args.resume_grace.clone().or(file.resume_grace.clone()) {
        Some(s) => duration(&s, "resume_grace")?,
        None => tunnel::resumable::DEFAULT_GRACE,
    };
    if grace > Duration::from_secs(3600) {
        return Err(invalid(format!(
            "resume_grace {grace:?}: at most 1h (a suspended stream holds its service connection that long)"
        )));
    }
    let resume = Arc::new(crate::connector::resume::Resumes::new(grace));
    session.resume = true;
    session.resume_id = resume.id.clone();
    file.tunnel.apply(&mut session)?;
    file.tunnel.refuse_keys_of_others("connector", false)?;
    let transport = file.tunnel.transport()?.unwrap_or_default();
    let http_mode = file.tunnel.http_mode()?;
    let always_inner = file.tunnel.inner_always()?;
    if always_inner && v2.is_none() {
        return Err(invalid(
            "tunnel.inner = \"always\" needs a version 2 connector token (`sallyport-gateway token new --kind connector`): a v1 connector has no inner channel",
        ));
    }
    let mut egress = up.egress(up.proxy_credentials.as_deref(), false)?;
    egress.native_tls = up.native_tls(v2.is_some())?;
    Ok(ConnectorConfig {
        admin,
        issuer,
        ops: Default::default(),
        gateways,
        way: egress::Way::new(egress),
        token,
        v2,
        tls,
        policy: Arc::new(Policy::with_local_addresses(rules)),
        udp: Arc::new(Policy::with_local_addresses(udp_rules)),
        routes,
        hosts,
        sessions,
        connect_timeout,
        protocol_timeout,
        token_source: uplink::config::token_source(up.token_file.as_deref()),
        transport,
        http_mode,
        always_inner,
        random_masks: file.tunnel.random_masks()?,
        instance_id: args
            .instance_id
            .or(file.instance_id)
            .unwrap_or_else(default_instance_id),
        session,
        resume,
    })
}

/// The issuer's settings (`--renewal-key` and friends), checked before anything is dialled.
fn issuer_config(
    args: &ConnectorArgs,
) -> Result<Option<Arc<crate::connector::IssuerConfig>>, ConfigError> {
    let Some(key_path) = &args.renewal_key else {
        for (set, flag) in [
            (args.issuer_pub.is_some(), "--issuer-pub"),
            (args.ledger.is_some(), "--ledger"),
            (args.no_renew.is_some(), "--no-renew"),
            (args.max_lifetime.is_some(), "--max-lifetime"),
        ] {
            if set {
                return Err(invalid(format!(
                    "{flag} is a setting of the issuer: give --renewal-key too"
                )));
            }
        }
        return Ok(None);
    };
    let text = uplink::config::read_secret_file(key_path)?;
    let key = tunnel::token::Issuer::from_file_text(&text)
        .map_err(|e| invalid(format!("--renewal-key {}: {e}", key_path.display())))?;
    let beside = |name: &str| key_path.with_file_name(name);
    let pub_path = args
        .issuer_pub
        .clone()
        .unwrap_or_else(|| beside("issuer.pub"));
    let pub_text = std::fs::read_to_string(&pub_path).map_err(|e| {
        invalid(format!(
            "--issuer-pub {}: {e} (copy issuer.pub from the admin host)",
            pub_path.display()
        ))
    })?;
    let mut accept = vec![key.public()];
    accept.extend(read_key_lines(&pub_text, &pub_path)?);
    let max_lifetime = match &args.max_lifetime {
        Some(s) => duration(s, "max_lifetime")?,
        None => Duration::from_secs(90 * 86_400),
    };
    Ok(Some(Arc::new(crate::connector::IssuerConfig::new(
        key,
        accept,
        args.ledger
            .clone()
            .unwrap_or_else(|| beside("renew.ledger")),
        args.no_renew.clone(),
        max_lifetime,
    ))))
}

fn normalize_host_key(name: &str) -> Result<String, ConfigError> {
    match policy::parse_host(name) {
        Ok(policy::Host::Name(n)) => Ok(n),
        Ok(policy::Host::Ip(_)) => Err(invalid(format!(
            "hosts: `{name}` is an address, not a name"
        ))),
        Err(e) => Err(invalid(format!("hosts: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_normalised_or_refused() {
        assert_eq!(normalize_prefix("/").unwrap(), "");
        assert_eq!(normalize_prefix("/sp/").unwrap(), "/sp");
        assert!(normalize_prefix("sp").is_err());
    }

    #[test]
    fn a_toml_error_names_file_and_line() {
        let e = parse_toml::<DmzFile>(
            "listen = \"0.0.0.0:443\"\nbogus = 1\n",
            Path::new("dmz.toml"),
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("dmz.toml line 2"), "{s}");
        assert!(s.contains("bogus"), "{s}");
    }

    /// A fresh directory for one test (`tag` tells the tests of one run apart).
    fn test_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sp-dmz-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The DMZ's configuration from `toml`, written as `dir/dmz.toml`.
    fn dmz_in(dir: &Path, toml: &str) -> Result<DmzConfig, ConfigError> {
        let path = dir.join("dmz.toml");
        std::fs::write(&path, toml).unwrap();
        dmz_config(DmzArgs {
            config: Some(path),
            ..DmzArgs::default()
        })
    }

    #[test]
    fn a_route_wait_longer_than_an_agent_waits_for_its_open_is_refused() {
        let dir = test_dir("config-route-wait");
        std::fs::write(dir.join("agents.toml"), "").unwrap();
        std::fs::write(dir.join("connectors.toml"), "").unwrap();
        let toml = |wait: &str| {
            format!(
                "plain = true\nagent_tokens = \"agents.toml\"\nconnector_tokens = \"connectors.toml\"\n\
                 [limits]\nroute_wait_at_start = \"{wait}\"\n"
            )
        };
        let cfg = dmz_in(&dir, &toml("25s")).unwrap();
        assert_eq!(cfg.limits.route_wait_at_start, Duration::from_secs(25));
        let e = dmz_in(&dir, &toml("40s")).unwrap_err().to_string();
        assert!(
            e.contains("limits.route_wait_at_start") && e.contains("over 25s"),
            "{e}"
        );
    }

    #[test]
    fn tls_ciphers_is_default_or_aes_256_gcm_and_never_with_plain() {
        let dir = test_dir("config");
        let dmz_with = |toml: &str| dmz_in(&dir, toml);
        let e = dmz_with("tls_ciphers = \"aes128\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tls_ciphers = \"aes128\"") && e.contains("\"aes-256-gcm\""),
            "{e}"
        );
        let e = dmz_with("plain = true\ntls_ciphers = \"aes-256-gcm\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--plain") && e.contains("remove tls_ciphers"),
            "{e}"
        );
        // A valid value gets past the check, to the next thing the file lacks.
        let e = dmz_with("tls_ciphers = \"aes-256-gcm\"\n")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("tls_ciphers"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_ciphers_reaches_the_listener() {
        let dir = test_dir("ciphers");
        let pki = crate::certs::trial_pki(&["gw.example".to_string()]).unwrap();
        crate::certs::write_trial_pki(&pki, &dir).unwrap();
        std::fs::write(dir.join("agents.toml"), "").unwrap();
        std::fs::write(dir.join("connectors.toml"), "").unwrap();
        let suites = |ciphers: &str| {
            let toml = format!(
                "tls_cert = \"gateway.crt\"\ntls_key = \"gateway.key\"\n{ciphers}\n\
                 agent_tokens = \"agents.toml\"\nconnector_tokens = \"connectors.toml\"\n"
            );
            let cfg = dmz_in(&dir, &toml).unwrap();
            let tls = cfg.tls.expect("a TLS listener");
            tls.crypto_provider()
                .cipher_suites
                .iter()
                .map(|s| format!("{:?}", s.suite()))
                .collect::<Vec<_>>()
        };
        let narrowed = suites("tls_ciphers = \"aes-256-gcm\"");
        let all = suites("");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!narrowed.is_empty());
        assert!(
            narrowed.iter().all(|s| s.contains("AES_256_GCM")),
            "{narrowed:?}"
        );
        assert!(all.iter().any(|s| s.contains("AES_128_GCM")), "{all:?}");
    }

    #[test]
    fn the_shipped_example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let dmz: DmzFile = read_toml(&dir.join("dmz.toml")).unwrap();
        assert!(dmz.agent_tokens.is_some());
        let conn: ConnectorFile = read_toml(&dir.join("connector.toml")).unwrap();
        assert!(!conn.allow.is_empty());
        for f in ["agents.toml", "connectors.toml"] {
            crate::auth::TokenStore::load(&dir.join(f)).unwrap();
        }
    }
}
