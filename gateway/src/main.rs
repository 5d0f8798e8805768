//! `sallyport-gateway`: parse arguments, start tracing, validate config, call the library.
//!
//! Exit codes: 0 ok, 1 runtime failure, 64 bad configuration or usage.

#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gateway::auth::{self, TokenEntry};
use gateway::config::{self, ConfigError, ConnectorArgs, DmzArgs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "sallyport-gateway",
    version,
    about = "Sallyport gateway: the DMZ switch and the trusted-network connector"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (RUST_LOG syntax), e.g. info, debug, gateway=debug.
    #[arg(long, global = true, env = "SALLYPORT_LOG", default_value = "info")]
    log: String,
    /// Worker threads [default: one per core].
    #[arg(long, global = true, env = "SALLYPORT_THREADS")]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the DMZ gateway: the only listener of the system.
    Dmz(DmzArgs),
    /// Run a connector inside the trusted network (dials out; listens on nothing).
    Connector(ConnectorArgs),
    /// Manage tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the DMZ's inner-channel public key (creating the key file when missing): agents
    /// pin it (`sallyport enroll` shows the same), so that a TLS-inspecting proxy reads nothing.
    InnerKey(DmzArgs),
    /// Write a self-signed CA and a gateway certificate for trials.
    Cert {
        /// DNS name or IP address the gateway is reached at. Repeatable.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Folder to write ca.crt, ca.key, gateway.crt, gateway.key into.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Agent,
    Connector,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token: its hash is appended to the token file, the token itself is printed once
    /// (or written to --out with mode 0600).
    New {
        #[arg(long, value_enum)]
        kind: Kind,
        /// Token id: lowercase letters, digits and '-' (e.g. alice-laptop).
        #[arg(long)]
        id: String,
        /// Display name (user or machine) [default: the id].
        #[arg(long)]
        name: Option<String>,
        /// Comma-separated groups, used by connector allow rules.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Lifetime, e.g. 90d or 12h [default: no expiry].
        #[arg(long)]
        expires: Option<String>,
        /// Connectors: a route this credential may advertise. Repeatable.
        #[arg(long = "route")]
        routes: Vec<String>,
        /// The token file to append to.
        #[arg(long)]
        tokens: PathBuf,
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // Usage errors are configuration errors: exit 64 like every other bad input (help and
    // --version still exit 0).
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    egress::logging::init(&cli.log);
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let bad_config = e.downcast_ref::<ConfigError>().is_some();
            eprintln!("sallyport-gateway: error: {e:#}");
            ExitCode::from(if bad_config { 64 } else { 1 })
        }
    }
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n.clamp(1, 256));
    }
    Ok(b.enable_all().build()?)
}

/// Cancels the token on Ctrl-C or SIGTERM.
fn shutdown_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        token.cancel();
    });
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dmz(args) => {
            let rt = runtime(cli.threads)?;
            rt.block_on(async {
                // Token files are read inside the runtime (the reloader is a task).
                let cfg = config::dmz_config(args)?;
                let shutdown = CancellationToken::new();
                shutdown_on_signal(shutdown.clone());
                gateway::dmz::run(cfg, shutdown)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        Command::Connector(args) => {
            let cfg = config::connector_config(args)?;
            let rt = runtime(cli.threads)?;
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                shutdown_on_signal(shutdown.clone());
                gateway::connector::run(cfg, shutdown).await;
                Ok(())
            })
        }
        Command::InnerKey(args) => {
            let path = config::inner_key_path(&args)?;
            let (key, created) =
                gateway::dmz::inner::load_or_create(&path).map_err(ConfigError::Invalid)?;
            if created {
                eprintln!("created {}", path.display());
            }
            println!("{}", key.public());
            Ok(())
        }
        Command::Cert { names, out } => {
            let pki = gateway::certs::trial_pki(&names)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            let written = gateway::certs::write_trial_pki(&pki, &out)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            for p in written {
                println!("wrote {}", p.display());
            }
            println!("give ca.crt to agents and connectors (--ca); keep ca.key offline");
            {
                use rustls::pki_types::{pem::PemObject, CertificateDer};
                if let Some(pin) = CertificateDer::from_pem_slice(pki.cert_pem.as_bytes())
                    .ok()
                    .and_then(|der| egress::cert::key_pin(&der))
                {
                    println!("gateway key pin: {pin} (`sallyport enroll` shows the same)");
                }
            }
            Ok(())
        }
        Command::Token(TokenCommand::New {
            kind,
            id,
            name,
            groups,
            expires,
            routes,
            tokens,
            out,
        }) => {
            let expires = match expires {
                Some(s) => {
                    let d: Duration = humantime::parse_duration(&s).map_err(|e| {
                        ConfigError::Invalid(format!("--expires `{s}`: {e}; write e.g. 90d"))
                    })?;
                    Some(SystemTime::now() + d)
                }
                None => None,
            };
            for r in &routes {
                r.parse::<gateway::policy::Route>()
                    .map_err(|e| ConfigError::Invalid(format!("--route: {e}")))?;
            }
            if matches!(kind, Kind::Connector) && routes.is_empty() {
                return Err(ConfigError::Invalid("a connector token needs at least one --route it may advertise, e.g. --route '*.internal:*'".into()).into());
            }
            let (secret, sha256) =
                auth::generate(&id).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            let entry = TokenEntry {
                id: id.clone(),
                name: name.unwrap_or_else(|| id.clone()),
                groups,
                sha256,
                expires,
                routes,
            };
            auth::append_token(&tokens, &entry).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            match out {
                Some(path) => {
                    write_secret_file(&path, secret.expose())
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!(
                        "token `{id}` added to {}; token written to {}",
                        tokens.display(),
                        path.display()
                    );
                }
                None => {
                    eprintln!(
                        "token `{id}` added to {}; it is shown once:",
                        tokens.display()
                    );
                    println!("{}", secret.expose());
                }
            }
            Ok(())
        }
    }
}

fn write_secret_file(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    writeln!(f, "{secret}")
}
