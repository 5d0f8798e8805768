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
    use std::io::IsTerminal;
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match parse(filter) {
        Filter::Static(targets) => {
            let layer = layer.with_filter((*targets).and(secret_cap()));
            tracing_subscriber::registry().with(layer).init();
        }
        Filter::Dynamic(env) => {
            let layer = layer.with_filter((*env).and(secret_cap()));
            tracing_subscriber::registry().with(layer).init();
        }
    }
}

/// A log filter as given: by target and level only, or with span and field conditions.
enum Filter {
    Static(Box<Targets>),
    Dynamic(Box<EnvFilter>),
}

/// A filter of targets and levels only (`info`, `sallyport=debug,hyper=warn`: every filter we
/// document) becomes a [`Targets`], which costs nothing when a span is entered. An
/// [`EnvFilter`] looks every span up in a locked table at each entry and exit, to know whether
/// a directive names it: a span is entered at every poll of a task, and that lookup was 2 to 3 %
/// of the chain's CPU per new connection. Anything else (span and field directives such as
/// `[session]=debug`, empty pieces, spaces, quotes) goes to the `EnvFilter` as before, so it
/// means exactly what it meant; `info` when it does not parse.
fn parse(filter: &str) -> Filter {
    let is_level = |l: &str| {
        [
            "off", "error", "warn", "info", "debug", "trace", "0", "1", "2", "3", "4", "5",
        ]
        .iter()
        .any(|k| l.eq_ignore_ascii_case(k))
    };
    let is_target = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'))
    };
    let plain = filter.split(',').all(|d| match d.split_once('=') {
        Some((t, l)) => is_target(t) && is_level(l),
        None => is_level(d) || is_target(d),
    });
    let env = EnvFilter::try_new(filter);
    match (plain, env, filter.parse::<Targets>()) {
        (true, Ok(_), Ok(t)) => Filter::Static(Box::new(t)),
        (_, Ok(env), _) => Filter::Dynamic(Box::new(env)),
        (_, Err(_), _) => Filter::Dynamic(Box::new(EnvFilter::new("info"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    /// What a filter lets through: (target, level) of every event of [`emit_all`].
    fn passed<F>(filter: F) -> Vec<(String, Level)>
    where
        F: tracing_subscriber::layer::Filter<tracing_subscriber::Registry> + Send + Sync + 'static,
    {
        use std::sync::{Arc, Mutex};
        struct Capture(Arc<Mutex<Vec<(String, Level)>>>);
        impl<S: tracing::Subscriber> Layer<S> for Capture {
            fn on_event(
                &self,
                e: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                let m = e.metadata();
                self.0
                    .lock()
                    .unwrap()
                    .push((m.target().to_string(), *m.level()));
            }
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sub = tracing_subscriber::registry().with(Capture(seen.clone()).with_filter(filter));
        tracing::subscriber::with_default(sub, emit_all);
        let v = seen.lock().unwrap().clone();
        v
    }

    fn emit_all() {
        macro_rules! at {
            ($($t:literal),*) => {$(
                tracing::error!(target: $t, "e");
                tracing::warn!(target: $t, "w");
                tracing::info!(target: $t, "i");
                tracing::debug!(target: $t, "d");
                tracing::trace!(target: $t, "t");
            )*};
        }
        at!(
            "sallyport",
            "sallyport::listen",
            "tunnel::session",
            "hyper::proto",
            "rustls"
        );
    }

    /// Each filter we document, and a few more, lets through the same events as a target and
    /// level table as it did as an `EnvFilter` (the table replaced it, for speed).
    #[test]
    fn a_target_and_level_filter_means_what_it_meant_as_an_env_filter() {
        for f in [
            "info",
            "debug",
            "warn",
            "sallyport=debug",
            "info,sallyport=trace",
            "sallyport=debug,hyper=warn",
            "off",
            "error,tunnel=debug",
            "tunnel::session=trace",
            "INFO",
            "sallyport=4",
            "sallyport-gateway=debug",
            "tunnel",
        ] {
            let Filter::Static(t) = parse(f) else {
                panic!("{f} is a plain table")
            };
            assert_eq!(passed(*t), passed(EnvFilter::new(f)), "{f}");
        }
        let info = passed(EnvFilter::new("info"));
        assert_eq!(info.len(), 15, "3 levels of 5 targets: {info:?}");
        assert!(matches!(parse("[session]=debug"), Filter::Dynamic(_)));
        assert!(matches!(
            parse("sallyport[app{peer}]=trace"),
            Filter::Dynamic(_)
        ));
        // Anything else is the EnvFilter it was (or `info` when that did not parse): empty
        // pieces, spaces, quotes, a target without a level.
        for f in [
            "sallyport=loud",
            "info,",
            "",
            "debug,,tunnel=trace",
            "warn, audit=info",
            "\"info\"",
            "tunnel=",
            "*=debug",
        ] {
            let Filter::Dynamic(env) = parse(f) else {
                panic!("{f:?} is not a plain table")
            };
            let before = EnvFilter::try_new(f).unwrap_or_else(|_| EnvFilter::new("info"));
            assert_eq!(passed(*env), passed(before), "{f:?}");
        }
    }

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
