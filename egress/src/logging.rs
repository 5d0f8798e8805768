//! The binaries' log setup (both `sallyport` and `sallyport-gateway` use this crate).
//!
//! Some dependencies print secrets at their most verbose levels: tungstenite's trace prints the
//! whole WebSocket upgrade request, `Authorization: Bearer …` included, and its frames' bytes.
//! [`SECRET_PRINTING`] caps them whatever the filter (`--log`, `SALLYPORT_LOG`) says, so that
//! `SALLYPORT_LOG=trace` is safe to ask of a user.

use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Log targets that print headers or payloads below the level given, and that level: they never
/// log more than it. (hyper and h2 log no header values; rustls logs no secrets.)
pub const SECRET_PRINTING: [(&str, LevelFilter); 2] = [
    ("tungstenite", LevelFilter::DEBUG),
    ("tokio_tungstenite", LevelFilter::DEBUG),
];

/// The cap of [`SECRET_PRINTING`], as a filter (every other target passes).
pub fn secret_cap() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(SECRET_PRINTING)
}

/// Logs to stderr by `filter` (RUST_LOG syntax; `info` when it does not parse), capped by
/// [`secret_cap`].
pub fn init(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_filter(filter.and(secret_cap()));
    tracing_subscriber::registry().with(layer).init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn tungstenite_is_capped_at_debug_and_the_rest_is_not() {
        let cap = secret_cap();
        for target in [
            "tungstenite",
            "tungstenite::handshake::client",
            "tokio_tungstenite",
        ] {
            assert!(!cap.would_enable(target, &Level::TRACE), "{target}");
            assert!(cap.would_enable(target, &Level::DEBUG), "{target}");
        }
        assert!(cap.would_enable("sallyport", &Level::TRACE));
        assert!(cap.would_enable("hyper::proto", &Level::TRACE));
    }
}
