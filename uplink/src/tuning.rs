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
    pub window_max: Option<u32>,
    pub window_budget: Option<u64>,
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
        if let Some(w) = self.window_max {
            if w < cfg.stream_window || w > *STREAM_WINDOW.end() {
                return Err(TuningError(format!(
                    "tunnel.window_max = {w}: must be between tunnel.stream_window ({}) and 64 MiB (67108864); equal to it turns window growth off",
                    cfg.stream_window
                )));
            }
            cfg.window_max = w;
        }
        if let Some(b) = self.window_budget {
            // Process-wide, like the memory it bounds.
            tunnel::window::set_budget(b);
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

    /// The way back to random mask keys, for an intermediary that cannot take the zero key: it
    /// parses, a wrong value names what to write, and the DMZ (which sends no masked frames)
    /// refuses the key.
    #[test]
    fn websocket_masks_is_auto_or_random_and_not_a_dmz_setting() {
        let file = |v: &str| TunnelFile {
            websocket_masks: Some(v.into()),
            ..Default::default()
        };
        assert!(!TunnelFile::default().random_masks().unwrap());
        assert!(!file("auto").random_masks().unwrap());
        assert!(file("random").random_masks().unwrap());
        let e = file("zero").random_masks().unwrap_err();
        assert!(
            e.0.contains("tunnel.websocket_masks `zero`: use auto or random"),
            "{e}"
        );
        let e = file("random")
            .refuse_keys_of_others("DMZ", true)
            .unwrap_err();
        assert!(
            e.0.contains("tunnel.websocket_masks is not a setting of the DMZ"),
            "{e}"
        );
        assert!(file("random")
            .refuse_keys_of_others("connector", false)
            .is_ok());
    }

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
            window_max: Some(1 << 22),
            window_budget: None,
            ping_interval: Some("5s"),
            ping_timeout: Some("20s"),
        }
        .apply(&mut cfg)
        .unwrap();
        assert_eq!((cfg.stream_window, cfg.session_window), (1 << 20, 1 << 24));
        assert_eq!(cfg.window_max, 1 << 22);
        let e = Tuning {
            stream_window: Some(1 << 20),
            window_max: Some(1 << 19),
            ..Default::default()
        }
        .apply(&mut cfg)
        .unwrap_err();
        assert!(e.0.contains("tunnel.window_max = 524288"), "{e}");
        assert_eq!(cfg.ping_interval, Duration::from_secs(5));
    }
}

/// `[tunnel]` as every role's config file holds it: the tuning (all roles) and how an uplink
/// carries its session (the agent and the connector; the DMZ refuses those keys).
#[derive(serde::Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct TunnelFile {
    pub stream_window: Option<u32>,
    pub session_window: Option<u32>,
    /// Largest window a fast stream grows to (bytes; `stream_window` turns growth off).
    pub window_max: Option<u32>,
    /// Most window growth in the whole process, beyond every stream's base window (bytes).
    pub window_budget: Option<u64>,
    pub ping_interval: Option<String>,
    /// How long past a missed ping the peer is declared dead.
    pub ping_timeout: Option<String>,
    /// auto, websocket or http (as the agent's `--transport`).
    pub transport: Option<String>,
    /// HTTP transport downstream: `stream` or `poll` [default: stream, long-poll when a proxy
    /// buffers responses].
    pub http_mode: Option<String>,
    /// `auto` (sealed, or v1's inner channel, when the outer TLS is not proven the gateway's
    /// own) or `always`.
    pub inner: Option<String>,
    /// While on the HTTP fallback (chosen automatically), how often WebSocket is tried again
    /// (the agent; a connector tries WebSocket first on every reconnect).
    pub websocket_retry: Option<String>,
    /// `auto` (the zero key where masks protect nothing: docs/protocol.md, "Transport") or
    /// `random` (a fresh random key on every frame, for an intermediary that cannot take the
    /// zero key).
    pub websocket_masks: Option<String>,
}

/// A `[tunnel]` setting that is `auto` (the default: `false`) or `other` (`true`).
fn auto_or(value: Option<&str>, key: &str, other: &str) -> Result<bool, TuningError> {
    match value {
        None | Some("auto") => Ok(false),
        Some(v) if v == other => Ok(true),
        Some(v) => Err(TuningError(format!(
            "tunnel.{key} `{v}`: use auto or {other}"
        ))),
    }
}

impl TunnelFile {
    /// Applies the windows and ping timings to `cfg` (see [`Tuning::apply`]).
    pub fn apply(&self, cfg: &mut tunnel::Config) -> Result<(), TuningError> {
        Tuning {
            stream_window: self.stream_window,
            session_window: self.session_window,
            window_max: self.window_max,
            window_budget: self.window_budget,
            ping_interval: self.ping_interval.as_deref(),
            ping_timeout: self.ping_timeout.as_deref(),
        }
        .apply(cfg)
    }

    /// Refuses the keys `role` does not use, naming them: the DMZ (`uplink_keys`) uses none
    /// of the uplink's, the connector all but `websocket_retry`.
    pub fn refuse_keys_of_others(&self, role: &str, uplink_keys: bool) -> Result<(), TuningError> {
        let set = [
            ("transport", uplink_keys && self.transport.is_some()),
            ("http_mode", uplink_keys && self.http_mode.is_some()),
            ("inner", uplink_keys && self.inner.is_some()),
            (
                "websocket_masks",
                uplink_keys && self.websocket_masks.is_some(),
            ),
            ("websocket_retry", self.websocket_retry.is_some()),
        ];
        match set.iter().find(|(_, on)| *on) {
            Some((key, _)) => Err(TuningError(format!(
                "tunnel.{key} is not a setting of the {role}: remove it"
            ))),
            None => Ok(()),
        }
    }

    /// `transport` (default auto).
    pub fn transport(&self) -> Result<Option<crate::TransportChoice>, TuningError> {
        self.transport
            .as_deref()
            .map(|t| t.parse().map_err(TuningError))
            .transpose()
    }

    /// `http_mode`: `None` lets the transport choose.
    pub fn http_mode(&self) -> Result<Option<tunnel::http::DownMode>, TuningError> {
        match self.http_mode.as_deref() {
            None => Ok(None),
            Some("stream") => Ok(Some(tunnel::http::DownMode::Stream)),
            Some("poll") => Ok(Some(tunnel::http::DownMode::Poll)),
            Some(other) => Err(TuningError(format!(
                "tunnel.http_mode `{other}`: use stream or poll"
            ))),
        }
    }

    /// `inner = "always"`.
    pub fn inner_always(&self) -> Result<bool, TuningError> {
        auto_or(self.inner.as_deref(), "inner", "always")
    }

    /// `websocket_masks = "random"`.
    pub fn random_masks(&self) -> Result<bool, TuningError> {
        auto_or(self.websocket_masks.as_deref(), "websocket_masks", "random")
    }

    /// `websocket_retry`, at least a second (default `crate::keep::RETRY_WEBSOCKET`).
    pub fn websocket_retry(&self) -> Result<Duration, TuningError> {
        match &self.websocket_retry {
            Some(d) => Ok(duration(d, "tunnel.websocket_retry")?.max(Duration::from_secs(1))),
            None => Ok(crate::keep::RETRY_WEBSOCKET),
        }
    }
}
