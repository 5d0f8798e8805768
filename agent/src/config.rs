//! Agent configuration: the TOML file (by default `agent.toml` in the per-user config folder),
//! flags that override it, and validation into [`AgentConfig`] before any port is bound.

use clap::Args;
use egress::{GatewayUrl, TlsOptions};
use serde::Deserialize;
use socks::LocalAuth;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tunnel::Dest;

pub use uplink::config::ConfigError;
use uplink::config::{duration, invalid, UplinkArgs};

/// A token as text (shared with the connector: `uplink::Secret`); `Debug` never shows it.
pub use uplink::Secret;

/// A static forward: a local port that always leads to one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub dest: Dest,
}

impl std::str::FromStr for Forward {
    type Err = String;
    /// `127.0.0.1:15432=db.internal:5432` (or `15432=db.internal:5432` for loopback).
    fn from_str(s: &str) -> Result<Forward, String> {
        let (l, d) = s.split_once('=').ok_or_else(|| {
            format!(
                "forward `{s}`: expected LOCAL=HOST:PORT, e.g. 127.0.0.1:15432=db.internal:5432"
            )
        })?;
        let listen: SocketAddr = match l.parse::<u16>() {
            Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
            Err(_) => l.parse().map_err(|_| {
                format!("forward `{s}`: `{l}` is not an address such as 127.0.0.1:15432")
            })?,
        };
        let dest = parse_dest(d).map_err(|e| format!("forward `{s}`: {e}"))?;
        Ok(Forward { listen, dest })
    }
}

/// `host:port` or `[v6]:port`.
pub fn parse_dest(d: &str) -> Result<Dest, String> {
    let (host, port) = if let Some(rest) = d.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| format!("`{d}` is not HOST:PORT"))?;
        (h, p)
    } else {
        d.rsplit_once(':')
            .ok_or_else(|| format!("`{d}` is not HOST:PORT"))?
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{port}` in `{d}` is not a port"))?;
    if host.is_empty() || port == 0 {
        return Err(format!("`{d}` is not HOST:PORT"));
    }
    Ok(Dest::new(host, port))
}

pub use uplink::TransportChoice;

/// `sallyport run` flags.
#[derive(Args, Debug, Default, Clone)]
pub struct AgentArgs {
    /// TOML config file [default: agent.toml in the per-user config folder, if present].
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// How to reach the gateway (shared with the connector).
    #[command(flatten)]
    pub uplink: UplinkArgs,
    /// SOCKS5 listen address, or `off` [default: 127.0.0.1:1080].
    #[arg(long)]
    pub socks: Option<String>,
    /// HTTP proxy listen address, or `off` [default: 127.0.0.1:8118].
    #[arg(long)]
    pub http: Option<String>,
    /// Static forward LOCAL=HOST:PORT, e.g. 127.0.0.1:15432=db.internal:5432. Repeatable.
    #[arg(long = "forward")]
    pub forwards: Vec<String>,
    /// Allow listening on non-loopback addresses (requires local authentication).
    #[arg(long)]
    pub allow_remote_clients: bool,
    /// Local proxy user (password from SALLYPORT_LOCAL_PASSWORD or local_auth in the config).
    #[arg(long)]
    pub local_user: Option<String>,
    /// How long a SOCKS5/CONNECT client waits for the far end to accept [default: 30s].
    #[arg(long)]
    pub open_timeout: Option<String>,
    /// How long a connection whose gateway session was lost keeps trying to resume before the
    /// app sees a reset; `0s` turns resumable streams off [default: 60s].
    #[arg(long)]
    pub resume_grace: Option<String>,
    /// Timeout for connecting to the gateway [default: 10s].
    #[arg(long)]
    pub connect_timeout: Option<String>,
    /// Transport to the gateway: auto (WebSocket, else HTTP when a proxy strips the upgrade),
    /// websocket or http [default: auto].
    #[arg(long)]
    pub transport: Option<String>,
    /// The gateway's inner-channel key (`x25519/…`, from `sallyport-gateway inner-key`).
    #[arg(long)]
    pub gateway_inner_key: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    // The keys of `UplinkArgs` (gateway, token_file, ca, proxy, pac, proxy_user,
    // proxy_credentials): serde's `flatten` cannot be combined with `deny_unknown_fields`.
    /// One URL, or a list for several DMZ instances.
    pub gateway: Option<uplink::config::Gateways>,
    pub token_file: Option<PathBuf>,
    /// The token is in the OS keychain (written by `sallyport enroll`).
    #[serde(default)]
    pub token_keychain: bool,
    /// The gateway's key pin from enrollment (`sha256/<base64>`).
    pub gateway_key: Option<String>,
    /// The gateway's inner-channel key from enrollment (`x25519/<base64>`).
    pub gateway_inner_key: Option<String>,
    pub ca: Option<PathBuf>,
    pub proxy: Option<String>,
    pub pac: Option<String>,
    pub proxy_user: Option<String>,
    pub proxy_credentials: Option<PathBuf>,
    pub socks: Option<String>,
    pub http: Option<String>,
    #[serde(default)]
    pub forwards: Vec<String>,
    #[serde(default)]
    pub allow_remote_clients: bool,
    pub local_auth: Option<LocalAuthFile>,
    pub open_timeout: Option<String>,
    pub resume_grace: Option<String>,
    pub connect_timeout: Option<String>,
    pub instance_id: Option<String>,
    #[serde(default)]
    pub tunnel: TunnelFile,
    #[serde(default)]
    pub proxy_auth: ProxyAuthFile,
}

/// `[proxy_auth]`: admin policy on what the corporate proxy may be told.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ProxyAuthFile {
    /// `allow`, or `refuse` (the default): answer NTLM, Digest and NTLM-capable Negotiate from
    /// proxies found by WPAD, which anyone on the LAN can answer.
    pub wpad_credentials: Option<String>,
}

impl AgentFile {
    /// The keys shared with the connector, as `UplinkArgs`.
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
            // `--tls`, `--client-cert`: flags only.
            ..Default::default()
        }
    }
}

impl ProxyAuthFile {
    fn wpad_credentials(&self) -> Result<bool, ConfigError> {
        match self.wpad_credentials.as_deref() {
            None | Some("refuse") => Ok(false),
            Some("allow") => Ok(true),
            Some(other) => Err(invalid(format!(
                "proxy_auth.wpad_credentials `{other}`: use allow or refuse"
            ))),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct LocalAuthFile {
    pub user: String,
    /// A file holding the password (keep it mode 0600).
    pub password_file: PathBuf,
}

pub use uplink::tuning::TunnelFile;

/// The validated agent configuration.
#[derive(Clone)]
pub struct AgentConfig {
    /// The first gateway given: the one `doctor` and `enroll` talk to.
    pub gateway: GatewayUrl,
    /// The other DMZ instances (`--gateway` repeated), failed over to in order.
    pub failover: Vec<GatewayUrl>,
    pub token: Secret,
    /// Where the token came from, for messages: the token file, `SALLYPORT_TOKEN`, the OS
    /// keychain or enrollment.
    pub token_source: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// How to leave the network: candidates, probing and what worked (see `egress::probe`).
    pub way: Arc<egress::Way>,
    /// Subject names of the `--ca` certificates (the gateway's own CA, when given).
    pub gateway_ca_names: Vec<String>,
    /// `--ca` alone: a certificate issued by it is the gateway's own TLS (the bearer token may
    /// ride it); one issued by anything else, the OS store included, is not.
    pub gateway_anchor: Option<egress::CaAnchor>,
    pub socks: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub forwards: Vec<Forward>,
    pub allow_remote_clients: bool,
    pub local_auth: Option<Arc<LocalAuth>>,
    pub open_timeout: Duration,
    /// How long a stream whose session was lost keeps trying to resume.
    pub resume_grace: Duration,
    pub connect_timeout: Duration,
    /// How long an app connection waits for a gateway session while reconnecting.
    pub session_wait: Duration,
    /// The control socket for `sallyport status` (per-user; `None`: none).
    pub control: Option<PathBuf>,
    pub instance_id: String,
    pub session: tunnel::Config,
    /// The gateway's TLS key pin (enrollment): a connection presenting it is the gateway's own.
    pub gateway_key: Option<String>,
    /// The gateway's inner-channel key: with it, sessions over TLS that is not proven the
    /// gateway's own run inside the inner channel.
    pub inner_key: Option<tunnel::inner::PublicKey>,
    /// Use the inner channel even over the gateway's own TLS.
    pub always_inner: bool,
    /// `[tunnel] websocket_masks = "random"`.
    pub random_masks: bool,
    pub transport: TransportChoice,
    /// Forced downstream mode of the HTTP transport (`None`: stream, switching when buffered).
    pub http_mode: Option<tunnel::http::DownMode>,
    /// While on the HTTP fallback (chosen automatically), WebSocket is tried again this often.
    pub websocket_retry: Duration,
    /// A protocol v2 token (`sp2_…`): the session runs the token-bound handshake and never
    /// sends a secret; `None` for a v1 bearer token.
    pub v2: Option<Arc<uplink::TokenCell>>,
    /// Where a renewed token is written back (`agent/src/renew.rs`).
    pub token_home: TokenHome,
}

/// Where the token lives, for writing a renewed one back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenHome {
    /// A 0600 file (`--token-file`).
    File(PathBuf),
    /// The OS keychain entry of this gateway URL (`sallyport enroll`).
    Keychain(String),
    /// `SALLYPORT_TOKEN`, or a token given on the way (enroll): nowhere to write to.
    Nowhere,
}

impl AgentConfig {
    /// How this agent reaches the gateway and sets up its session (shared with the connector).
    pub fn uplink(&self) -> uplink::Uplink {
        let mut session = self.session.clone();
        session.role = tunnel::Role::Agent;
        session.accept_streams = false;
        session.instance_id = self.instance_id.clone();
        uplink::Uplink {
            gateway: self.gateway.clone(),
            failover: self.failover.clone(),
            way: self.way.clone(),
            tls: self.tls.clone(),
            connect_timeout: self.connect_timeout,
            session,
            credential: match &self.v2 {
                Some(cell) => uplink::Credential::V2(cell.clone()),
                None => uplink::Credential::V1(uplink::v1::V1 {
                    token: self.token.clone(),
                    trust: uplink::v1::Trust::Prove {
                        inner_key: self.inner_key,
                        key_pin: self.gateway_key.clone(),
                        anchor: self.gateway_anchor.clone(),
                    },
                }),
            },
            token_source: self.token_source.clone(),
            transport: self.transport,
            http_mode: self.http_mode,
            always_inner: self.always_inner,
            random_masks: self.random_masks,
        }
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("gateway", &self.gateway.to_string())
            .field("token", &self.token)
            .field("socks", &self.socks)
            .field("http", &self.http)
            .field("forwards", &self.forwards)
            .field("local_auth", &self.local_auth)
            .finish()
    }
}

/// The per-user config file, e.g. `~/.config/sallyport/agent.toml`.
pub fn default_config_path() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "sallyport").map(|d| d.config_dir().join("agent.toml"))
}

/// The per-user proxy credentials file, e.g. `~/.config/sallyport/proxy-credentials`.
pub fn default_credentials_path() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "sallyport")
        .map(|d| d.config_dir().join("proxy-credentials"))
}

pub fn read_file(path: &Path) -> Result<AgentFile, ConfigError> {
    uplink::config::read_toml(path)
}

pub fn parse_file(text: &str, path: &Path) -> Result<AgentFile, ConfigError> {
    uplink::config::parse_toml(text, path)
}

fn listen_addr(
    v: Option<&str>,
    default: &str,
    flag: &str,
) -> Result<Option<SocketAddr>, ConfigError> {
    match v.unwrap_or(default) {
        "off" | "none" | "" => Ok(None),
        s => s.parse().map(Some).map_err(|_| {
            invalid(format!(
                "--{flag} `{s}` is not an address such as 127.0.0.1:1080 (or `off`)"
            ))
        }),
    }
}

pub use uplink::config::{check_token, read_token};

pub fn agent_config(args: AgentArgs) -> Result<AgentConfig, ConfigError> {
    agent_config_with(args, None, true)
}

/// [`agent_config`] with the token given (enrollment), and whether the per-user config file is
/// read when `-c` is not given.
pub fn agent_config_with(
    args: AgentArgs,
    token: Option<Secret>,
    read_default: bool,
) -> Result<AgentConfig, ConfigError> {
    let path = args
        .config
        .clone()
        .or_else(|| default_config_path().filter(|p| read_default && p.exists()));
    let file = match &path {
        Some(p) => read_file(p)?,
        None => AgentFile::default(),
    };
    let given_token_file = args.uplink.token_file.is_some();
    let up = args.uplink.clone().or_file(file.uplink(), path.as_deref());
    let gateways = up.gateway_urls(" (or run `sallyport demo` to try it locally)")?;
    let gateway = gateways[0].clone();
    let failover = gateways[1..].to_vec();
    if failover.iter().any(|g| g.tls != gateway.tls) {
        return Err(invalid(
            "--gateway: give every instance the same scheme (all wss:// or all ws://)",
        ));
    }
    let mut token_home = TokenHome::Nowhere;
    let (token, token_source) = match token {
        Some(t) => (t, "the token given to enroll".to_string()),
        None if !given_token_file && file.token_keychain => {
            let gw = gateway.to_string();
            let t = crate::enroll::keychain_token(&gw).ok_or_else(|| {
                invalid(format!(
                    "the token for {gw} is not in the OS keychain any more: run `sallyport enroll {gw}` again"
                ))
            })?;
            token_home = TokenHome::Keychain(gw.clone());
            (t, format!("the OS keychain (entry for {gw})"))
        }
        None => {
            let f = up.token_file.as_deref();
            if let Some(f) = f {
                token_home = TokenHome::File(f.to_path_buf());
            }
            (read_token(f)?, uplink::config::token_source(f))
        }
    };
    let ca = up.ca.clone();
    // The gateway CA's own name, so that `doctor` can tell a re-signed certificate.
    let gateway_ca_names = match &ca {
        Some(path) => egress::read_pem_certs(path)
            .map_err(|e| invalid(e.to_string()))?
            .iter()
            .filter_map(|der| egress::cert::names(der).map(|(subject, _)| subject))
            .collect(),
        None => Vec::new(),
    };
    let gateway_anchor = match &ca {
        Some(path) => Some(egress::CaAnchor::from_file(path).map_err(|e| invalid(e.to_string()))?),
        None => None,
    };
    let inner_key = match args
        .gateway_inner_key
        .as_deref()
        .or(file.gateway_inner_key.as_deref())
    {
        Some(k) => Some(k.parse::<tunnel::inner::PublicKey>().map_err(|e| {
            invalid(format!(
                "gateway_inner_key: {e} (copy it from `sallyport-gateway inner-key`)"
            ))
        })?),
        None => None,
    };
    let transport = match args.transport.as_deref() {
        Some(t) => t.parse::<TransportChoice>().map_err(invalid)?,
        None => file.tunnel.transport()?.unwrap_or_default(),
    };
    let http_mode = file.tunnel.http_mode()?;
    let always_inner = file.tunnel.inner_always()?;
    if always_inner && inner_key.is_none() && !tunnel::token::is_v2(token.expose()) {
        return Err(invalid(
            "tunnel.inner = \"always\" needs gateway_inner_key (from `sallyport-gateway inner-key`, or enroll again)",
        ));
    }
    let v2 = if tunnel::token::is_v2(token.expose()) {
        let t = token
            .expose()
            .parse::<tunnel::token::Token>()
            .map_err(|e| invalid(format!("token: {e}")))?;
        // The kind is in the token's claims: a connector's credential is told apart here,
        // before any connection.
        if t.claims().kind != tunnel::token::Kind::Agent {
            return Err(ConfigError::WrongKind {
                origin: token_source,
                id: t.claims().id.clone(),
            });
        }
        Some(uplink::TokenCell::new(Arc::new(t)))
    } else {
        None
    };
    let tls = if gateway.tls {
        Some(
            egress::client_config(&TlsOptions {
                ca,
                pin: false,
                key_pin: file.gateway_key.clone(),
                inner_channel: inner_key.is_some(),
                any_certificate: v2.is_some(),
            })
            .map_err(|e| invalid(e.to_string()))?,
        )
    } else {
        None
    };
    let credentials_file = up
        .proxy_credentials
        .clone()
        .or_else(|| default_credentials_path().filter(|p| p.exists()));
    let mut egress = up.egress(
        credentials_file.as_deref(),
        file.proxy_auth.wpad_credentials()?,
    )?;
    egress.native_tls = up.native_tls(v2.is_some())?;
    // Admin policy: /etc/sallyport/policy.toml (%ProgramData%\Sallyport on Windows), the
    // registry on Windows.
    egress.auth.policy = egress::policy::load().map_err(invalid)?;
    let way = egress::Way::new(egress);
    let socks = listen_addr(
        args.socks.as_deref().or(file.socks.as_deref()),
        "127.0.0.1:1080",
        "socks",
    )?;
    let http = listen_addr(
        args.http.as_deref().or(file.http.as_deref()),
        "127.0.0.1:8118",
        "http",
    )?;
    let mut forwards = Vec::new();
    for f in file.forwards.iter().chain(args.forwards.iter()) {
        forwards.push(f.parse::<Forward>().map_err(invalid)?);
    }
    let allow_remote = args.allow_remote_clients || file.allow_remote_clients;
    let local_auth = match (args.local_user, file.local_auth) {
        (Some(user), file_auth) => {
            let password = match std::env::var("SALLYPORT_LOCAL_PASSWORD") {
                Ok(p) => p,
                Err(_) => match file_auth {
                    Some(a) => read_password(&a.password_file)?,
                    None => return Err(invalid("--local-user needs a password in SALLYPORT_LOCAL_PASSWORD or local_auth.password_file")),
                },
            };
            Some(Arc::new(LocalAuth::new(user, password)))
        }
        (None, Some(a)) => Some(Arc::new(LocalAuth::new(
            a.user,
            read_password(&a.password_file)?,
        ))),
        (None, None) => None,
    };
    let mut listens: Vec<(String, SocketAddr)> = forwards
        .iter()
        .map(|f| (format!("--forward {}", f.listen), f.listen))
        .collect();
    listens.extend(socks.map(|a| ("--socks".to_string(), a)));
    listens.extend(http.map(|a| ("--http".to_string(), a)));
    for (flag, addr) in &listens {
        if !addr.ip().is_loopback() {
            if !allow_remote {
                return Err(invalid(format!(
                    "{flag} {addr} would listen beyond this machine and make the agent an open proxy into the trusted network; use a loopback address, or add --allow-remote-clients with --local-user"
                )));
            }
            if local_auth.is_none() {
                return Err(invalid(format!("{flag} {addr} listens beyond this machine: --allow-remote-clients needs --local-user (local authentication)")));
            }
        }
    }
    let mut session = tunnel::Config::new(tunnel::Role::Agent, true);
    session.datagrams = true;
    session.resume = true;
    file.tunnel.apply(&mut session)?;
    Ok(AgentConfig {
        gateway,
        failover,
        token,
        tls,
        way,
        gateway_ca_names,
        socks,
        http,
        forwards,
        allow_remote_clients: allow_remote,
        local_auth,
        open_timeout: duration(
            args.open_timeout
                .as_deref()
                .or(file.open_timeout.as_deref())
                .unwrap_or("30s"),
            "open_timeout",
        )?,
        resume_grace: duration(
            args.resume_grace
                .as_deref()
                .or(file.resume_grace.as_deref())
                .unwrap_or("60s"),
            "resume_grace",
        )?,
        connect_timeout: duration(
            args.connect_timeout
                .as_deref()
                .or(file.connect_timeout.as_deref())
                .unwrap_or("10s"),
            "connect_timeout",
        )?,
        session_wait: Duration::from_secs(10),
        control: crate::status::control_path(),
        instance_id: file
            .instance_id
            .unwrap_or_else(|| format!("agent-{}", std::process::id())),
        session,
        gateway_anchor,
        gateway_key: file.gateway_key,
        inner_key,
        always_inner,
        random_masks: file.tunnel.random_masks()?,
        transport,
        http_mode,
        websocket_retry: file.tunnel.websocket_retry()?,
        v2,
        token_source,
        token_home,
    })
}

fn read_password(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
        .map_err(|e| {
            invalid(format!(
                "cannot read local_auth.password_file {}: {e}",
                path.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wpad_credentials_are_refused_unless_the_policy_allows_them() {
        let read = |text: &str| {
            toml::from_str::<AgentFile>(text)
                .unwrap()
                .proxy_auth
                .wpad_credentials()
        };
        assert!(!read("").unwrap());
        assert!(!read("[proxy_auth]\nwpad_credentials = \"refuse\"").unwrap());
        assert!(read("[proxy_auth]\nwpad_credentials = \"allow\"").unwrap());
        let e = read("[proxy_auth]\nwpad_credentials = \"yes\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("proxy_auth.wpad_credentials `yes`: use allow or refuse"),
            "{e}"
        );
    }

    #[test]
    fn forwards_parse_with_and_without_an_address() {
        let f: Forward = "127.0.0.1:15432=db.internal:5432".parse().unwrap();
        assert_eq!(f.dest, Dest::new("db.internal", 5432));
        let f: Forward = "2222=[fd00::1]:22".parse().unwrap();
        assert_eq!(f.listen, "127.0.0.1:2222".parse().unwrap());
        assert_eq!(f.dest, Dest::new("fd00::1", 22));
        assert!("15432".parse::<Forward>().is_err());
        assert!("1=host:0".parse::<Forward>().is_err());
    }

    #[test]
    fn a_token_never_shows_in_debug() {
        let s = Secret::new(format!("sp_alice_{}", "ab".repeat(32)));
        assert_eq!(format!("{s:?}"), "sp_alice_****");
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.toml");
        let f = read_file(&p).unwrap();
        assert!(f.gateway.is_some());
        for fw in &f.forwards {
            fw.parse::<Forward>().unwrap();
        }
    }

    #[test]
    fn a_typo_in_the_config_names_file_line_and_key() {
        let e = parse_file(
            "gateway = \"wss://x/\"\nsocks_port = 1\n",
            Path::new("agent.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("agent.toml line 2") && e.contains("socks_port"),
            "{e}"
        );
    }
}
