//! `sallyport`: parse arguments, start tracing, validate config, call the library.
//!
//! Exit codes: 0 ok, 1 runtime failure, 64 bad configuration or usage.

use agent::config::{self, AgentArgs, ConfigError};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "sallyport",
    version,
    about = "Sallyport agent: reach services inside a trusted network through the corporate egress"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (RUST_LOG syntax), e.g. info, debug.
    #[arg(long, global = true, env = "SALLYPORT_LOG", default_value = "info")]
    log: String,
    /// Worker threads. One is plenty for a desktop (it moves several Gbit/s) and keeps the
    /// agent small and quiet; raise it for a shared jump host.
    #[arg(long, global = true, env = "SALLYPORT_THREADS", default_value_t = 1)]
    threads: usize,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: local SOCKS5/HTTP proxy ports and forwards, tunnelled to the gateway.
    Run(AgentArgs),
    /// Find the way out: try every candidate (proxy, PAC, WPAD, OS settings, direct), say how
    /// long each took and why it failed, and which one the agent would use. Exit 0 when one works.
    Doctor(AgentArgs),
    /// Enroll this desktop: check the token against the gateway once, pin the gateway's key, and
    /// store token and config for this user. The token comes from --token-file, stdin, or a
    /// prompt that does not echo.
    Enroll {
        /// The gateway, e.g. wss://gw.example.com/
        url: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Remove what `enroll` stored (token, pinned key, config).
    Logout,
    /// What the running agent is doing: connected or not, the way out, latency, streams, bytes.
    Status,
    /// The agent as a per-user service (systemd --user, LaunchAgent, Windows Run key): no admin
    /// rights needed.
    Service {
        #[arg(value_enum)]
        action: ServiceAction,
        /// The agent config the service runs with [default: the per-user agent.toml].
        #[arg(long, short = 'c')]
        config: Option<std::path::PathBuf>,
        /// The agent binary the service runs [default: this one] (for `unit`, when packaging).
        #[arg(long)]
        exe: Option<std::path::PathBuf>,
    },
    /// One tunnelled connection on stdin/stdout (ssh -o ProxyCommand='sallyport connect %h %p').
    Connect {
        host: String,
        port: u16,
        /// (`--socks ADDR` names the running agent's SOCKS5 port [default: from the config,
        /// else 127.0.0.1:1080]; without a running agent, the other flags let `connect` open its
        /// own session.)
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Bring up gateway, connector, an internal service and the agent on loopback, push traffic
    /// through them, and run until Ctrl-C.
    #[cfg(feature = "demo")]
    Demo {
        /// SOCKS5 port of the demo agent.
        #[arg(long, default_value = "127.0.0.1:1080")]
        socks: SocketAddr,
        /// HTTP proxy port of the demo agent.
        #[arg(long, default_value = "127.0.0.1:8118")]
        http: SocketAddr,
        /// Exit after the traffic went through (for scripts and CI).
        #[arg(long)]
        once: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ServiceAction {
    Install,
    Uninstall,
    Start,
    Stop,
    Status,
    /// Print the systemd user unit (for packages: /usr/lib/systemd/user/sallyport.service).
    Unit,
}

fn main() -> ExitCode {
    // Usage errors are configuration errors: exit 64 like every other bad input (help and
    // --version still exit 0).
    let cli: Cli = match uplink::cli::parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    // `connect` talks on stdout and the demo prints its own summary: keep their logs quiet.
    #[cfg(feature = "demo")]
    let quiet = matches!(
        cli.command,
        Command::Connect { .. }
            | Command::Demo { .. }
            | Command::Doctor(_)
            | Command::Service { .. }
            | Command::Enroll { .. }
            | Command::Logout
            | Command::Status
    );
    #[cfg(not(feature = "demo"))]
    let quiet = matches!(
        cli.command,
        Command::Connect { .. }
            | Command::Doctor(_)
            | Command::Service { .. }
            | Command::Enroll { .. }
            | Command::Logout
            | Command::Status
    );
    uplink::cli::logging(&cli.log, quiet);
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => uplink::cli::fail(
            "sallyport",
            e.as_ref(),
            e.downcast_ref::<ConfigError>().is_some(),
        ),
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Run(_) = &cli.command {
        // Before any thread starts (the runtime's workers, with --threads above 1).
        uplink::cli::keep_freed_memory();
    }
    let rt = uplink::cli::runtime(Some(cli.threads.clamp(1, 64)))?;
    match cli.command {
        Command::Run(args) => {
            let cfg = config::agent_config(args)?;
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                uplink::cli::shutdown_on_signal(shutdown.clone());
                agent::run(cfg, shutdown).await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Enroll { url, agent: args } => rt.block_on(async {
            match agent::enroll::enroll(&url, args).await {
                Ok(lines) => {
                    for l in lines {
                        println!("{l}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(agent::enroll::EnrollError::Config(c)) => Err(c.into()),
                Err(e) => {
                    eprintln!("sallyport: enroll: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }),
        Command::Status => rt.block_on(async {
            let path = agent::status::control_path()
                .ok_or_else(|| anyhow::anyhow!("no per-user control socket on this system (no config folder; on Windows: our own user cannot be read)"))?;
            match agent::status::query(&path).await {
                Ok(text) => {
                    print!("{text}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("sallyport: status: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }),
        Command::Logout => {
            for l in agent::enroll::logout()? {
                println!("{l}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Service {
            action,
            config,
            exe,
        } => {
            let exe = match exe {
                Some(e) => e,
                None => std::env::current_exe()?,
            };
            let config =
                match config {
                    Some(c) => Some(std::path::absolute(&c).map_err(|e| {
                        ConfigError::Invalid(format!("--config {}: {e}", c.display()))
                    })?),
                    None => None,
                };
            let spec = installer::ServiceSpec { exe, config };
            let action = match action {
                ServiceAction::Unit => {
                    print!("{}", installer::systemd_unit(&spec));
                    return Ok(ExitCode::SUCCESS);
                }
                ServiceAction::Install => installer::Action::Install,
                ServiceAction::Uninstall => installer::Action::Uninstall,
                ServiceAction::Start => installer::Action::Start,
                ServiceAction::Stop => installer::Action::Stop,
                ServiceAction::Status => installer::Action::Status,
            };
            let service = installer::Service::for_user(spec)?;
            for line in service.run(action)?.lines {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor(args) => {
            let cfg = config::agent_config(args)?;
            rt.block_on(async {
                let (report, ok) = agent::doctor::run(&cfg).await;
                print!("{report}");
                Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            })
        }
        Command::Connect {
            host,
            port,
            agent: args,
        } => rt.block_on(async {
            let cfg = config::agent_config(args.clone());
            let socks = args
                .socks
                .as_deref()
                .and_then(|s| s.parse::<SocketAddr>().ok())
                .or_else(|| cfg.as_ref().ok().and_then(|c| c.socks))
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1080)));
            match agent::connect::via_agent(socks, &host, port).await {
                Ok(s) => {
                    agent::connect::pipe_stdio(s).await?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(agent::connect::ProxyCommandError::Io(e))
                    if e.kind() == std::io::ErrorKind::ConnectionRefused =>
                {
                    // No agent running: open our own session if we know the gateway.
                    let cfg = cfg.map_err(|c| agent::connect::ProxyCommandError::NoAgent {
                        agent: socks,
                        why: c.to_string(),
                    })?;
                    let stream = agent::connect::direct(&cfg, &host, port)
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!("cannot reach {host}:{port} through the gateway: {e}")
                        })?;
                    agent::connect::pipe_stdio(stream).await?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }),
        #[cfg(feature = "demo")]
        Command::Demo { socks, http, once } => rt.block_on(async {
            let shutdown = CancellationToken::new();
            uplink::cli::shutdown_on_signal(shutdown.clone());
            agent::demo::run(agent::demo::DemoOptions { socks, http, once }, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }),
    }
}
