//! Helpers for the end-to-end tests: find the real binaries, run them as child processes on
//! loopback (port 0 everywhere, addresses read back from their logs), small internal services,
//! and a [`System`] that brings up gateway, connector and agent for one test.
//!
//! Every process is killed when its handle drops, so a failing test leaves nothing running.

pub mod kdc;
pub mod lb;
pub mod netns;
pub mod wine;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The folder holding the built binaries (`target/debug`), next to this test's `deps/`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for b in ["sallyport", "sallyport-gateway"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: build the binaries first (`cargo build --bins`, or `cargo test --workspace`, which builds them)",
            dir.join(b).display()
        );
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Fails (never skips) when a tool the test needs is missing.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is required by this test: run scripts/test.sh, which installs it"
    );
}

/// A unique scratch folder, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("sallyport-e2e-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process whose stderr lines are collected; killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        cmd.stderr(Stdio::piped())
            .stdout(Stdio::null())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().context("stderr")?;
        let sink = lines.clone();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if std::env::var_os("E2E_VERBOSE").is_some() {
                    eprintln!("[{tag}] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Proc {
            name: name.to_string(),
            child,
            lines,
        })
    }

    /// Waits for a log line containing every one of `needles`; returns it.
    pub fn wait_for(&self, needles: &[&str], timeout: Duration) -> Result<String> {
        self.wait_for_nth(needles, 1, timeout)
    }

    /// Waits until `n` log lines contain every one of `needles`; returns the `n`-th (for a
    /// line the process writes again, e.g. after a second reload or a reconnect).
    pub fn wait_for_nth(&self, needles: &[&str], n: usize, timeout: Duration) -> Result<String> {
        let found = poll(timeout, || {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| needles.iter().all(|x| l.contains(x)))
                .nth(n.saturating_sub(1))
                .cloned()
        });
        found.with_context(|| {
            format!(
                "{} never logged {:?} {n} time(s); its log:\n{}",
                self.name,
                needles,
                self.log()
            )
        })
    }

    /// Waits until a DMZ has read its token file (or revocation list) `file` again after the
    /// test changed it (it looks every 2 s): its `reloaded` line for `file` with `entries`
    /// entries. A fixed sleep for this failed on a loaded machine.
    pub fn wait_for_reload(&self, file: &Path, entries: usize) -> Result<String> {
        self.wait_for(
            &[
                "reloaded",
                &format!("file={}", file.display()),
                &format!("entries={entries}"),
            ],
            Duration::from_secs(15),
        )
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The `addr=` field of the first log line containing all `needles`.
    pub fn addr(&self, needles: &[&str]) -> Result<SocketAddr> {
        let line = self.wait_for(needles, Duration::from_secs(15))?;
        field(&line, "addr")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no addr= in `{line}`"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to stop (SIGTERM) and waits up to `within`, then kills it.
    pub fn terminate(&mut self, within: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .output();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Calls `check` every 50 ms until it gives `Some`, for up to `within` (`None` then).
///
/// For anything another process updates on its own time: its log as this process reads it
/// (a reader thread collects each child's stderr), a file it writes, a counter it serves. A
/// line the child wrote before the event the test saw may still be on its way, so such state
/// is never read once right after an event.
pub fn poll<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `read` until `done` holds for what it gives, for up to `within` (see [`poll`]);
/// returns the last value read, for the caller's assertion and its message.
pub fn eventually<T>(
    within: Duration,
    mut read: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let mut last = None;
    poll(within, || {
        let v = read();
        if done(&v) {
            return Some(v);
        }
        last = Some(v);
        None
    })
    .or(last)
    .expect("poll reads at least once")
}

/// Waits until the file `path` (a log another program writes) has a line containing every one
/// of `needles`; returns that line.
pub fn file_line(path: &Path, needles: &[&str], within: Duration) -> Result<String> {
    let text = || std::fs::read_to_string(path).unwrap_or_default();
    poll(within, || {
        text()
            .lines()
            .find(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
    })
    .with_context(|| {
        format!(
            "no line with {needles:?} in {}:\n{}",
            path.display(),
            text()
        )
    })
}

/// The value of `key=value` in a log line (quotes stripped): an event field, preceded by a
/// space, not one of the spans' (`session{client=…}`) in the line's prefix.
pub fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!(" {key}=");
    let start = line.find(&pat)? + pat.len();
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_string())
}

/// Runs a command to completion; returns (status code, stdout, stderr).
pub fn run(cmd: &mut Command) -> Result<(i32, String, String)> {
    let out = cmd.output().context("running command")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// What the test backend answers (`http_service`).
pub const BACKEND_HELLO: &str = "hello from backend.internal\n";

/// `curl --socks5-hostname SOCKS http://backend.internal:PORT/`: `(exit code, body, stderr)`.
/// Compare `(code, body)` with `(0, BACKEND_HELLO)`.
pub fn curl_backend(socks: std::net::SocketAddr, port: u16) -> (i32, String, String) {
    require_tool("curl");
    run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "--socks5-hostname"])
        .arg(socks.to_string())
        .arg(format!("http://backend.internal:{port}/")))
    .unwrap()
}

/// The names of the entries of `dir`, sorted (empty when it does not exist).
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Deterministic pseudo-random bytes for payload checks.
pub fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (offset + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        *b = (x >> 56) as u8;
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes `len` pattern bytes (see [`pattern`]) to `path`, for uploads.
pub fn write_pattern_file(path: &Path, len: u64) -> Result<()> {
    let mut f = std::fs::File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        pattern(off, &mut buf[..n]);
        f.write_all(&buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// The sha256 of `len` pattern bytes.
pub fn pattern_sha256(len: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        pattern(off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    hex::encode(h.finalize())
}

/// An "internal" HTTP/1.1 service: `GET /` → hello, `GET /bytes/N` → N pattern bytes,
/// `POST /sha256` → hex digest of the body (Content-Length bodies).
pub fn http_service() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || serve_http_on(l));
    Ok(addr)
}

/// Serves [`http_service`]'s answers on `l` until it fails (used by `sp-testsvc` too).
pub fn serve_http_on(l: TcpListener) {
    for s in l.incoming().map_while(|s| s.ok()) {
        std::thread::spawn(move || {
            let _ = serve_http(s);
        });
    }
}

/// Echoes every connection on `l` (used by `sp-testsvc`).
pub fn serve_echo_on(l: TcpListener) {
    for s in l.incoming().map_while(|s| s.ok()) {
        std::thread::spawn(move || {
            if let Ok(mut r) = s.try_clone() {
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            }
        });
    }
}

fn serve_http(s: TcpStream) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Ok(());
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        if method == "POST" && path == "/sha256" {
            let mut h = Sha256::new();
            let mut left = len;
            let mut buf = vec![0u8; 64 * 1024];
            while left > 0 {
                let n = r.read(&mut buf[..left.min(64 * 1024)])?;
                if n == 0 {
                    return Ok(());
                }
                h.update(&buf[..n]);
                left -= n;
            }
            let body = hex::encode(h.finalize());
            write!(
                w,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )?;
        } else if let Some(n) = path.strip_prefix("/bytes/") {
            let n: u64 = n.parse().unwrap_or(0);
            write!(w, "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {n}\r\n\r\n")?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut off = 0;
            while off < n {
                let k = ((n - off) as usize).min(buf.len());
                pattern(off, &mut buf[..k]);
                w.write_all(&buf[..k])?;
                off += k as u64;
            }
        } else {
            let body = "hello from backend.internal\n";
            write!(
                w,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )?;
        }
        w.flush()?;
    }
}

/// A TCP echo service.
pub fn echo_service() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming().map_while(|s| s.ok()) {
            std::thread::spawn(move || {
                let mut r = s.try_clone().expect("clone");
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

/// Trial PKI and tokens for one test, made with the real `sallyport-gateway` subcommands.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    pub fn new(tag: &str) -> Result<Pki> {
        Pki::with_names(tag, &["127.0.0.1", "localhost"])
    }

    /// A trial PKI whose gateway certificate names `names` (DNS names or addresses).
    pub fn with_names(tag: &str, names: &[&str]) -> Result<Pki> {
        let dir = TempDir::new(tag);
        let gw = bin("sallyport-gateway");
        let mut cmd = Command::new(&gw);
        cmd.arg("cert");
        for n in names {
            cmd.args(["--name", n]);
        }
        let (code, _, err) = run(cmd.arg("--out").arg(dir.path()))?;
        if code != 0 {
            bail!("cert failed: {err}");
        }
        Ok(Pki { dir })
    }

    pub fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Creates a token with `token new` and writes it to `<id>.token`.
    pub fn token(&self, kind: &str, id: &str, extra: &[&str]) -> Result<PathBuf> {
        let file = if kind == "agent" {
            "agents.toml"
        } else {
            "connectors.toml"
        };
        let out = self.p(&format!("{id}.token"));
        let (code, _, err) = run(Command::new(bin("sallyport-gateway"))
            .args(["token", "new", "--kind", kind, "--id", id, "--tokens"])
            .arg(self.p(file))
            .arg("--out")
            .arg(&out)
            .args(extra))?;
        if code != 0 {
            bail!("token new failed: {err}");
        }
        Ok(out)
    }

    /// Makes `{id}.token` hold a protocol v1 bearer token (id `{id}-v1`, name `alice`, group
    /// `dev`) instead of the v2 one: for the tests of v1's own protections (bearer, inner
    /// channel, pins), which a gateway keeps serving until its cut-off.
    pub fn use_v1_token(&self, kind: &str, id: &str) -> Result<PathBuf> {
        let v1 = format!("{id}-v1");
        let mut extra = vec!["--v1", "--name", "alice", "--groups", "dev"];
        if kind == "connector" {
            extra = vec!["--v1", "--route", "*.internal:*"];
        }
        let made = self.token(kind, &v1, &extra)?;
        let path = self.p(&format!("{id}.token"));
        std::fs::copy(&made, &path)?;
        Ok(path)
    }
}

/// The Linux side of a [`System`]: the DMZ gateway (trial CA, an agent token `alice-laptop`
/// and a connector token `site-a`) and one connector, on loopback; agents are the test's.
pub struct Gateway {
    pub pki: Pki,
    pub dmz: Proc,
    pub connector: Proc,
    pub gw_url: String,
    pub connector_args: Vec<String>,
    /// The DMZ's arguments, listening on the port it got (for a restart).
    pub dmz_args: Vec<String>,
}

impl Gateway {
    /// `allow`: connector `--allow` rules; `hosts`: connector `--host NAME=IP` entries.
    pub fn start(tag: &str, allow: &[String], hosts: &[&str], at: &Where) -> Result<Gateway> {
        let pki = Pki::new(tag)?;
        pki.token(
            "agent",
            "alice-laptop",
            &["--name", "alice", "--groups", "dev"],
        )?;
        pki.token("connector", "site-a", &["--route", "*.internal:*"])?;
        let mut dmz_args: Vec<String> = [
            "dmz",
            "--listen",
            "127.0.0.1:0",
            "--instance-id",
            "dmz-test",
        ]
        .map(String::from)
        .to_vec();
        for (flag, file) in [
            ("--tls-cert", "gateway.crt"),
            ("--tls-key", "gateway.key"),
            ("--agent-tokens", "agents.toml"),
            ("--connector-tokens", "connectors.toml"),
        ] {
            dmz_args.push(flag.into());
            dmz_args.push(pki.p(file).display().to_string());
        }
        let dmz = Proc::spawn("dmz", at.cmd("sallyport-gateway").args(&dmz_args))?;
        let gw = dmz.addr(&["dmz gateway listening"])?;
        // A restart listens where the first one did.
        dmz_args[2] = gw.to_string();
        let gw_url = format!("wss://127.0.0.1:{}/", gw.port());
        let mut connector_args: Vec<String> = vec![
            "connector".into(),
            "--gateway".into(),
            gw_url.clone(),
            "--token-file".into(),
            pki.p("site-a.token").display().to_string(),
            "--ca".into(),
            pki.p("ca.crt").display().to_string(),
            "--advertise".into(),
            "*.internal:*".into(),
            "--instance-id".into(),
            "connector-test".into(),
        ];
        for a in allow {
            connector_args.push("--allow".into());
            connector_args.push(a.clone());
        }
        for h in hosts {
            connector_args.push("--host".into());
            connector_args.push(h.to_string());
        }
        let connector = Proc::spawn(
            "connector",
            at.cmd("sallyport-gateway").args(&connector_args),
        )?;
        dmz.wait_for(&["connector routes"], Duration::from_secs(15))?;
        Ok(Gateway {
            pki,
            dmz,
            connector,
            gw_url,
            connector_args,
            dmz_args,
        })
    }
}

/// Gateway, connector and agent for one test, on loopback.
pub struct System {
    pub pki: Pki,
    pub dmz: Proc,
    pub connector: Proc,
    pub agent: Proc,
    pub gw_url: String,
    pub socks: SocketAddr,
    pub http: SocketAddr,
    pub forwards: Vec<SocketAddr>,
    pub connector_args: Vec<String>,
    pub dmz_args: Vec<String>,
    /// Where its programs run.
    pub at: Where,
}

/// Where a [`System`]'s programs run: a network namespace (`ip netns exec`; default: here) and
/// environment given to all of them.
#[derive(Clone, Default)]
pub struct Where {
    pub netns: Option<String>,
    pub env: Vec<(String, String)>,
}

impl Where {
    /// A command for one of the built binaries (`bin(name)`), run there.
    pub fn cmd(&self, name: &str) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin(name));
                c
            }
            None => Command::new(bin(name)),
        };
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

impl System {
    /// `allow`: connector `--allow` rules; `forwards`: agent `--forward` specs with LOCAL=0.
    pub fn start(
        tag: &str,
        allow: &[String],
        hosts: &[&str],
        forwards: &[String],
    ) -> Result<System> {
        System::start_with(tag, allow, hosts, forwards, &[], &[])
    }

    /// Like [`System::start`], with extra agent arguments and environment.
    pub fn start_with(
        tag: &str,
        allow: &[String],
        hosts: &[&str],
        forwards: &[String],
        agent_args: &[String],
        agent_env: &[(&str, &str)],
    ) -> Result<System> {
        System::start_opts(
            tag,
            allow,
            hosts,
            forwards,
            agent_args,
            agent_env,
            &Where::default(),
        )
    }

    /// Like [`System::start_with`], run where `at` says (a network namespace, an environment
    /// for all three programs).
    pub fn start_opts(
        tag: &str,
        allow: &[String],
        hosts: &[&str],
        forwards: &[String],
        agent_args: &[String],
        agent_env: &[(&str, &str)],
        at: &Where,
    ) -> Result<System> {
        let Gateway {
            pki,
            dmz,
            connector,
            gw_url,
            connector_args,
            dmz_args,
        } = Gateway::start(tag, allow, hosts, at)?;
        let mut cmd = at.cmd("sallyport");
        cmd.args([
            "run",
            "--gateway",
            &gw_url,
            "--socks",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--token-file",
        ])
        .arg(pki.p("alice-laptop.token"))
        .arg("--ca")
        .arg(pki.p("ca.crt"))
        .env("HOME", pki.dir.path())
        .env("XDG_CONFIG_HOME", pki.dir.path().join(".config"));
        // The way out is what the test says, not what this machine's environment says.
        for k in [
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
            "NO_PROXY",
            "no_proxy",
        ] {
            cmd.env_remove(k);
        }
        for f in forwards {
            cmd.arg("--forward").arg(f);
        }
        cmd.args(agent_args);
        for (k, v) in agent_env {
            cmd.env(k, v);
        }
        let agent = Proc::spawn("agent", &mut cmd)?;
        let socks = agent.addr(&["listening", "socks5"])?;
        let http = agent.addr(&["listening", "http"])?;
        let mut fw = Vec::new();
        for i in 0..forwards.len() {
            // Forwards are logged in the order given, each once.
            let line =
                agent.wait_for_nth(&["listening", "forward"], i + 1, Duration::from_secs(10))?;
            let a = field(&line, "addr")
                .and_then(|a| a.parse().ok())
                .with_context(|| format!("no addr= in `{line}`"))?;
            fw.push(a);
        }
        agent.wait_for(&["connected to the gateway"], Duration::from_secs(15))?;
        Ok(System {
            pki,
            dmz,
            connector,
            agent,
            gw_url,
            socks,
            http,
            forwards: fw,
            connector_args,
            dmz_args,
            at: at.clone(),
        })
    }

    /// `kill -9` of the DMZ, then a new one on the same port (same arguments), up once the
    /// connector is back.
    pub fn restart_dmz(&mut self) -> Result<()> {
        self.dmz.kill();
        self.dmz = Proc::spawn("dmz", self.at.cmd("sallyport-gateway").args(&self.dmz_args))?;
        self.dmz
            .wait_for(&["connector routes"], Duration::from_secs(20))?;
        Ok(())
    }

    /// Restarts the connector process (same arguments).
    pub fn restart_connector(&mut self) -> Result<()> {
        self.connector.kill();
        self.connector = Proc::spawn(
            "connector",
            self.at.cmd("sallyport-gateway").args(&self.connector_args),
        )?;
        Ok(())
    }
}

/// Allow rules for a service reached as `backend.internal` on 127.0.0.1.
pub fn allow_backend(port: u16) -> Vec<String> {
    vec![
        format!("backend.internal:{port}"),
        format!("127.0.0.1/32:{port}"),
    ]
}

/// The TCP sockets a process holds, as (state, local address) from `/proc/net/tcp{,6}`
/// (state `0A` is LISTEN, `01` ESTABLISHED).
pub fn tcp_sockets_of(pid: u32) -> Vec<(String, String)> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy().to_string();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && inodes.contains(f[9]) {
                out.push((f[3].to_string(), f[1].to_string()));
            }
        }
    }
    out
}

/// A real squid on loopback for one test, with Basic authentication (`basic_ncsa_auth`) when
/// `basic_user` is given. Its access log proves what went through it.
pub struct Squid {
    pub port: u16,
    pub dir: TempDir,
    _proc: Proc,
    /// Its service name, the prefix of its shared memory segments.
    service: String,
}

impl Drop for Squid {
    fn drop(&mut self) {
        self._proc.kill();
        // A squid that is killed leaves its segments in /dev/shm.
        let prefix = format!("{}-", self.service);
        if let Ok(dir) = std::fs::read_dir("/dev/shm") {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// Where a test squid runs (default: on 127.0.0.1, a free port, in this namespace).
#[derive(Clone, Debug, Default)]
pub struct SquidOpts {
    /// Run inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    pub ip: Option<std::net::IpAddr>,
    pub port: Option<u16>,
    /// Extra squid.conf lines (each ending in `\n`), placed before the access rules.
    pub extra: String,
}

/// How the test squid authenticates (each with squid's own helper, except NTLM).
#[derive(Clone, Copy)]
pub enum SquidAuth<'a> {
    None,
    /// `basic_ncsa_auth` with an htpasswd file.
    Basic {
        user: &'a str,
        password: &'a str,
    },
    /// `digest_file_auth` with a plain `user:password` file.
    Digest {
        user: &'a str,
        password: &'a str,
    },
    /// Our `sp-ntlm-helper`, which checks the NTLMv2 response against `password` (squid's
    /// `ntlm_fake_auth` would accept anything).
    Ntlm {
        password: &'a str,
    },
    /// squid's stock `ntlm_fake_auth` (Debian ships it): accepts any user, and sends a
    /// challenge whose TargetName points outside the message.
    NtlmFake,
    /// `negotiate_kerberos_auth` for `HTTP/localhost` with the realm's keytab.
    Negotiate {
        kdc: &'a crate::kdc::Kdc,
    },
    /// TLS inspection: no authentication, but every CONNECT is bumped and the server's
    /// certificate re-signed with this CA (`ssl_bump`, `security_file_certgen`).
    Bump {
        ca_cert: &'a Path,
        ca_key: &'a Path,
    },
}

impl Squid {
    pub fn start(tag: &str, basic_user: Option<(&str, &str)>) -> Result<Squid> {
        match basic_user {
            Some((user, password)) => Squid::start_with(tag, SquidAuth::Basic { user, password }),
            None => Squid::start_with(tag, SquidAuth::None),
        }
    }

    pub fn start_with(tag: &str, how: SquidAuth<'_>) -> Result<Squid> {
        Squid::start_opts(tag, how, &SquidOpts::default())
    }

    /// Like [`Squid::start_with`], anywhere: in a network namespace, on another address, with
    /// extra configuration lines.
    pub fn start_opts(tag: &str, how: SquidAuth<'_>, opts: &SquidOpts) -> Result<Squid> {
        // A port picked here was free when picked, not necessarily when squid binds it (ten
        // test binaries at once): squid then says so and exits, and another port is tried.
        for _ in 0..2 {
            match Squid::start_once(tag, how, opts) {
                Err(e) if opts.port.is_none() && e.to_string().contains(PORT_TAKEN) => {
                    eprintln!(
                        "{e}
(trying another port)"
                    );
                }
                r => return r,
            }
        }
        Squid::start_once(tag, how, opts)
    }

    fn start_once(tag: &str, how: SquidAuth<'_>, opts: &SquidOpts) -> Result<Squid> {
        require_tool("squid");
        require_tool("openssl");
        let dir = TempDir::new(tag);
        let d = dir.path();
        // squid drops to its own user: it must be able to write its logs here.
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        let port = match opts.port {
            Some(p) => p,
            None => TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        };
        let ip = opts.ip.unwrap_or([127, 0, 0, 1].into());
        let world_readable = |p: &Path| {
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        };
        let require_auth = "acl authed proxy_auth REQUIRED\nhttp_access allow authed\n";
        let mut http_port = format!("http_port {ip}:{port}");
        let mut env: Vec<(String, String)> = Vec::new();
        let auth = match how {
            SquidAuth::None => "http_access allow all\n".to_string(),
            SquidAuth::Basic { user, password } => {
                let (code, hash, err) =
                    run(Command::new("openssl").args(["passwd", "-apr1", password]))?;
                if code != 0 {
                    bail!("openssl passwd: {err}");
                }
                std::fs::write(d.join("passwd"), format!("{user}:{}\n", hash.trim()))?;
                world_readable(&d.join("passwd"))?;
                format!(
                    "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\nauth_param basic realm corp\n{require_auth}",
                    d.join("passwd").display()
                )
            }
            SquidAuth::Digest { user, password } => {
                std::fs::write(d.join("digest"), format!("{user}:{password}\n"))?;
                world_readable(&d.join("digest"))?;
                format!(
                    "auth_param digest program /usr/lib/squid/digest_file_auth {}\nauth_param digest realm corp\nauth_param digest children 2\n{require_auth}",
                    d.join("digest").display()
                )
            }
            SquidAuth::Ntlm { password } => {
                std::fs::write(d.join("ntlm-password"), password)?;
                world_readable(&d.join("ntlm-password"))?;
                format!(
                    "auth_param ntlm program {} {}\nauth_param ntlm children 2\n{require_auth}",
                    bin("sp-ntlm-helper").display(),
                    d.join("ntlm-password").display()
                )
            }
            SquidAuth::NtlmFake => format!(
                "auth_param ntlm program /usr/lib/squid/ntlm_fake_auth\nauth_param ntlm children 2\n{require_auth}"
            ),
            SquidAuth::Negotiate { kdc } => {
                // The helper runs as squid's user: it must read the keytab.
                world_readable(&kdc.keytab())?;
                env = kdc.env();
                format!(
                    "auth_param negotiate program {} -s {} -k {}\nauth_param negotiate children 2\n{require_auth}",
                    crate::kdc::SQUID_NEGOTIATE_HELPER,
                    kdc.service_principal(),
                    kdc.keytab().display()
                )
            }
            SquidAuth::Bump { ca_cert, ca_key } => {
                let db = d.join("ssl_db");
                let (code, _, err) = run(Command::new("/usr/lib/squid/security_file_certgen")
                    .arg("-c")
                    .arg("-s")
                    .arg(&db)
                    .args(["-M", "4MB"]))?;
                if code != 0 {
                    bail!("security_file_certgen -c: {err}");
                }
                run(Command::new("chmod").args(["-R", "a+rwX"]).arg(&db))?;
                let pem = d.join("bump-ca.pem");
                std::fs::write(
                    &pem,
                    format!(
                        "{}{}",
                        std::fs::read_to_string(ca_cert)?,
                        std::fs::read_to_string(ca_key)?
                    ),
                )?;
                world_readable(&pem)?;
                http_port = format!(
                    "http_port {ip}:{port} ssl-bump generate-host-certificates=on dynamic_cert_mem_cache_size=4MB tls-cert={}",
                    pem.display()
                );
                format!(
                    "sslcrtd_program /usr/lib/squid/security_file_certgen -s {} -M 4MB\nsslcrtd_children 2\nacl step1 at_step SslBump1\nssl_bump peek step1\nssl_bump bump all\ntls_outgoing_options flags=DONT_VERIFY_PEER\nhttp_access allow all\n",
                    db.display()
                )
            }
        };
        let conf = format!(
            "{http_port}\npid_filename {d}/squid.pid\naccess_log stdio:{d}/access.log\ncache_log {d}/cache.log\ncache deny all\ncoredump_dir {d}\nshutdown_lifetime 0 seconds\n{extra}{auth}http_access deny all\n",
            d = d.display(),
            extra = opts.extra
        );
        std::fs::write(d.join("squid.conf"), conf)?;
        let mut cmd = match &opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "squid"]);
                c
            }
            None => Command::new("squid"),
        };
        // A service name of its own: squid names its shared memory segments after it
        // (`/dev/shm/<name>-cf__metadata.shm`), and two squids of one name (tests in parallel,
        // or a segment a killed one left behind) refuse to start ("shm_open: File exists").
        static SQUIDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let service = format!(
            "sp{}x{}",
            std::process::id(),
            SQUIDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let proc = Proc::spawn(
            "squid",
            cmd.args(["-N", "-n", &service, "-f"])
                .arg(d.join("squid.conf"))
                .envs(env),
        )?;
        // Ready when its log says it accepts connections on its port (and, here, it does): a
        // connection alone could reach whoever took the port first.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = std::fs::read_to_string(d.join("cache.log")).unwrap_or_default();
            let accepting = log
                .lines()
                .any(|l| l.contains("Accepting") && l.contains(&format!(":{port}")));
            if accepting
                && (opts.netns.is_some() || TcpStream::connect(("127.0.0.1", port)).is_ok())
            {
                break;
            }
            if log.contains(PORT_TAKEN) || Instant::now() > deadline {
                bail!("squid did not start on port {port}: {}\n{log}", proc.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Squid {
            port,
            dir,
            _proc: proc,
            service,
        })
    }

    /// Waits until the access log has a line containing every one of `needles` (squid logs a
    /// tunnel when it ends), and returns the log.
    pub fn wait_for_log(&self, needles: &[&str], within: Duration) -> Result<String> {
        file_line(&self.dir.path().join("access.log"), needles, within)
            .map(|_| self.access_log())
            .map_err(|e| anyhow::anyhow!("squid's access log: {e}"))
    }

    /// Stops squid (a restart is a new [`Squid::start_opts`] with the same port). It is asked
    /// to stop first, so that it logs the tunnels it was carrying.
    pub fn kill(&mut self) {
        self._proc.terminate(Duration::from_secs(5));
    }

    pub fn cache_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cache.log")).unwrap_or_default()
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

/// What squid (and the OS) say when its port is taken.
const PORT_TAKEN: &str = "Address already in use";

/// A plain HTTP server on loopback that answers every request with `body` (e.g. a PAC file);
/// returns its port.
pub fn file_server(body: String, content_type: &'static str) -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for s in l.incoming().map_while(|s| s.ok()) {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(match s.try_clone() {
                    Ok(s) => s,
                    Err(_) => return,
                });
                let mut line = String::new();
                while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    if line == "\r\n" || line == "\n" {
                        break;
                    }
                    line.clear();
                }
                let mut w = s;
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    Ok(port)
}

/// A port on loopback where nothing listens (bound, then released).
pub fn dead_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl System {
    /// The gateway's port (for matching proxy logs: `CONNECT 127.0.0.1:PORT`).
    pub fn gw_port(&self) -> u16 {
        self.gw_url
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    /// Another agent against this system's gateway (no local ports but SOCKS on port 0), with
    /// extra arguments and environment; it is not waited for.
    pub fn spawn_agent(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let mut cmd = self.agent_command("run", args, env);
        cmd.args(["--socks", "127.0.0.1:0", "--http", "off"]);
        Proc::spawn(name, &mut cmd)
    }

    /// Runs `sallyport doctor` against this system: (exit code, stdout, stderr).
    pub fn doctor(&self, args: &[&str], env: &[(&str, &str)]) -> Result<(i32, String, String)> {
        run(&mut self.agent_command("doctor", args, env))
    }

    /// `sallyport SUB` against this system's gateway, with its token and CA, run where the
    /// system runs.
    pub fn agent_command(&self, sub: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = self.at.cmd("sallyport");
        cmd.args([sub, "--gateway", &self.gw_url, "--token-file"])
            .arg(self.pki.p("alice-laptop.token"))
            .arg("--ca")
            .arg(self.pki.p("ca.crt"))
            .args(args)
            .env("HOME", self.pki.dir.path())
            .env("XDG_CONFIG_HOME", self.pki.dir.path().join(".config"))
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env_remove("SALLYPORT_PROXY_PASSWORD");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// A real dante SOCKS5 server on loopback; with a user, `socksmethod: username` (dante checks
/// the system's password database, so the test creates a throwaway system user and removes it).
pub struct Dante {
    pub port: u16,
    pub dir: TempDir,
    _proc: Proc,
    user: Option<String>,
}

impl Dante {
    pub fn start(tag: &str, user: Option<(&str, &str)>) -> Result<Dante> {
        require_tool("danted");
        let dir = TempDir::new(tag);
        let d = dir.path();
        let port = dead_port()?;
        let mut created = None;
        let method = match user {
            Some((name, password)) => {
                let _ = run(Command::new("userdel").arg(name));
                let (code, _, err) = run(Command::new("useradd")
                    .args(["--no-create-home", "--shell", "/usr/sbin/nologin"])
                    .arg(name))?;
                if code != 0 {
                    bail!("useradd {name}: {err}");
                }
                created = Some(name.to_string());
                let mut child = Command::new("chpasswd").stdin(Stdio::piped()).spawn()?;
                child
                    .stdin
                    .take()
                    .context("chpasswd stdin")?
                    .write_all(format!("{name}:{password}\n").as_bytes())?;
                if !child.wait()?.success() {
                    bail!("chpasswd failed");
                }
                "username"
            }
            None => "none",
        };
        let conf = format!(
            "logoutput: {d}/danted.log\ninternal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\nclientmethod: none\nsocksmethod: {method}\nuser.privileged: root\nuser.unprivileged: nobody\nclient pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n  log: error\n}}\nsocks pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n  log: connect disconnect error\n}}\n",
            d = d.display()
        );
        std::fs::write(d.join("danted.conf"), conf)?;
        let proc = Proc::spawn(
            "danted",
            Command::new("danted")
                .arg("-f")
                .arg(d.join("danted.conf"))
                .arg("-p")
                .arg(d.join("danted.pid")),
        )?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("danted did not start: {}", proc.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Dante {
            port,
            dir,
            _proc: proc,
            user: created,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("danted.log")).unwrap_or_default()
    }
}

impl Drop for Dante {
    fn drop(&mut self) {
        if let Some(u) = &self.user {
            let _ = Command::new("userdel").arg(u).output();
        }
    }
}

/// A "corporate" CA for TLS-inspection tests (what squid's `ssl_bump` re-signs with):
/// `CN=Corp Inspection CA, O=Corp`, written as `ca.crt`/`ca.key` into `dir`.
pub fn corp_ca(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    require_tool("openssl");
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (code, _, err) = run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args([
            "-subj",
            "/CN=Corp Inspection CA/O=Corp",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]))?;
    if code != 0 {
        bail!("openssl req: {err}");
    }
    Ok((cert, key))
}

/// [`socks5_connect`], tried every 100 ms until it succeeds (panics after `within`): for a
/// system whose connector may not have attached yet.
pub fn socks5_connect_within(
    socks: SocketAddr,
    host: &str,
    port: u16,
    within: Duration,
) -> TcpStream {
    let started = Instant::now();
    loop {
        match socks5_connect(socks, host, port) {
            Ok(s) => return s,
            Err(e) => assert!(started.elapsed() < within, "never connected: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SOCKS5 (no authentication) `CONNECT host:port` by name through `socks`; the stream after a
/// success reply, or the reply code as an error.
pub fn socks5_connect(socks: SocketAddr, host: &str, port: u16) -> Result<TcpStream> {
    let mut s = TcpStream::connect(socks)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&[5, 1, 0])?;
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req)?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep)?;
    if rep[1] != 0 {
        bail!("SOCKS5 reply {}", rep[1]);
    }
    Ok(s)
}
