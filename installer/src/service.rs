//! Installing, removing, starting and stopping the per-user service.
//!
//! [`Service`] knows where its file goes ([`Service::for_user`] uses the OS's per-user folders;
//! tests point it at a temporary home) and whether to drive the service manager
//! (`systemctl --user`, `launchctl`, or nothing). File operations never touch anything that
//! does not carry [`crate::MARKER`].

use crate::{launchd_plist, systemd_unit, windows_run_command, ServiceSpec, MARKER};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The systemd unit name.
pub const UNIT_NAME: &str = "sallyport.service";
/// The launchd label.
pub const LAUNCHD_LABEL: &str = "com.sallyport.agent";
/// The Windows `Run` value name.
pub const WINDOWS_RUN_VALUE: &str = "Sallyport";
const WINDOWS_RUN_KEY: &str = r"HKCU\Software\Microsoft\Windows\CurrentVersion\Run";

/// `sallyport service <action>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Install,
    Uninstall,
    Start,
    Stop,
    Status,
}

/// Which service manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manager {
    /// systemd `--user` (Linux).
    Systemd,
    /// launchd LaunchAgent (macOS).
    Launchd,
    /// The `Run` key of the user's registry (Windows).
    WindowsRun,
}

impl Manager {
    /// The manager of this OS.
    pub fn current() -> Manager {
        if cfg!(target_os = "macos") {
            Manager::Launchd
        } else if cfg!(windows) {
            Manager::WindowsRun
        } else {
            Manager::Systemd
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(
        "{path} exists and was not written by `sallyport service install`; move it away first"
    )]
    NotOurs { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no home folder for this user: cannot place the service file")]
    NoHome,
    #[error("{0}")]
    Manager(String),
}

/// What an action did, one line per step, for the user to read.
#[derive(Debug, Default)]
pub struct Outcome {
    pub lines: Vec<String>,
}

impl Outcome {
    fn say(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }
}

/// The per-user service of one agent.
#[derive(Clone, Debug)]
pub struct Service {
    pub spec: ServiceSpec,
    pub manager: Manager,
    /// Where the unit/plist goes (Linux: `~/.config/systemd/user`; macOS:
    /// `~/Library/LaunchAgents`).
    pub dir: PathBuf,
    /// The agent's log file where the manager has no journal (macOS).
    pub log: PathBuf,
    /// Drive the service manager (`systemctl --user`, `launchctl`, `reg`); off in tests.
    pub manage: bool,
}

impl Service {
    /// The service for the current user, in the OS's per-user folders.
    pub fn for_user(spec: ServiceSpec) -> Result<Service, ServiceError> {
        let base = directories::BaseDirs::new().ok_or(ServiceError::NoHome)?;
        let manager = Manager::current();
        let dir = match manager {
            Manager::Systemd => base.config_dir().join("systemd").join("user"),
            Manager::Launchd => base.home_dir().join("Library").join("LaunchAgents"),
            Manager::WindowsRun => base.config_dir().join("sallyport"),
        };
        let log = match manager {
            Manager::Launchd => base
                .home_dir()
                .join("Library")
                .join("Logs")
                .join("sallyport.log"),
            _ => base.cache_dir().join("sallyport").join("agent.log"),
        };
        Ok(Service {
            spec,
            manager,
            dir,
            log,
            manage: true,
        })
    }

    /// The service file this installs (none on Windows: a registry value).
    pub fn file(&self) -> Option<PathBuf> {
        match self.manager {
            Manager::Systemd => Some(self.dir.join(UNIT_NAME)),
            Manager::Launchd => Some(self.dir.join(format!("{LAUNCHD_LABEL}.plist"))),
            Manager::WindowsRun => None,
        }
    }

    fn wants_link(&self) -> PathBuf {
        self.dir.join("default.target.wants").join(UNIT_NAME)
    }

    fn content(&self) -> String {
        match self.manager {
            Manager::Systemd => systemd_unit(&self.spec),
            Manager::Launchd => launchd_plist(&self.spec, &self.log),
            Manager::WindowsRun => windows_run_command(&self.spec),
        }
    }

    pub fn run(&self, action: Action) -> Result<Outcome, ServiceError> {
        match action {
            Action::Install => self.install(),
            Action::Uninstall => self.uninstall(),
            Action::Start => self.start(),
            Action::Stop => self.stop(),
            Action::Status => self.status(),
        }
    }

    /// Writes the service file (unless identical), enables it for the next logins and starts
    /// it now. Idempotent.
    pub fn install(&self) -> Result<Outcome, ServiceError> {
        let mut out = Outcome::default();
        let content = self.content();
        if let Some(path) = self.file() {
            match std::fs::read_to_string(&path) {
                Ok(old) if old == content => out.say(format!("{} is up to date", path.display())),
                Ok(old) if !old.contains(MARKER) => return Err(ServiceError::NotOurs { path }),
                Ok(_) => {
                    write(&path, &content)?;
                    out.say(format!("updated {}", path.display()));
                }
                Err(_) => {
                    write(&path, &content)?;
                    out.say(format!("wrote {}", path.display()));
                }
            }
        }
        match self.manager {
            Manager::Systemd => {
                // What `systemctl --user enable` does, done here so that it also works without a
                // running user manager (it then starts at the next login).
                let link = self.wants_link();
                if std::fs::read_link(&link).is_err() {
                    if let Some(parent) = link.parent() {
                        std::fs::create_dir_all(parent).map_err(|source| ServiceError::Write {
                            path: parent.to_path_buf(),
                            source,
                        })?;
                    }
                    symlink(Path::new("..").join(UNIT_NAME).as_path(), &link)?;
                    out.say(format!("enabled at login ({})", link.display()));
                }
                if self.manage {
                    match systemctl(&["daemon-reload"])
                        .and_then(|_| systemctl(&["restart", UNIT_NAME]))
                    {
                        Ok(_) => out.say("started (systemctl --user restart sallyport.service)"),
                        Err(e) => out.say(format!(
                            "not started now ({e}); it starts at your next login"
                        )),
                    }
                }
            }
            Manager::Launchd => {
                if self.manage {
                    let plist = self.file().unwrap_or_default();
                    let target = launchd_target();
                    let _ = run(
                        "launchctl",
                        &["bootout", &format!("{target}/{LAUNCHD_LABEL}")],
                    );
                    run(
                        "launchctl",
                        &["bootstrap", &target, &plist.display().to_string()],
                    )
                    .map_err(ServiceError::Manager)?;
                    out.say(format!(
                        "loaded into launchd ({target}); it starts at login"
                    ));
                }
            }
            Manager::WindowsRun => {
                if self.manage {
                    run(
                        "reg",
                        &[
                            "add",
                            WINDOWS_RUN_KEY,
                            "/v",
                            WINDOWS_RUN_VALUE,
                            "/t",
                            "REG_SZ",
                            "/d",
                            &content,
                            "/f",
                        ],
                    )
                    .map_err(ServiceError::Manager)?;
                    out.say(format!(
                        "{WINDOWS_RUN_KEY}\\{WINDOWS_RUN_VALUE} = {content}"
                    ));
                    self.start_detached(&mut out)?;
                }
            }
        }
        Ok(out)
    }

    /// Stops the service and removes what install created (and nothing else).
    pub fn uninstall(&self) -> Result<Outcome, ServiceError> {
        let mut out = Outcome::default();
        if self.manage {
            let _ = self.stop();
        }
        match self.manager {
            Manager::Systemd => {
                let link = self.wants_link();
                if std::fs::read_link(&link).is_ok_and(|t| t.ends_with(UNIT_NAME)) {
                    remove(&link)?;
                    out.say(format!("removed {}", link.display()));
                }
            }
            Manager::Launchd => {}
            Manager::WindowsRun => {
                if self.manage {
                    match run(
                        "reg",
                        &["delete", WINDOWS_RUN_KEY, "/v", WINDOWS_RUN_VALUE, "/f"],
                    ) {
                        Ok(_) => out.say(format!("removed {WINDOWS_RUN_KEY}\\{WINDOWS_RUN_VALUE}")),
                        Err(_) => out.say("no Run entry to remove"),
                    }
                }
            }
        }
        if let Some(path) = self.file() {
            match std::fs::read_to_string(&path) {
                Ok(text) if text.contains(MARKER) => {
                    remove(&path)?;
                    out.say(format!("removed {}", path.display()));
                }
                Ok(_) => return Err(ServiceError::NotOurs { path }),
                Err(_) => out.say(format!("{} was not installed", path.display())),
            }
        }
        if self.manage && self.manager == Manager::Systemd {
            let _ = systemctl(&["daemon-reload"]);
        }
        Ok(out)
    }

    pub fn start(&self) -> Result<Outcome, ServiceError> {
        let mut out = Outcome::default();
        match self.manager {
            Manager::Systemd => {
                systemctl(&["start", UNIT_NAME]).map_err(ServiceError::Manager)?;
                out.say("started");
            }
            Manager::Launchd => {
                run(
                    "launchctl",
                    &[
                        "kickstart",
                        &format!("{}/{LAUNCHD_LABEL}", launchd_target()),
                    ],
                )
                .map_err(ServiceError::Manager)?;
                out.say("started");
            }
            Manager::WindowsRun => self.start_detached(&mut out)?,
        }
        Ok(out)
    }

    pub fn stop(&self) -> Result<Outcome, ServiceError> {
        let mut out = Outcome::default();
        match self.manager {
            Manager::Systemd => {
                systemctl(&["stop", UNIT_NAME]).map_err(ServiceError::Manager)?;
            }
            Manager::Launchd => {
                run(
                    "launchctl",
                    &["bootout", &format!("{}/{LAUNCHD_LABEL}", launchd_target())],
                )
                .map_err(ServiceError::Manager)?;
            }
            Manager::WindowsRun => {
                let user = std::env::var("USERNAME").unwrap_or_default();
                let exe = self
                    .spec
                    .exe
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "sallyport.exe".into());
                run(
                    "taskkill",
                    &["/IM", &exe, "/FI", &format!("USERNAME eq {user}"), "/F"],
                )
                .map_err(ServiceError::Manager)?;
            }
        }
        out.say("stopped");
        Ok(out)
    }

    pub fn status(&self) -> Result<Outcome, ServiceError> {
        let mut out = Outcome::default();
        match self.file() {
            Some(path) if path.exists() => out.say(format!("installed: {}", path.display())),
            Some(path) => out.say(format!("not installed ({} is absent)", path.display())),
            None => {}
        }
        if self.manage {
            let state = match self.manager {
                Manager::Systemd => systemctl(&["is-active", UNIT_NAME]),
                Manager::Launchd => run(
                    "launchctl",
                    &["print", &format!("{}/{LAUNCHD_LABEL}", launchd_target())],
                )
                .map(|o| {
                    o.lines()
                        .find(|l| l.trim_start().starts_with("state ="))
                        .unwrap_or("loaded")
                        .trim()
                        .to_string()
                }),
                Manager::WindowsRun => {
                    run("reg", &["query", WINDOWS_RUN_KEY, "/v", WINDOWS_RUN_VALUE])
                }
            };
            match state {
                Ok(s) => out.say(format!("service: {}", s.trim())),
                Err(e) => out.say(format!("service: not running ({e})")),
            }
        }
        Ok(out)
    }

    fn start_detached(&self, out: &mut Outcome) -> Result<(), ServiceError> {
        let args = self.spec_args();
        Command::new(&self.spec.exe)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                ServiceError::Manager(format!("cannot start {}: {e}", self.spec.exe.display()))
            })?;
        out.say("started");
        Ok(())
    }

    fn spec_args(&self) -> Vec<String> {
        self.spec.args()
    }
}

fn write(path: &Path, content: &str) -> Result<(), ServiceError> {
    let err = |source| ServiceError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    std::fs::write(path, content).map_err(err)
}

fn remove(path: &Path) -> Result<(), ServiceError> {
    std::fs::remove_file(path).map_err(|source| ServiceError::Remove {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> Result<(), ServiceError> {
    std::os::unix::fs::symlink(target, link).map_err(|source| ServiceError::Write {
        path: link.to_path_buf(),
        source,
    })
}

#[cfg(not(unix))]
fn symlink(_target: &Path, _link: &Path) -> Result<(), ServiceError> {
    Ok(())
}

fn systemctl(args: &[&str]) -> Result<String, String> {
    let mut a = vec!["--user"];
    a.extend_from_slice(args);
    run("systemctl", &a)
}

/// `gui/<uid>` for launchctl.
fn launchd_target() -> String {
    let uid = run("id", &["-u"]).unwrap_or_default();
    format!("gui/{}", uid.trim())
}

/// Runs a tool; its stdout, or a one-line error with its stderr.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    match Command::new(program).args(args).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let out = String::from_utf8_lossy(&o.stdout);
            let text = if err.trim().is_empty() { out } else { err };
            Err(format!(
                "{program} {}: {}",
                args.join(" "),
                text.lines().next().unwrap_or("failed").trim()
            ))
        }
        Err(e) => Err(format!("cannot run {program}: {e}")),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sp-installer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn service(dir: &Path, manager: Manager) -> Service {
        Service {
            spec: ServiceSpec {
                exe: "/usr/bin/sallyport".into(),
                config: None,
            },
            manager,
            dir: dir.to_path_buf(),
            log: dir.join("agent.log"),
            manage: false,
        }
    }

    #[test]
    fn install_is_idempotent_and_uninstall_removes_only_what_it_made() {
        let home = temp("systemd");
        let dir = home.join("systemd/user");
        let s = service(&dir, Manager::Systemd);
        // Something of the user's that must survive.
        std::fs::create_dir_all(dir.join("default.target.wants")).unwrap();
        std::fs::write(dir.join("other.service"), "[Service]\n").unwrap();
        let first = s.install().unwrap();
        assert!(first.lines[0].starts_with("wrote"), "{:?}", first.lines);
        assert!(first
            .lines
            .iter()
            .any(|l| l.starts_with("enabled at login")));
        let link = dir.join("default.target.wants").join(UNIT_NAME);
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("../sallyport.service")
        );
        let again = s.install().unwrap();
        assert_eq!(again.lines.len(), 1, "{:?}", again.lines);
        assert!(again.lines[0].ends_with("is up to date"));
        // A new config path updates our file.
        let mut s2 = s.clone();
        s2.spec.config = Some("/etc/sallyport/agent.toml".into());
        assert!(s2.install().unwrap().lines[0].starts_with("updated"));
        s2.uninstall().unwrap();
        assert!(!dir.join(UNIT_NAME).exists() && std::fs::read_link(&link).is_err());
        assert!(
            dir.join("other.service").exists(),
            "uninstall removed the user's file"
        );
        let _ = std::fs::remove_dir_all(&home);
    }

    #[test]
    fn a_unit_of_someone_else_is_never_overwritten_or_removed() {
        let home = temp("foreign");
        let s = service(&home, Manager::Systemd);
        std::fs::write(home.join(UNIT_NAME), "[Service]\nExecStart=/bin/true\n").unwrap();
        let e = s.install().unwrap_err().to_string();
        assert!(
            e.contains("was not written by `sallyport service install`"),
            "{e}"
        );
        assert!(s.uninstall().is_err());
        assert!(home.join(UNIT_NAME).exists());
        let _ = std::fs::remove_dir_all(&home);
    }

    #[test]
    fn launch_agents_are_placed_and_removed_the_same_way() {
        let home = temp("launchd");
        let s = service(&home, Manager::Launchd);
        s.install().unwrap();
        let plist = home.join(format!("{LAUNCHD_LABEL}.plist"));
        assert!(std::fs::read_to_string(&plist)
            .unwrap()
            .contains("<key>ProgramArguments</key>"));
        s.uninstall().unwrap();
        assert!(!plist.exists());
        let _ = std::fs::remove_dir_all(&home);
    }
}
