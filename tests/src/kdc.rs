//! A real MIT Kerberos KDC for one test, in a temporary folder and on loopback only, so
//! Negotiate (Kerberos) proxy authentication is tested against the real thing rather than
//! against recorded tokens.
//!
//! [`Kdc::start`] writes `krb5.conf` and `kdc.conf` for the realm [`REALM`] with the KDC on a
//! free `127.0.0.1` port (UDP and TCP), creates the database (`kdb5_util`), the user
//! [`ALICE`] with [`ALICE_PASSWORD`] and the service `HTTP/localhost` with a random key exported
//! to a keytab (`kadmin.local`), and runs `krb5kdc -n` until the handle drops. [`Kdc::kinit`]
//! gets a ticket into a cache file in the same folder; [`Kdc::env`] names the variables a
//! process (or the test itself) needs to use this realm: `KRB5_CONFIG`, `KRB5CCNAME`,
//! `KRB5_KTNAME` and `KRB5RCACHEDIR`.
//!
//! Debian packages: `krb5-kdc` (krb5kdc, kdb5_util), `krb5-admin-server` (kadmin.local),
//! `krb5-user` (kinit); squid's helper comes with `squid` / `squid-openssl`.
//! Nothing here touches `/etc/krb5.conf`, the system's KDC or DNS.

use crate::{run, Proc, TempDir};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The test realm.
pub const REALM: &str = "SALLYPORT.TEST";
/// The user principal created in every KDC (`alice@SALLYPORT.TEST`).
pub const ALICE: &str = "alice";
/// Alice's password (a throwaway for the throwaway realm).
pub const ALICE_PASSWORD: &str = "alice-Pw-1234";
/// The HTTP service principal, whose key is in [`Kdc::keytab`].
pub const HTTP_SERVICE: &str = "HTTP/localhost";
/// squid's Negotiate/Kerberos helper (Debian path).
pub const SQUID_NEGOTIATE_HELPER: &str = "/usr/lib/squid/negotiate_kerberos_auth";

/// A running KDC; killed, and its folder removed, on drop.
pub struct Kdc {
    // Declared before `dir` so the KDC stops before its database is removed.
    proc: Proc,
    pub dir: TempDir,
    pub port: u16,
}

/// A Kerberos tool, looked up on PATH and then in the sbin folders (which non-root users often
/// lack on PATH). Fails, never skips, when it is missing.
pub fn krb_tool(name: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .with_context(|| {
            format!("`{name}` is required by this test: install krb5-kdc krb5-admin-server krb5-user (scripts/test.sh does)")
        })
}

impl Kdc {
    /// Sets up the realm and starts the KDC; `tag` names the temporary folder.
    pub fn start(tag: &str) -> Result<Kdc> {
        let dir = TempDir::new(tag);
        let d = dir.path().to_path_buf();
        let mut last_err = None;
        // The port is chosen by binding port 0 and releasing it; another process may take it
        // in between, so a KDC that cannot bind is retried on a new port.
        for _ in 0..5 {
            let port = free_port()?;
            write_config(&d, port)?;
            if !d.join("principal").exists() {
                create_database(&d)?;
            }
            match start_kdc(&d, port) {
                Ok(proc) => return Ok(Kdc { proc, dir, port }),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("the KDC did not start")))
    }

    pub fn krb5_conf(&self) -> PathBuf {
        self.dir.path().join("krb5.conf")
    }

    /// The ticket cache [`Kdc::kinit`] fills (a file; it does not exist before).
    pub fn ccache(&self) -> PathBuf {
        self.dir.path().join("ccache")
    }

    /// The keytab with the key of `HTTP/localhost@SALLYPORT.TEST`.
    pub fn keytab(&self) -> PathBuf {
        self.dir.path().join("http.keytab")
    }

    /// `HTTP/localhost@SALLYPORT.TEST`.
    pub fn service_principal(&self) -> String {
        format!("{HTTP_SERVICE}@{REALM}")
    }

    /// `user@SALLYPORT.TEST`.
    pub fn principal(&self, user: &str) -> String {
        format!("{user}@{REALM}")
    }

    /// The environment for a Kerberos client or service using this realm.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("KRB5_CONFIG".into(), self.krb5_conf().display().to_string()),
            (
                "KRB5CCNAME".into(),
                format!("FILE:{}", self.ccache().display()),
            ),
            (
                "KRB5_KTNAME".into(),
                format!("FILE:{}", self.keytab().display()),
            ),
            // Acceptors keep a replay cache; keep it here rather than in /var/tmp.
            (
                "KRB5RCACHEDIR".into(),
                self.dir.path().display().to_string(),
            ),
        ]
    }

    /// The part of [`Kdc::env`] a Kerberos client needs: the realm's config and the ticket cache.
    pub fn client_env(&self) -> Vec<(String, String)> {
        self.env()
            .into_iter()
            .filter(|(k, _)| k == "KRB5_CONFIG" || k == "KRB5CCNAME")
            .collect()
    }

    /// Gets a ticket for `user` into [`Kdc::ccache`] (kinit reads the password from stdin).
    pub fn kinit(&self, user: &str, password: &str) -> Result<()> {
        self.kinit_with(user, password, &[])
    }

    /// [`Kdc::kinit`] with extra kinit options, e.g. `["-l", "2s"]` for a ticket that expires.
    pub fn kinit_with(&self, user: &str, password: &str, options: &[&str]) -> Result<()> {
        let mut child = Command::new(krb_tool("kinit")?)
            .args(options)
            .arg("-c")
            .arg(format!("FILE:{}", self.ccache().display()))
            .arg(self.principal(user))
            .envs(self.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning kinit")?;
        child
            .stdin
            .take()
            .context("kinit stdin")?
            .write_all(format!("{password}\n").as_bytes())?;
        let out = wait_output(child, Duration::from_secs(20), "kinit")?;
        if !out.status.success() {
            bail!(
                "kinit {user} failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        Ok(())
    }

    /// Runs `kadmin.local -q QUERY` against this realm's database.
    pub fn kadmin(&self, query: &str) -> Result<String> {
        kadmin_local(self.dir.path(), query)
    }

    /// The KDC's log (stderr).
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Sends one request line (`YR <base64 token>`) to squid's `negotiate_kerberos_auth` for
    /// `HTTP/localhost@SALLYPORT.TEST` with this realm's keytab, and returns its answer line:
    /// `OK token=<base64> user=alice@SALLYPORT.TEST …` when it accepts (squid 3.4+; older
    /// helpers said `AF <token> <user>`), `BH …`/`NA …` when not.
    pub fn negotiate_helper(&self, request: &str) -> Result<String> {
        if !Path::new(SQUID_NEGOTIATE_HELPER).exists() {
            bail!("{SQUID_NEGOTIATE_HELPER} is required by this test: install squid (scripts/test.sh does)");
        }
        let mut child = Command::new(SQUID_NEGOTIATE_HELPER)
            .args(["-s", &self.service_principal()])
            .arg("-k")
            .arg(self.keytab())
            .envs(self.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning negotiate_kerberos_auth")?;
        let mut stdin = child.stdin.take().context("helper stdin")?;
        stdin.write_all(format!("{request}\n").as_bytes())?;
        stdin.flush()?;
        // Keep stdin open until the answer is read: the helper treats EOF as an error.
        let stdout = child.stdout.take().context("helper stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let answer = rx.recv_timeout(Duration::from_secs(20));
        drop(stdin);
        let _ = child.kill();
        let out = child.wait_with_output()?;
        match answer {
            Ok(line) if !line.trim().is_empty() => Ok(line.trim().to_string()),
            _ => bail!(
                "negotiate_kerberos_auth gave no answer; its stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

/// A loopback port free for both UDP and TCP at the time of asking.
fn free_port() -> Result<u16> {
    for _ in 0..20 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port for the KDC")
}

fn write_config(d: &Path, port: u16) -> Result<()> {
    let krb5 = format!(
        "[libdefaults]
    default_realm = {REALM}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    rdns = false
    dns_canonicalize_hostname = false
    forwardable = false

[realms]
    {REALM} = {{
        kdc = 127.0.0.1:{port}
    }}

[domain_realm]
    localhost = {REALM}
    .localhost = {REALM}
"
    );
    // kdc_listen/kdc_tcp_listen (MIT 1.15+, superseding kdc_ports/kdc_tcp_ports) take an
    // address: the KDC listens on loopback only.
    let kdc = format!(
        "[kdcdefaults]
    kdc_listen = 127.0.0.1:{port}
    kdc_tcp_listen = 127.0.0.1:{port}

[realms]
    {REALM} = {{
        database_name = {d}/principal
        key_stash_file = {d}/stash
        acl_file = {d}/kadm5.acl
        kdc_listen = 127.0.0.1:{port}
        kdc_tcp_listen = 127.0.0.1:{port}
        max_life = 10h
    }}

[logging]
    kdc = STDERR
    admin_server = FILE:{d}/kadmin.log
    default = FILE:{d}/krb5.log
",
        d = d.display()
    );
    std::fs::write(d.join("krb5.conf"), krb5)?;
    std::fs::write(d.join("kdc.conf"), kdc)?;
    std::fs::write(d.join("kadm5.acl"), "")?;
    Ok(())
}

/// The environment for the KDC's own tools.
fn admin_env(d: &Path) -> [(&'static str, PathBuf); 2] {
    [
        ("KRB5_CONFIG", d.join("krb5.conf")),
        ("KRB5_KDC_PROFILE", d.join("kdc.conf")),
    ]
}

fn kadmin_local(d: &Path, query: &str) -> Result<String> {
    let (code, out, err) = run(Command::new(krb_tool("kadmin.local")?)
        .args(["-r", REALM, "-q", query])
        .envs(admin_env(d))
        .stdin(Stdio::null()))?;
    // kadmin.local exits 0 even when the query fails; its errors go to stderr.
    if code != 0
        || err
            .lines()
            .any(|l| l.contains("while ") || l.contains("error"))
    {
        bail!("kadmin.local -q {query:?} failed: {out}{err}");
    }
    Ok(out)
}

fn create_database(d: &Path) -> Result<()> {
    let (code, out, err) = run(Command::new(krb_tool("kdb5_util")?)
        .args(["create", "-s", "-r", REALM, "-P", "master-Pw-1234"])
        .envs(admin_env(d))
        .stdin(Stdio::null()))?;
    if code != 0 {
        bail!("kdb5_util create failed: {out}{err}");
    }
    kadmin_local(d, &format!("addprinc -pw {ALICE_PASSWORD} {ALICE}"))?;
    kadmin_local(d, &format!("addprinc -randkey {HTTP_SERVICE}"))?;
    kadmin_local(
        d,
        &format!(
            "ktadd -k {} {HTTP_SERVICE}",
            d.join("http.keytab").display()
        ),
    )?;
    Ok(())
}

/// Starts `krb5kdc -n` and waits until it serves TCP on `port`.
fn start_kdc(d: &Path, port: u16) -> Result<Proc> {
    let proc = Proc::spawn(
        "krb5kdc",
        Command::new(krb_tool("krb5kdc")?)
            .args(["-n", "-r", REALM])
            .envs(admin_env(d)),
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = proc.log();
        if log.contains("commencing operation") && TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(proc);
        }
        if log.contains("in use") || log.contains("Cannot bind") || Instant::now() > deadline {
            bail!("krb5kdc did not start on 127.0.0.1:{port}:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a child with a deadline (killing it when exceeded) and collects its output.
fn wait_output(
    mut child: std::process::Child,
    timeout: Duration,
    what: &str,
) -> Result<std::process::Output> {
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child.wait_with_output()?)
}
