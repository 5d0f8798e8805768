//! `[tunnel]` tuning shared by every role's config file (agent, DMZ, connector): the stream and
//! session windows and the ping timings, validated the same way everywhere. A bad value is an
//! error that names the key, never silently clamped (the agent used to clamp a window the
//! gateway roles refused).

use std::time::Duration;

/// The tuning keys of `[tunnel]`, as a role's config file gives them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tuning<'a> {
    pub stream_window: Option<u32>,
    pub session_window: Option<u32>,
    pub ping_interval: Option<&'a str>,
    pub ping_timeout: Option<&'a str>,
}

/// A `[tunnel]` value out of range; the text names the key and what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TuningError(pub String);

/// The smallest and largest stream window.
pub const STREAM_WINDOW: std::ops::RangeInclusive<u32> = 16 * 1024..=64 * 1024 * 1024;

fn duration(s: &str, key: &str) -> Result<Duration, TuningError> {
    humantime::parse_duration(s).map_err(|e| {
        TuningError(format!(
            "{key}: `{s}` is not a duration ({e}); write e.g. 10s or 2m"
        ))
    })
}

impl Tuning<'_> {
    /// Sets the given values on `cfg`, or says which one is wrong.
    pub fn apply(&self, cfg: &mut tunnel::Config) -> Result<(), TuningError> {
        if let Some(w) = self.stream_window {
            if !STREAM_WINDOW.contains(&w) {
                return Err(TuningError(format!(
                    "tunnel.stream_window = {w}: must be between 16 KiB (16384) and 64 MiB (67108864)"
                )));
            }
            cfg.stream_window = w;
        }
        if let Some(w) = self.session_window {
            if w < cfg.stream_window {
                return Err(TuningError(format!(
                    "tunnel.session_window = {w}: must be at least tunnel.stream_window ({})",
                    cfg.stream_window
                )));
            }
            cfg.session_window = w;
        }
        if let Some(s) = self.ping_interval {
            cfg.ping_interval = duration(s, "tunnel.ping_interval")?;
        }
        if let Some(s) = self.ping_timeout {
            cfg.ping_timeout = duration(s, "tunnel.ping_timeout")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent clamped an out-of-range window silently while the gateway roles refused it:
    /// one rule for all now, with the key named.
    #[test]
    fn an_out_of_range_window_is_refused_naming_the_key_in_every_role() {
        for role in [
            tunnel::Role::Agent,
            tunnel::Role::Dmz,
            tunnel::Role::Connector,
        ] {
            let mut cfg = tunnel::Config::new(role, true);
            let e = Tuning {
                stream_window: Some(1000),
                ..Default::default()
            }
            .apply(&mut cfg)
            .unwrap_err();
            assert!(e.0.contains("tunnel.stream_window = 1000"), "{e}");
            let e = Tuning {
                stream_window: Some(65536),
                session_window: Some(1024),
                ..Default::default()
            }
            .apply(&mut cfg)
            .unwrap_err();
            assert!(e.0.contains("tunnel.session_window"), "{e}");
            let e = Tuning {
                ping_interval: Some("often"),
                ..Default::default()
            }
            .apply(&mut cfg)
            .unwrap_err();
            assert!(e.0.contains("tunnel.ping_interval"), "{e}");
        }
        let mut cfg = tunnel::Config::new(tunnel::Role::Agent, true);
        Tuning {
            stream_window: Some(1 << 20),
            session_window: Some(1 << 24),
            ping_interval: Some("5s"),
            ping_timeout: Some("20s"),
        }
        .apply(&mut cfg)
        .unwrap();
        assert_eq!((cfg.stream_window, cfg.session_window), (1 << 20, 1 << 24));
        assert_eq!(cfg.ping_interval, Duration::from_secs(5));
    }
}
