//! # sallyport-uplink: reaching the gateway and keeping a session up
//!
//! What the agent and the connector both do, once: the reasons a session could not be set up
//! ([`ConnectError`], one type that says which hop failed), how long to wait before the next
//! try ([`Backoff`], one set of constants), and the rule that a proxy credential that got `407`
//! is never tried again ([`park_after_rejected_credentials`]): a domain account locks after a
//! few failures.
//!
//! | file | what |
//! |---|---|
//! | [`error`] | [`ConnectError`]: no way out, the upgrade, the HTTP transport, the inner channel, the token, the hello |
//! | [`backoff`] | [`Backoff`]: exponential, full jitter, reset after a stable session |
//! | [`config`] | `ConfigError` (exit 64), TOML with file and line, durations, relative paths |
//! | [`secret`] | [`Secret`]: a token as text (v1 or v2), never shown in `Debug`/`Display` |
//! | [`tuning`] | `[tunnel]` windows and pings, one validation for every role |
//! | [`v2`] | protocol v2's handshake over a WebSocket or the HTTP fallback, for both roles |

#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod error;
pub mod secret;
pub mod tuning;
pub mod v2;

pub use backoff::Backoff;
pub use error::ConnectError;
pub use secret::Secret;

use tokio_util::sync::CancellationToken;

/// After every way out failed on rejected proxy credentials: say so once and wait for shutdown
/// instead of retrying (`restart` names what to restart, e.g. `the agent`). Returns `true` when
/// it parked, `false` when `e` is another failure.
pub async fn park_after_rejected_credentials(
    e: &ConnectError,
    restart: &str,
    shutdown: &CancellationToken,
) -> bool {
    if !e.credentials_rejected() {
        return false;
    }
    tracing::error!(
        "not retrying with rejected proxy credentials; fix the password and restart {restart}"
    );
    shutdown.cancelled().await;
    true
}
