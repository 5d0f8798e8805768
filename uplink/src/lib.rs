//! # sallyport-uplink: reaching the gateway and keeping a session up
//!
//! What the agent and the connector both do, once: reaching the gateway and keeping a session
//! up ([`Uplink`], [`keep()`]), the reasons a session could not be set up
//! ([`ConnectError`], one type that says which hop failed), how long to wait before the next
//! try ([`Backoff`], one set of constants), and the rule that a proxy credential that got `407`
//! is never tried again ([`park_after_rejected_credentials`]): a domain account locks after a
//! few failures.
//!
//! | file | what |
//! |---|---|
//! | [`connect`] | [`Uplink`]: probe → dial → upgrade (or the HTTP transport) → handshake → hello, for both roles |
//! | [`mod@keep`] | the reconnect loop: backoff, 407 parking, the once-per-process warnings |
//! | [`v1`] | protocol v1: when a bearer token may ride a connection, the v1 inner channel |
//! | [`error`] | [`ConnectError`]: no way out, the upgrade, the HTTP transport, the inner channel, the token, the hello |
//! | [`backoff`] | [`Backoff`]: exponential, full jitter, reset after a stable session |
//! | [`cli`] | both binaries' start-up: usage errors exit 64, logging, runtime, signals, exit codes |
//! | [`config`] | `ConfigError` (exit 64), TOML with file and line, durations, relative paths |
//! | [`secret`] | [`Secret`]: a token as text (v1 or v2), never shown in `Debug`/`Display` |
//! | [`tuning`] | `[tunnel]` windows and pings, one validation for every role |
//! | [`v2`] | protocol v2's handshake over a WebSocket or the HTTP fallback, for both roles |

// Denied everywhere but in `cli::keep_freed_memory` and `cli::give_back_freed_memory` (glibc's
// `mallopt` and `malloc_trim`).
#![deny(unsafe_code)]

pub mod backoff;
pub mod cli;
pub mod config;
pub mod connect;
pub mod error;
pub mod keep;
pub mod secret;
pub mod tuning;
pub mod v1;
pub mod v2;

pub use backoff::Backoff;
pub use connect::{Carried, Connected, Credential, TokenCell, TransportChoice, Uplink};
pub use error::ConnectError;
pub use keep::{keep, keep_nudged, Ended};
pub use secret::Secret;

use tokio_util::sync::CancellationToken;

/// What [`park_after_rejected_credentials`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parked {
    /// `e` was another failure: not parked.
    No,
    /// Parked until shutdown.
    Shutdown,
    /// Parked until the proxy credentials file changed: try again now.
    CredentialsChanged,
}

/// After every way out failed on rejected proxy credentials: say so once and wait, instead of
/// retrying, for shutdown or a change of the proxy credentials file (a corrected password;
/// `way` re-reads it). `restart` names what to restart, e.g. `the agent`.
pub async fn park_after_rejected_credentials(
    e: &ConnectError,
    restart: &str,
    way: &egress::Way,
    shutdown: &CancellationToken,
) -> Parked {
    if !e.credentials_rejected() {
        return Parked::No;
    }
    let fix = match &way.egress().credentials_file {
        Some(f) => format!(
            "fix the password in {} (it is read again when it changes) or restart {restart}",
            f.path.display()
        ),
        None => format!("fix the password and restart {restart}"),
    };
    tracing::error!("not retrying with rejected proxy credentials; {fix}");
    tokio::select! {
        _ = shutdown.cancelled() => Parked::Shutdown,
        _ = way.credentials_changed() => Parked::CredentialsChanged,
    }
}
