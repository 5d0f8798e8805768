//! The real Windows agent under Wine, for `tests/tests/windows.rs`.
//!
//! Once per test binary: the tools are installed when missing (Debian's `wine`, the mingw-w64
//! C compiler, the rustup target `x86_64-pc-windows-gnu`; never skipped: installed or failed with
//! the tool's name), `sallyport.exe` is built (`cargo build --target x86_64-pc-windows-gnu -p
//! sallyport`, a no-op when fresh), and beside it two small C programs are built from
//! `tests/windows/`:
//!
//! * `bcryptprimitives.dll`, a shim exporting `ProcessPrng` over `RtlGenRandom`: Rust's std needs
//!   `ProcessPrng`, which Wine 8 lacks (real Windows has it; the shim is never shipped);
//! * `sp-wnc.exe HOST PORT`, a netcat-like client, so the app connecting to the agent is a
//!   Windows process with a Windows owner, as on a desktop.
//!
//! Then one fresh Wine prefix in a temp folder (`wineboot`, ~10 s, ~700 MB) serves every test
//! of the binary; tests take [`Wine::lock`] so that one test's registry values or credentials
//! are never seen by another. The prefix is removed when the test binary exits.

use crate::{bin_dir, Proc};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

pub const TARGET: &str = "x86_64-pc-windows-gnu";

/// The Internet Options key the agent reads (WinINET's per-user proxy settings).
pub const INTERNET_SETTINGS: &str =
    r"HKCU\Software\Microsoft\Windows\CurrentVersion\Internet Settings";

/// Where `netsh winhttp set proxy` keeps WinHTTP's machine-wide proxy (value
/// [`WINHTTP_SETTINGS`], binary).
pub const WINHTTP_KEY: &str =
    r"HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Internet Settings\Connections";
pub const WINHTTP_SETTINGS: &str = "WinHttpSettings";

/// The `WinHttpSettings` blob naming `proxy` with the exceptions `bypass`, as hex for `reg add
/// /t REG_BINARY /d`: a 12-byte header (0x18, 0, the flags: 1 direct + 2 proxy), then each
/// string as a little-endian length and its bytes: the layout Wine's
/// `WinHttpGetDefaultProxyConfiguration` reads. The agent never parses the blob itself (it calls
/// that function, on Windows too), so the test exercises the agent's real path.
pub fn winhttp_settings_hex(proxy: &str, bypass: &str) -> String {
    let mut b = Vec::new();
    for word in [0x18u32, 0, 3] {
        b.extend(word.to_le_bytes());
    }
    for s in [proxy, bypass] {
        b.extend((s.len() as u32).to_le_bytes());
        b.extend(s.as_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A ready Wine prefix and the folder holding `sallyport.exe`, the shim and `sp-wnc.exe`.
pub struct Wine {
    pub prefix: PathBuf,
    pub exe_dir: PathBuf,
}

static WINE: OnceLock<std::result::Result<Wine, String>> = OnceLock::new();
static LOCK: Mutex<()> = Mutex::new(());

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Installs `packages` with apt-get when `tool` is not on PATH; fails naming the tool when that
/// does not provide it.
pub fn ensure_apt(tool: &str, packages: &[&str]) -> Result<()> {
    let package = packages.join(" ");
    if on_path(tool) {
        return Ok(());
    }
    eprintln!("windows tests: `{tool}` missing, installing {package}");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let apt = |args: &[&str]| -> Result<()> {
        let mut c = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        let out = c
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .with_context(|| format!("running apt-get to install `{tool}`"))?;
        if !out.status.success() {
            bail!(
                "`{tool}` is required by the Windows tests; apt-get {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    apt(&[&["install", "-y", "-qq"][..], packages].concat())?;
    if !on_path(tool) {
        bail!("`{tool}` is required by the Windows tests; installing {package} did not provide it");
    }
    Ok(())
}

/// Adds the rustup target when it is missing.
pub fn ensure_target() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("`rustup` is required by the Windows tests (to add the target)")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return Ok(());
    }
    eprintln!("windows tests: adding the rustup target {TARGET}");
    let st = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()?;
    if !st.success() {
        bail!("`rustup target add {TARGET}` failed");
    }
    Ok(())
}

/// The workspace root (the parent of the `tests` crate).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Builds `sallyport.exe` (debug, into this build's target folder) and the two C helpers
/// beside it; returns that folder.
pub fn build() -> Result<PathBuf> {
    let target_dir = bin_dir().parent().context("target dir")?.to_path_buf();
    let t = Instant::now();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // What `cargo test` set for this crate is not the nested build's: ring's build script
    // tracks CARGO_MANIFEST_DIR, and a changed value rebuilt ring and all above it (~2 min in
    // CI) instead of reusing the `sallyport.exe` that scripts/test.sh built.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("CARGO_BIN_EXE_")
            || k.starts_with("CARGO_CRATE_")
        {
            cmd.env_remove(&*k);
        }
    }
    let st = cmd
        .current_dir(workspace())
        .args(["build", "-q", "--target", TARGET, "-p", "sallyport"])
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .context("running cargo build for Windows")?;
    if !st.success() {
        bail!("cargo build --target {TARGET} -p sallyport failed");
    }
    eprintln!(
        "windows tests: sallyport.exe built in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let dir = target_dir.join(TARGET).join("debug");
    let src = workspace().join("tests").join("windows");
    for (source, out, libs) in [
        (
            "prng-shim.c",
            "bcryptprimitives.dll",
            &["-shared", "-ladvapi32"][..],
        ),
        ("sp-wnc.c", "sp-wnc.exe", &["-lws2_32"][..]),
    ] {
        let o = Command::new("x86_64-w64-mingw32-gcc")
            .args(["-O2", "-o"])
            .arg(dir.join(out))
            .arg(src.join(source))
            .args(libs)
            .output()
            .context("running x86_64-w64-mingw32-gcc")?;
        if !o.status.success() {
            bail!(
                "x86_64-w64-mingw32-gcc {source}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    Ok(dir)
}

extern "C" {
    fn atexit(cb: extern "C" fn()) -> i32;
}

extern "C" fn remove_prefix() {
    if let Some(Ok(w)) = WINE.get() {
        let _ = Command::new("wineserver")
            .arg("-k")
            .env("WINEPREFIX", &w.prefix)
            .output();
        let _ = std::fs::remove_dir_all(&w.prefix);
    }
}

fn setup() -> Result<Wine> {
    let t = Instant::now();
    ensure_apt("wine", &["wine64", "wine"])?;
    ensure_apt("x86_64-w64-mingw32-gcc", &["gcc-mingw-w64-x86-64"])?;
    ensure_target()?;
    let exe_dir = build()?;
    let prefix = std::env::temp_dir().join(format!("sallyport-wine-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&prefix);
    let wine = Wine { prefix, exe_dir };
    let boot = Instant::now();
    let out = wine
        .command("wineboot")
        .arg("-i")
        .output()
        .context("running wineboot")?;
    if !out.status.success() {
        bail!(
            "wineboot -i failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "windows tests: Wine prefix ready in {:.1} s (setup {:.1} s)",
        boot.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    Ok(wine)
}

impl Wine {
    /// The shared, ready Wine (set up on first use); panics with the reason when it cannot be.
    pub fn get() -> &'static Wine {
        let w = WINE.get_or_init(|| {
            let r = setup().map_err(|e| format!("{e:#}"));
            if r.is_ok() {
                // SAFETY: registers a plain function without captures, run once at exit.
                unsafe { atexit(remove_prefix) };
            }
            r
        });
        match w {
            Ok(w) => w,
            Err(e) => panic!("the Windows test setup failed: {e}"),
        }
    }

    /// One Windows test at a time (the prefix's registry and credentials are shared).
    pub fn lock() -> MutexGuard<'static, ()> {
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A Wine tool (`wine`, `wineboot`, `wineserver`) for this prefix, quiet, headless, with no
    /// proxy settings from this machine's environment.
    pub fn command(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all")
            // No Mono/Gecko install prompts.
            .env("WINEDLLOVERRIDES", "mscoree,mshtml=")
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY");
        for k in [
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
            "NO_PROXY",
            "no_proxy",
            "SALLYPORT_PROXY_PASSWORD",
            "SALLYPORT_TOKEN",
        ] {
            c.env_remove(k);
        }
        c
    }

    /// `wine EXE` for one of the built Windows programs (`sallyport.exe`, `sp-wnc.exe`).
    pub fn exe(&self, name: &str) -> Command {
        let mut c = self.command("wine");
        c.arg(self.exe_dir.join(name));
        c
    }

    /// A Linux path as the Windows programs see it (`Z:\tmp\…`).
    pub fn path(p: &Path) -> String {
        format!("Z:{}", p.display().to_string().replace('/', "\\"))
    }

    /// Runs `wine reg ARGS`; fails with its output when it fails.
    pub fn reg(&self, args: &[&str]) -> Result<String> {
        let out = self.command("wine").arg("reg").args(args).output()?;
        if !out.status.success() {
            bail!(
                "wine reg {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sets a value under [`INTERNET_SETTINGS`] (`kind`: `REG_SZ`, `REG_DWORD`, `REG_BINARY`).
    pub fn set_internet_setting(&self, name: &str, kind: &str, data: &str) -> Result<()> {
        self.reg(&[
            "add",
            INTERNET_SETTINGS,
            "/v",
            name,
            "/t",
            kind,
            "/d",
            data,
            "/f",
        ])
        .map(|_| ())
    }

    /// Removes the proxy values a test may have set, WinINET's and WinHTTP's (absent ones are
    /// fine).
    pub fn clear_internet_settings(&self) {
        for v in [
            "ProxyEnable",
            "ProxyServer",
            "ProxyOverride",
            "AutoConfigURL",
        ] {
            let _ = self.reg(&["delete", INTERNET_SETTINGS, "/v", v, "/f"]);
        }
        let _ = self.reg(&[
            "delete",
            &format!(r"{INTERNET_SETTINGS}\Connections"),
            "/v",
            "DefaultConnectionSettings",
            "/f",
        ]);
        let _ = self.reg(&["delete", WINHTTP_KEY, "/v", WINHTTP_SETTINGS, "/f"]);
    }

    /// Sets WinHTTP's machine-wide proxy as `netsh winhttp set proxy PROXY BYPASS` does.
    pub fn set_winhttp_proxy(&self, proxy: &str, bypass: &str) -> Result<()> {
        self.reg(&[
            "add",
            WINHTTP_KEY,
            "/v",
            WINHTTP_SETTINGS,
            "/t",
            "REG_BINARY",
            "/d",
            &winhttp_settings_hex(proxy, bypass),
            "/f",
        ])
        .map(|_| ())
    }

    /// Runs a Windows program to completion with `input` (a file) on stdin; returns its output.
    pub fn run_with_input(&self, cmd: &mut Command, input: &[u8]) -> Result<Output> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.prefix.join(format!("stdin-{n}"));
        std::fs::write(&path, input)?;
        let out = cmd
            .stdin(Stdio::from(std::fs::File::open(&path)?))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output();
        let _ = std::fs::remove_file(&path);
        Ok(out?)
    }

    /// Runs a Windows program with `input` written to its stdin, which stays open (as ssh keeps
    /// a ProxyCommand's stdin open) until `done` says the output so far is complete; then stdin
    /// is closed and the program runs to its end.
    ///
    /// Why not close stdin at once: a client that half-closes right after its request can get
    /// no answer (the agent's HTTP front closes on the client's EOF; once seen through SOCKS5
    /// under Wine too); see docs/install.md, "What running under Wine found".
    pub fn exchange(
        &self,
        cmd: &mut Command,
        input: Vec<u8>,
        done: impl Fn(&[u8]) -> bool,
    ) -> Result<Output> {
        use std::io::{Read, Write};
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let (close_tx, close_rx) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
            let _ = stdin.flush();
            // Kept open until the answer is complete (or the program ended).
            let _ = close_rx.recv_timeout(std::time::Duration::from_secs(120));
        });
        let mut stderr = child.stderr.take().context("stderr")?;
        let err_reader = std::thread::spawn(move || {
            let mut e = Vec::new();
            let _ = stderr.read_to_end(&mut e);
            e
        });
        let mut stdout = child.stdout.take().context("stdout")?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut closed = false;
        loop {
            let n = stdout.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if !closed && done(&out) {
                let _ = close_tx.send(());
                closed = true;
            }
        }
        let _ = close_tx.send(());
        let status = child.wait()?;
        let _ = writer.join();
        let stderr = err_reader.join().unwrap_or_default();
        Ok(Output {
            status,
            stdout: out,
            stderr,
        })
    }

    /// `sallyport.exe ARGS` as a long-running process whose log is collected.
    pub fn spawn_agent(&self, name: &str, args: &[String]) -> Result<Proc> {
        Proc::spawn(name, self.exe("sallyport.exe").args(args))
    }
}

/// Whether `raw` holds a whole HTTP/1.1 response with a `Content-Length` body.
pub fn http_complete(raw: &[u8]) -> bool {
    let Ok((head, body)) = split_response(raw) else {
        return false;
    };
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .is_some_and(|len| body.len() >= len)
}

/// Splits an HTTP/1.1 response into (status line and headers, body).
pub fn split_response(raw: &[u8]) -> Result<(String, &[u8])> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| {
            format!(
                "no end of headers in {} bytes: {:?}",
                raw.len(),
                String::from_utf8_lossy(&raw[..raw.len().min(300)])
            )
        })?;
    Ok((
        String::from_utf8_lossy(&raw[..end]).into_owned(),
        &raw[end + 4..],
    ))
}
