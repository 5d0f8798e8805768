//! Real load balancers in front of a plain (`--plain`) DMZ gateway: nginx and HAProxy, each
//! terminating TLS with the trial PKI's certificate and passing the WebSocket upgrade through to
//! the gateway, the way docs/deploy.md tells operators to deploy it.
//!
//! Each configuration is rendered in two parts:
//!
//! - the **site** part ([`Nginx::site_config`], [`Haproxy::site_config`]): the `upstream` and
//!   `server` blocks, or the `frontend` and `backend` sections. This is what an operator copies,
//!   and it is exactly what docs/deploy.md shows (rendered with example addresses; a test in
//!   tests/tests/lb.rs fails when the two drift apart);
//! - the **harness** part: everything only a test needs (pid file, logs and temporary folders
//!   inside a [`TempDir`], logging to stderr, a foreground process).
//!
//! Both run in the foreground as children of the test ([`Proc`]), so a failing test leaves
//! nothing behind. [`LbSystem`] puts one of them between agents/connector and the DMZ.
//!
//! Optionally the load balancer runs inside a network namespace (`ip netns exec NS ...`), for
//! topology tests that put it on its own host; on loopback `netns` is `None`.

use crate::{bin, field, require_tool, run, Pki, Proc, TempDir};
use anyhow::{bail, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What both load balancers need to know.
#[derive(Clone, Debug)]
pub struct LbConfig<'a> {
    /// Where the load balancer accepts TLS. Port 0: the harness picks a free port before
    /// rendering the configuration, since neither nginx nor HAProxy reports a kernel-chosen
    /// port back; [`LoadBalancer::addr`] tells which.
    pub listen: SocketAddr,
    /// The plain gateway (`sallyport-gateway dmz --plain`).
    pub upstream: SocketAddr,
    /// The gateway's `--prefix`, e.g. `/sallyport` (or `""` for none).
    pub prefix: &'a str,
    /// The certificate chain (PEM) clients see.
    pub cert: &'a Path,
    /// Its private key (PEM).
    pub key: &'a Path,
    /// How long the upgraded (WebSocket) connection may stay silent before the load balancer
    /// cuts it: nginx `proxy_read_timeout`/`proxy_send_timeout`, HAProxy `timeout tunnel`.
    pub idle_timeout: Duration,
    /// The address the load balancer connects to the gateway *from* (nginx `proxy_bind`,
    /// HAProxy `source`); `None` leaves it to the kernel. This is the address the gateway's
    /// `--trusted-proxy` must name. On loopback, binding it to e.g. 127.0.0.3 keeps the load
    /// balancer apart from clients on 127.0.0.1.
    pub source: Option<IpAddr>,
    /// Run the load balancer inside this network namespace (`ip netns exec NS ...`).
    pub netns: Option<&'a str>,
    /// More gateway instances besides `upstream`: the configuration then balances over all
    /// and keeps each HTTP-transport session on one instance (docs/deploy.md, "Several DMZ
    /// instances").
    pub more_upstreams: Vec<SocketAddr>,
    /// nginx only: demand a client certificate issued by this CA (PEM): `ssl_verify_client on`
    /// (tests of the agent's `--tls native --client-cert`).
    pub client_ca: Option<&'a Path>,
    /// HAProxy only: the instance names of `upstream` and `more_upstreams`, in order (stable
    /// names, such as a StatefulSet's). Given, each instance also gets its own path,
    /// `/i/NAME/`, that reaches that instance only (with the path rewritten to `{prefix}/`): the
    /// route a connector that may reach only the load balancer takes to every instance
    /// (docs/deploy.md, "Several DMZ instances"). Empty: servers are named `dmz1`, `dmz2`, ….
    pub instances: Vec<&'a str>,
    /// HAProxy only: the health check's interval (`inter`; taken out after 2 failures, back after
    /// 2 successes). A draining instance's `--drain-delay` must exceed twice this.
    pub check_interval: Duration,
    /// nginx only: reach the gateway over TLS (`proxy_pass https://…`, `proxy_ssl_protocols`
    /// this version, `TLSv1.2` or `TLSv1.3`) instead of plain HTTP: a balancer that re-encrypts,
    /// in front of a gateway that terminates TLS itself. `None`: plain HTTP.
    pub upstream_tls: Option<&'static str>,
}

impl<'a> LbConfig<'a> {
    /// Defaults: listen on 127.0.0.1 (free port), prefix `/sallyport`, 60 s idle timeout, no
    /// source address, no namespace.
    pub fn new(upstream: SocketAddr, cert: &'a Path, key: &'a Path) -> LbConfig<'a> {
        LbConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            upstream,
            prefix: "/sallyport",
            cert,
            key,
            idle_timeout: Duration::from_secs(60),
            source: None,
            netns: None,
            more_upstreams: Vec::new(),
            client_ca: None,
            instances: Vec::new(),
            check_interval: Duration::from_secs(2),
            upstream_tls: None,
        }
    }

    /// The prefix without a trailing slash ("" or "/x").
    fn prefix(&self) -> &str {
        self.prefix.trim_end_matches('/')
    }
}

/// What the tests need from either load balancer.
pub trait LoadBalancer {
    /// `nginx` or `haproxy`.
    fn name(&self) -> &'static str;
    /// The TLS address clients connect to.
    fn addr(&self) -> SocketAddr;
    /// The process's own log (stderr): startup errors, nginx's error log, HAProxy's log.
    fn log(&self) -> String;
    /// One line per request (nginx writes it when a request, or an upgraded connection,
    /// ends; HAProxy likewise, into [`LoadBalancer::log`]).
    fn access_log(&self) -> String;
    /// The complete configuration file as started.
    fn config_text(&self) -> String;
}

/// Which load balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbKind {
    Nginx,
    Haproxy,
}

impl LbKind {
    pub fn start(self, cfg: &LbConfig<'_>) -> Result<Box<dyn LoadBalancer>> {
        Ok(match self {
            LbKind::Nginx => Box::new(Nginx::start(cfg)?),
            LbKind::Haproxy => Box::new(Haproxy::start(cfg)?),
        })
    }
}

/// A duration as both nginx and HAProxy write it: `3s`, or `1500ms` when not whole seconds.
pub fn lb_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// `listen` with port 0 replaced by a free port (bound, then released: nginx and HAProxy need
/// the number in their configuration). Inside a namespace the address may not exist in ours:
/// the number is then taken from our loopback (a fresh namespace has nothing listening).
fn resolve_listen(listen: SocketAddr, netns: Option<&str>) -> Result<SocketAddr> {
    if listen.port() != 0 {
        return Ok(listen);
    }
    let probe_ip = match netns {
        Some(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        None => listen.ip(),
    };
    let port = TcpListener::bind(SocketAddr::new(probe_ip, 0))
        .with_context(|| format!("picking a free port on {probe_ip}"))?
        .local_addr()?
        .port();
    Ok(SocketAddr::new(listen.ip(), port))
}

/// `program`, or `ip netns exec NS program` (which execs it: the child's pid is the program's).
fn command(netns: Option<&str>, program: &str) -> Command {
    require_tool(program);
    match netns {
        Some(ns) => {
            require_tool("ip");
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

/// Waits until `addr` accepts TCP connections (from inside `netns` when given), failing early
/// when the process logs one of `fatal` (a configuration error it will exit on).
fn wait_accepting(
    proc: &Proc,
    addr: SocketAddr,
    netns: Option<&str>,
    fatal: &[&str],
) -> Result<()> {
    // A wildcard listener is reached on loopback.
    let target = if addr.ip().is_unspecified() {
        SocketAddr::new(
            match addr {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            },
            addr.port(),
        )
    } else {
        addr
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let up = match netns {
            // Our own sockets live in our namespace: ask bash inside the namespace to connect.
            Some(ns) => run(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{}/{}", target.ip(), target.port()),
            ]))
            .map(|(code, _, _)| code == 0)
            .unwrap_or(false),
            None => TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok(),
        };
        if up {
            return Ok(());
        }
        let log = proc.log();
        if fatal.iter().any(|f| log.contains(f)) || Instant::now() > deadline {
            bail!("{} did not start listening on {addr}:\n{log}", proc.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Indents every non-empty line by `n` spaces.
fn indent(text: &str, n: usize) -> String {
    text.lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{}{l}", " ".repeat(n))
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

// ---------------------------------------------------------------------------------------------
// nginx

/// nginx terminating TLS and proxying `{prefix}/` to the gateway (`nginx -g 'daemon off;'`).
pub struct Nginx {
    // Declared before `dir`: the process stops before its folder is removed.
    proc: Proc,
    dir: TempDir,
    addr: SocketAddr,
    config: String,
}

impl Nginx {
    /// The part of the configuration an operator copies into the `http { }` context: an
    /// `upstream` for the gateway and a `server` that terminates TLS, passes `{prefix}/` with the
    /// WebSocket upgrade and answers 404 elsewhere. `cfg.listen` is written as given.
    pub fn site_config(cfg: &LbConfig<'_>) -> String {
        let prefix = cfg.prefix();
        let idle = lb_duration(cfg.idle_timeout);
        let bind = match cfg.source {
            Some(ip) => format!("        proxy_bind {ip};\n"),
            None => String::new(),
        };
        // Without a prefix the gateway owns every path (and answers 404 itself).
        let elsewhere = if prefix.is_empty() {
            String::new()
        } else {
            "\n    location / {\n        return 404;\n    }\n".to_string()
        };
        let (scheme, upstream_tls) = match cfg.upstream_tls {
            Some(version) => ("https", format!("        proxy_ssl_protocols {version};\n")),
            None => ("http", String::new()),
        };
        let client_ca = match cfg.client_ca {
            Some(ca) => format!(
                "    ssl_client_certificate {};\n    ssl_verify_client on;\n",
                ca.display()
            ),
            None => String::new(),
        };
        format!(
            r#"upstream sallyport_dmz {{
{servers}}}

# WebSocket upgrades pass with `Connection: upgrade`; the HTTP fallback transport's ordinary
# requests without it.
map $http_upgrade $sallyport_connection {{
    default upgrade;
    ''      '';
}}

server {{
    listen {listen} ssl;
    ssl_certificate     {cert};
    ssl_certificate_key {key};
    ssl_protocols       TLSv1.2 TLSv1.3;
{client_ca}
    location {prefix}/ {{
        proxy_pass {scheme}://sallyport_dmz;    # no URI part: {prefix}/... is passed unchanged
        proxy_http_version 1.1;             # WebSocket needs HTTP/1.1 to the gateway
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $sallyport_connection;
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        # Idle limit of the upgraded connection: keep it above the tunnel ping (20 s).
        proxy_read_timeout {idle};
        proxy_send_timeout {idle};
        proxy_buffering off;                # the HTTP fallback streams its downstream
        proxy_request_buffering off;        # ... and its upstream batches
        client_max_body_size 2m;            # upstream batches stay below 1 MiB
{upstream_tls}{bind}    }}
{elsewhere}}}
"#,
            servers = Nginx::servers(cfg),
            listen = cfg.listen,
            cert = cfg.cert.display(),
            key = cfg.key.display(),
        )
    }

    /// The `upstream` block's body: one server, or several with the session affinity hash.
    pub fn servers(cfg: &LbConfig<'_>) -> String {
        let mut out = String::new();
        if !cfg.more_upstreams.is_empty() {
            out.push_str("    # HTTP-transport sessions stay on one instance.\n");
            out.push_str("    hash $http_sallyport_affinity consistent;\n");
        }
        for u in std::iter::once(&cfg.upstream).chain(&cfg.more_upstreams) {
            out.push_str(&format!("    server {u};\n"));
        }
        out
    }

    /// Writes the configuration into a fresh folder, starts nginx in the foreground and waits
    /// until it accepts connections.
    pub fn start(cfg: &LbConfig<'_>) -> Result<Nginx> {
        let dir = TempDir::new("nginx");
        let d = dir.path();
        let mut cfg = cfg.clone();
        cfg.listen = resolve_listen(cfg.listen, cfg.netns)?;
        // Only test plumbing wraps the site part: every file nginx writes stays in `d`, and its
        // error log goes to stderr, which [`Proc`] collects.
        let config = format!(
            "# Test harness around the documented site configuration (see tests/src/lb.rs).\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log stderr info;\n\
             events {{\n    worker_connections 512;\n}}\n\
             http {{\n\
             \x20   log_format sallyport '$remote_addr \"$request\" $status xff=\"$http_x_forwarded_for\" upstream=$upstream_addr time=$request_time';\n\
             \x20   access_log {d}/access.log sallyport;\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\n\
             {site}}}\n",
            d = d.display(),
            site = indent(&Nginx::site_config(&cfg), 4),
        );
        std::fs::write(d.join("nginx.conf"), &config)?;
        let proc = Proc::spawn(
            "nginx",
            command(cfg.netns, "nginx")
                .arg("-p")
                .arg(d)
                .arg("-c")
                .arg(d.join("nginx.conf"))
                // Errors before the configuration is read go to stderr too.
                .args(["-e", "stderr", "-g", "daemon off;"]),
        )?;
        wait_accepting(&proc, cfg.listen, cfg.netns, &["[emerg]"])?;
        Ok(Nginx {
            proc,
            dir,
            addr: cfg.listen,
            config,
        })
    }
}

impl LoadBalancer for Nginx {
    fn name(&self) -> &'static str {
        "nginx"
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn log(&self) -> String {
        self.proc.log()
    }
    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
    fn config_text(&self) -> String {
        self.config.clone()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGKILL to the master would orphan its worker (still listening). SIGTERM is nginx's
        // fast shutdown: the master stops the worker, removes its pid file and exits.
        let pid_file = self.dir.path().join("nginx.pid");
        let _ = Command::new("kill")
            .args(["-TERM", &self.proc.pid().to_string()])
            .output();
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_file.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // `proc` drops next: it reaps the master (or kills it, if it hung).
    }
}

// ---------------------------------------------------------------------------------------------
// HAProxy

/// HAProxy terminating TLS and proxying `{prefix}/` to the gateway (`haproxy -db`).
pub struct Haproxy {
    proc: Proc,
    _dir: TempDir,
    addr: SocketAddr,
    config: String,
}

impl Haproxy {
    /// The part of the configuration an operator copies: a `frontend` that terminates TLS and
    /// adds `X-Forwarded-For`, and a `backend` with a health check on `{prefix}/readyz`. With
    /// [`LbConfig::instances`], also a backend per instance for its own path `/i/NAME/`.
    /// `pem` is the certificate chain followed by its key, in one file (HAProxy's `crt`).
    pub fn site_config(cfg: &LbConfig<'_>, pem: &Path) -> String {
        let prefix = cfg.prefix();
        let idle = lb_duration(cfg.idle_timeout);
        // HAProxy separates the port by the last colon, IPv6 included (`:::443`).
        let hp = |a: SocketAddr| format!("{}:{}", a.ip(), a.port());
        let source = match cfg.source {
            Some(ip) => format!(" source {ip}"),
            None => String::new(),
        };
        let upstreams: Vec<(String, SocketAddr)> = std::iter::once(&cfg.upstream)
            .chain(&cfg.more_upstreams)
            .enumerate()
            .map(|(i, u)| {
                let name = match cfg.instances.get(i) {
                    Some(n) => n.to_string(),
                    None => format!("dmz{}", i + 1),
                };
                (name, *u)
            })
            .collect();
        let own_paths: Vec<&(String, SocketAddr)> = if cfg.instances.is_empty() {
            Vec::new()
        } else {
            upstreams.iter().collect()
        };
        let elsewhere = if prefix.is_empty() {
            String::new()
        } else {
            let paths: Vec<String> = std::iter::once(format!("{prefix}/"))
                .chain(own_paths.iter().map(|(n, _)| format!("/i/{n}/")))
                .collect();
            format!(
                "    http-request deny deny_status 404 unless {{ path_beg {} }}\n",
                paths.join(" ")
            )
        };
        let mut routes = String::new();
        if !own_paths.is_empty() {
            routes.push_str("    # Each instance's own path (for connectors): /i/NAME/ reaches that instance only.\n");
        }
        for (n, _) in &own_paths {
            routes.push_str(&format!(
                "    use_backend be_{n} if {{ path_beg /i/{n}/ }}\n"
            ));
        }
        let inter = lb_duration(cfg.check_interval);
        let mut servers = String::new();
        if !cfg.more_upstreams.is_empty() {
            servers.push_str("    # HTTP-transport sessions stay on one instance.\n");
            servers.push_str("    balance hdr(sallyport-affinity)\n    hash-type consistent\n");
            servers.push_str(
                "    # A connection refused by an instance that just died goes to another one.\n",
            );
            servers.push_str("    retries 2\n    option redispatch\n");
        }
        for (name, u) in &upstreams {
            servers.push_str(&format!(
                "    server {name} {} check inter {inter} fall 2 rise 2{source}\n",
                hp(*u)
            ));
        }
        let backend_head = format!(
            "    mode http
    timeout connect 5s
    timeout server 30s
    # Idle limit of the upgraded (WebSocket) connection: keep it above the tunnel ping (20 s).
    timeout tunnel {idle}
"
        );
        let mut own = String::new();
        for (n, u) in &own_paths {
            own.push_str(&format!(
                "
backend be_{n}
{backend_head}    # The instance serves {prefix}/: /i/{n}/connector reaches it as {prefix}/connector.
    http-request replace-path ^/i/{n}(/.*) {prefix}\\1
    # No health check: connectors attach as soon as it listens and stay while it drains.
    server {n} {}{source}
",
                hp(*u)
            ));
        }
        format!(
            r#"frontend fe_sallyport
    mode http
    bind {listen} ssl crt {pem} alpn http/1.1 ssl-min-ver TLSv1.2
    timeout http-request 10s
    timeout client 30s
    option forwardfor                   # adds X-Forwarded-For: <client address>
{elsewhere}{routes}    use_backend be_sallyport if {{ path_beg {prefix}/ }}

backend be_sallyport
{backend_head}    option httpchk
    http-check send meth GET uri {prefix}/readyz
    http-check expect status 200
{servers}{own}"#,
            listen = hp(cfg.listen),
            pem = pem.display(),
        )
    }

    /// Writes `combined.pem` and the configuration into a fresh folder, starts HAProxy in the
    /// foreground and waits until it accepts connections.
    pub fn start(cfg: &LbConfig<'_>) -> Result<Haproxy> {
        anyhow::ensure!(
            cfg.upstream_tls.is_none(),
            "upstream_tls is rendered for nginx only"
        );
        let dir = TempDir::new("haproxy");
        let d = dir.path();
        let mut cfg = cfg.clone();
        cfg.listen = resolve_listen(cfg.listen, cfg.netns)?;
        let pem = d.join("combined.pem");
        let mut chain = std::fs::read_to_string(cfg.cert)
            .with_context(|| format!("reading {}", cfg.cert.display()))?;
        if !chain.ends_with('\n') {
            chain.push('\n');
        }
        chain.push_str(
            &std::fs::read_to_string(cfg.key)
                .with_context(|| format!("reading {}", cfg.key.display()))?,
        );
        std::fs::write(&pem, chain)?;
        // Test plumbing: log every request (httplog) and every health check result to stderr.
        let config = format!(
            "# Test harness around the documented site configuration (see tests/src/lb.rs).\n\
             global\n\
             \x20   log stderr format raw local0 info\n\n\
             defaults\n\
             \x20   log global\n\
             \x20   mode http\n\
             \x20   option httplog\n\
             \x20   option log-health-checks\n\
             \x20   timeout connect 5s\n\
             \x20   timeout client 30s\n\
             \x20   timeout server 30s\n\n\
             {site}",
            site = Haproxy::site_config(&cfg, &pem),
        );
        let file = d.join("haproxy.cfg");
        std::fs::write(&file, &config)?;
        let proc = Proc::spawn(
            "haproxy",
            command(cfg.netns, "haproxy")
                .arg("-f")
                .arg(&file)
                .arg("-db"),
        )?;
        wait_accepting(&proc, cfg.listen, cfg.netns, &["[ALERT]"])?;
        Ok(Haproxy {
            proc,
            _dir: dir,
            addr: cfg.listen,
            config,
        })
    }
}

impl LoadBalancer for Haproxy {
    fn name(&self) -> &'static str {
        "haproxy"
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn log(&self) -> String {
        self.proc.log()
    }
    fn access_log(&self) -> String {
        // With `option httplog` request lines share the log with everything else; they are
        // the ones naming the frontend.
        self.proc
            .log()
            .lines()
            .filter(|l| l.contains("fe_sallyport"))
            .collect::<Vec<_>>()
            .join("\n")
    }
    fn config_text(&self) -> String {
        self.config.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// A whole system behind a load balancer

/// How to set up an [`LbSystem`].
pub struct LbSetup<'a> {
    pub kind: LbKind,
    /// The load balancer's idle timeout for upgraded connections.
    pub idle_timeout: Duration,
    /// Where the load balancer connects to the gateway from ([`LbConfig::source`]); the
    /// gateway trusts exactly this address (`--trusted-proxy ADDR/32`), 127.0.0.1 when `None`.
    pub lb_source: Option<IpAddr>,
    /// Connector `--allow` rules.
    pub allow: &'a [String],
    /// Connector `--host NAME=IP` entries.
    pub hosts: &'a [&'a str],
    /// The connector's `[tunnel] ping_interval` (None: the default, 20 s).
    pub connector_ping: Option<Duration>,
    /// The gateway trusts the balancer to read sessions: `[v2] trust_lb = true` with the key of
    /// the certificate the balancer presents (the gateway's) in `tls_keys`.
    pub trust_lb: bool,
    /// The gateway terminates TLS itself (`--tls-cert`, the same certificate as the balancer),
    /// reached by nginx over this TLS version, `TLSv1.2` or `TLSv1.3`
    /// ([`LbConfig::upstream_tls`]); `None`: `--plain`.
    pub dmz_tls: Option<&'static str>,
}

/// DMZ gateway (`--plain --prefix /sallyport`), a load balancer in front of it, and a
/// connector that reaches the DMZ through the load balancer. Agents are started with
/// [`LbSystem::agent`].
pub struct LbSystem {
    // Drop order: connector, load balancer, gateway, then the PKI folder.
    pub connector: Proc,
    pub lb: Box<dyn LoadBalancer>,
    pub dmz: Proc,
    /// The plain gateway's own address (reachable only by the load balancer, in a deployment).
    pub dmz_addr: SocketAddr,
    /// `wss://<load balancer>/sallyport/`: what agents and connector are given.
    pub gw_url: String,
    pub pki: Pki,
}

/// An agent started by [`LbSystem::agent`].
pub struct LbAgent {
    pub proc: Proc,
    pub socks: SocketAddr,
    /// The local addresses of its `--forward`s, in order.
    pub forwards: Vec<SocketAddr>,
}

pub const PREFIX: &str = "/sallyport";

/// `[tunnel] ping_interval` in a TOML file for `-c`.
fn ping_toml(path: &Path, ping: Duration) -> Result<PathBuf> {
    std::fs::write(
        path,
        format!("[tunnel]\nping_interval = \"{}\"\n", lb_duration(ping)),
    )?;
    Ok(path.to_path_buf())
}

impl LbSystem {
    pub fn start(tag: &str, setup: &LbSetup<'_>) -> Result<LbSystem> {
        let pki = Pki::new(tag)?;
        pki.token(
            "agent",
            "alice-laptop",
            &["--name", "alice", "--groups", "dev"],
        )?;
        pki.token("connector", "site-a", &["--route", "*.internal:*"])?;
        let lb_ip = setup.lb_source.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let (cert, key) = (pki.p("gateway.crt"), pki.p("gateway.key"));
        let mut dmz_cmd = Command::new(bin("sallyport-gateway"));
        dmz_cmd.arg("dmz");
        if setup.dmz_tls.is_some() {
            dmz_cmd
                .arg("--tls-cert")
                .arg(&cert)
                .arg("--tls-key")
                .arg(&key);
        } else {
            dmz_cmd.arg("--plain");
        }
        if setup.trust_lb {
            let pem = std::fs::read(&cert)?;
            let der = CertificateDer::pem_slice_iter(&pem)
                .next()
                .context("gateway.crt holds no certificate")??;
            let pin = egress::cert::key_pin(&der).context("gateway.crt: no key")?;
            let path = pki.p("dmz.toml");
            std::fs::write(
                &path,
                format!("[v2]\ntrust_lb = true\ntls_keys = [\"{pin}\"]\n"),
            )?;
            dmz_cmd.arg("-c").arg(path);
        }
        let dmz = Proc::spawn(
            "dmz",
            dmz_cmd
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--prefix",
                    PREFIX,
                    "--trusted-proxy",
                    &format!("{lb_ip}/32"),
                    "--instance-id",
                    "dmz-test",
                    "--agent-tokens",
                ])
                .arg(pki.p("agents.toml"))
                .arg("--connector-tokens")
                .arg(pki.p("connectors.toml")),
        )?;
        let dmz_addr = dmz.addr(&["dmz gateway listening"])?;
        let lb = setup.kind.start(&LbConfig {
            idle_timeout: setup.idle_timeout,
            source: setup.lb_source,
            upstream_tls: setup.dmz_tls,
            ..LbConfig::new(dmz_addr, &cert, &key)
        })?;
        let gw_url = format!("wss://127.0.0.1:{}{PREFIX}/", lb.addr().port());
        let mut cmd = Command::new(bin("sallyport-gateway"));
        cmd.args(["connector", "--gateway", &gw_url, "--token-file"])
            .arg(pki.p("site-a.token"))
            .arg("--ca")
            .arg(pki.p("ca.crt"))
            .args([
                "--advertise",
                "*.internal:*",
                "--instance-id",
                "connector-test",
            ])
            .args(["--proxy", "direct"]);
        if let Some(p) = setup.connector_ping {
            cmd.arg("-c").arg(ping_toml(&pki.p("connector.toml"), p)?);
        }
        for a in setup.allow {
            cmd.args(["--allow", a]);
        }
        for h in setup.hosts {
            cmd.args(["--host", h]);
        }
        let connector = Proc::spawn("connector", &mut cmd)?;
        dmz.wait_for(&["connector routes"], Duration::from_secs(15))
            .with_context(|| {
                format!(
                    "connector log:\n{}\n{} log:\n{}",
                    connector.log(),
                    lb.name(),
                    lb.log()
                )
            })?;
        Ok(LbSystem {
            connector,
            lb,
            dmz,
            dmz_addr,
            gw_url,
            pki,
        })
    }

    /// Starts an agent (SOCKS5 on a free port, no HTTP port) through the load balancer, with
    /// `[tunnel] ping_interval = ping` when given, and static `forwards` (`127.0.0.1:0=HOST:PORT`);
    /// returns once it is connected to the gateway.
    pub fn agent(
        &self,
        name: &str,
        ping: Option<Duration>,
        forwards: &[String],
    ) -> Result<LbAgent> {
        let mut cmd = Command::new(bin("sallyport"));
        cmd.args(["run", "--gateway", &self.gw_url, "--token-file"])
            .arg(self.pki.p("alice-laptop.token"))
            .arg("--ca")
            .arg(self.pki.p("ca.crt"))
            .args([
                "--socks",
                "127.0.0.1:0",
                "--http",
                "off",
                "--proxy",
                "direct",
            ])
            .env("HOME", self.pki.dir.path());
        if let Some(p) = ping {
            cmd.arg("-c")
                .arg(ping_toml(&self.pki.p(&format!("{name}.toml")), p)?);
        }
        for f in forwards {
            cmd.args(["--forward", f]);
        }
        let expected_forwards = forwards.len();
        let proc = Proc::spawn(name, &mut cmd)?;
        let socks = proc.addr(&["listening", "socks5"])?;
        proc.wait_for(&["connected to the gateway"], Duration::from_secs(15))
            .with_context(|| format!("{} log:\n{}", self.lb.name(), self.lb.log()))?;
        // Forwards are logged in the order given, each once (`front="forward"`).
        let deadline = Instant::now() + Duration::from_secs(10);
        let forwards = loop {
            let lines: Vec<String> = proc
                .log()
                .lines()
                .filter(|l| l.contains("listening") && l.contains("forward"))
                .map(str::to_string)
                .collect();
            if lines.len() >= expected_forwards {
                break lines
                    .iter()
                    .map(|l| {
                        field(l, "addr")
                            .and_then(|a| a.parse().ok())
                            .with_context(|| format!("no addr= in `{l}`"))
                    })
                    .collect::<Result<Vec<SocketAddr>>>()?;
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} never listened on its {expected_forwards} forwards:\n{}",
                    proc.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(LbAgent {
            proc,
            socks,
            forwards,
        })
    }
}
