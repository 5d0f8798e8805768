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
    /// Worker threads [default: half the cores, at least one].
    #[arg(long, global = true, env = "SALLYPORT_THREADS")]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the DMZ gateway: the only listener of the system.
    Dmz(DmzArgs),
    /// Run a connector inside the trusted network (dials out; listens on nothing).
    Connector(Box<ConnectorArgs>),
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
        /// Lifetime, e.g. 90d or 12h, or `never` [default: 90d for agent tokens, which must expire;
        /// no expiry for connector and --v1 tokens].
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
        /// A protocol v1 bearer token (`sp_…`), for agents and connectors older than 0.2.
        #[arg(long)]
        v1: bool,
        /// The issuer key that signs the token (created, mode 0600, when missing) [default:
        /// issuer.key beside --tokens]. Gateways need only its public half.
        #[arg(long)]
        issuer: Option<PathBuf>,
        /// The gateway's static key file (the DMZ's inner key; created when missing) [default:
        /// inner.key beside --tokens]. The token carries its public half.
        #[arg(long)]
        inner_key: Option<PathBuf>,
        /// The gateway's next static key file (rotation): the token trusts both.
        #[arg(long)]
        next_inner_key: Option<PathBuf>,
        /// The deployment the token is for (the DMZ's `v2.deployment`).
        #[arg(long)]
        deployment: Option<String>,
    },
    /// Revoke v2 tokens on the signed revocation list that every DMZ instance reloads
    /// (`[v2] revoked`), on the admin host; with no --id or --remove, re-sign the list as it is
    /// (run it from cron well inside `v2.revoked_max_age`).
    Revoke {
        /// The list to change (created when missing); copy it to every instance.
        #[arg(long)]
        list: PathBuf,
        /// The issuer key that signs it (the one that signs the tokens).
        #[arg(long)]
        issuer: PathBuf,
        /// A token id to revoke. Repeatable.
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Revoke only the tokens of these ids issued before this time (RFC 3339, e.g.
        /// 2026-12-01T00:00:00Z): tokens re-issued since keep working.
        #[arg(long)]
        before: Option<String>,
        /// A token id to take off the list again. Repeatable.
        #[arg(long = "remove")]
        remove: Vec<String>,
    },
}

fn main() -> ExitCode {
    // Usage errors are configuration errors: exit 64 like every other bad input (help and
    // --version still exit 0).
    let cli: Cli = match uplink::cli::parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    uplink::cli::logging(&cli.log, false);
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => uplink::cli::fail(
            "sallyport-gateway",
            e.as_ref(),
            e.downcast_ref::<ConfigError>().is_some(),
        ),
    }
}

/// The gateway roles keep freed memory while bytes flow and give it back once quiet after a
/// transfer (`uplink::cli::give_back_when_quiet`); ends with `shutdown`.
fn give_back_when_quiet(shutdown: &CancellationToken) {
    tokio::spawn(uplink::cli::give_back_when_quiet(
        uplink::cli::GATEWAY_TRANSFER,
        shutdown.clone(),
    ));
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    if matches!(cli.command, Command::Dmz(_) | Command::Connector(_)) {
        uplink::cli::keep_freed_memory();
    }
    match cli.command {
        Command::Dmz(args) => {
            let rt = uplink::cli::runtime(cli.threads)?;
            rt.block_on(async {
                // Token files are read inside the runtime (the reloader is a task).
                let cfg = config::dmz_config(args)?;
                let shutdown = CancellationToken::new();
                uplink::cli::shutdown_on_signal(shutdown.clone());
                give_back_when_quiet(&shutdown);
                gateway::dmz::run(cfg, shutdown)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        Command::Connector(args) => {
            let cfg = config::connector_config(*args)?;
            let rt = uplink::cli::runtime(cli.threads)?;
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                uplink::cli::shutdown_on_signal(shutdown.clone());
                give_back_when_quiet(&shutdown);
                gateway::admin::connector::start(&cfg, shutdown.clone()).await?;
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
        Command::Token(TokenCommand::Revoke {
            list,
            issuer,
            ids,
            before,
            remove,
        }) => {
            use gateway::revocation::{Revocation, RevocationList};
            for id in ids.iter().chain(&remove) {
                if !tunnel::token::valid_id(id) {
                    return Err(ConfigError::Invalid(format!(
                        "--id {id:?}: a token id is 1-64 of a-z, 0-9 and '-'"
                    ))
                    .into());
                }
            }
            let how = match before.as_deref() {
                None => Revocation::All,
                Some(t) => Revocation::Before(
                    humantime::parse_rfc3339_weak(t.trim())
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs())
                        .ok_or_else(|| {
                            ConfigError::Invalid(format!(
                                "--before {t:?}: write a time like 2026-12-01T00:00:00Z"
                            ))
                        })?,
                ),
            };
            let text = std::fs::read_to_string(&issuer).map_err(|e| {
                ConfigError::Invalid(format!("issuer key {}: {e}", issuer.display()))
            })?;
            let key = tunnel::token::Issuer::from_file_text(&text).map_err(|e| {
                ConfigError::Invalid(format!("issuer key {}: {e}", issuer.display()))
            })?;
            let done = RevocationList::update(&list, &key, std::time::SystemTime::now(), |l| {
                for id in &ids {
                    l.add(id, how);
                }
                for id in &remove {
                    l.entries.remove(id);
                }
            })
            .map_err(ConfigError::Invalid)?;
            eprintln!(
                "revocation list {}: serial {}, {} ids; every instance that reads it refuses them within 2 s",
                list.display(),
                done.serial,
                done.entries.len()
            );
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
            v1,
            issuer,
            inner_key,
            next_inner_key,
            deployment,
        }) => {
            // v2 agent tokens expire (90 days unless told): a stolen one is good for that long.
            let expires = match (expires, v1, kind) {
                (None, false, Kind::Agent) => Some("90d".to_string()),
                (e, _, _) => e,
            };
            let expires = match expires {
                Some(s) if s == "never" && !v1 && matches!(kind, Kind::Agent) => {
                    return Err(ConfigError::Invalid("--expires never: agent tokens of protocol v2 must expire (e.g. --expires 365d)".into()).into());
                }
                Some(s) if s == "never" => None,
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
            let secret = if v1 {
                let (secret, sha256) =
                    auth::generate(&id).map_err(|e| ConfigError::Invalid(e.to_string()))?;
                let entry = TokenEntry {
                    id: id.clone(),
                    name: name.unwrap_or_else(|| id.clone()),
                    groups,
                    sha256: Some(sha256),
                    public_key: None,
                    expires,
                    routes,
                };
                auth::append_token(&tokens, &entry)
                    .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                secret.expose().to_string()
            } else {
                let issuer_path =
                    issuer.unwrap_or_else(|| config::default_issuer_key_path(&tokens));
                let (issuer, created) =
                    auth::load_or_create_issuer(&issuer_path).map_err(ConfigError::Invalid)?;
                if created {
                    eprintln!(
                        "created the issuer key {} (public {}); keep it 0600, off the DMZ if you can: the DMZ needs only v2.issuer_keys = [\"{}\"]",
                        issuer_path.display(),
                        issuer.public(),
                        issuer.public()
                    );
                }
                // Agent tokens name the renewal key (claim 12): the issuer connector holds it,
                // never the admin's issuer key, and gateways accept it for agent tokens only.
                let renewer = if matches!(kind, Kind::Agent) {
                    let path = issuer_path.with_file_name("renew.key");
                    let (k, created) =
                        auth::load_or_create_issuer(&path).map_err(ConfigError::Invalid)?;
                    if created {
                        eprintln!(
                            "created the renewal key {} (public {}): copy it to the issuer connector's host (`connector --renewal-key`), and renew.pub beside the DMZ's agent token file",
                            path.display(),
                            k.public()
                        );
                    }
                    Some(k.public())
                } else {
                    None
                };
                let inner_path =
                    inner_key.unwrap_or_else(|| config::default_inner_key_path(&tokens));
                let mut keys = Vec::new();
                for p in std::iter::once(&inner_path).chain(next_inner_key.as_ref()) {
                    let (k, created) =
                        gateway::dmz::inner::load_or_create(p).map_err(ConfigError::Invalid)?;
                    if created {
                        eprintln!("created the gateway key {}", p.display());
                    }
                    keys.push(k.public().0);
                }
                let token = auth::mint_v2(
                    &tokens,
                    auth::MintV2 {
                        kind: match kind {
                            Kind::Agent => tunnel::token::Kind::Agent,
                            Kind::Connector => tunnel::token::Kind::Connector,
                        },
                        id: id.clone(),
                        name,
                        groups,
                        routes,
                        expires,
                        issuer: &issuer,
                        gateway_keys: keys,
                        deployment,
                        renewer,
                    },
                )
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                token.expose()
            };
            match out {
                Some(path) => {
                    write_secret_file(&path, &secret)
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
                    println!("{secret}");
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
