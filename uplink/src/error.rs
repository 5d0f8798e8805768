//! Why a session to the gateway could not be set up, in one type that says which hop failed:
//! no way out, the WebSocket upgrade, the HTTP transport, the inner channel, the gateway's
//! verdict on the token, or the tunnel hello. Callers decide on the variant, never on the text.

use egress::probe::{GatewayReached, ProbeError};
use tunnel::http::client::HttpError;

/// Why a session to the gateway could not be set up; says which hop failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No way out worked (each candidate's reason is in the text).
    #[error("{summary}")]
    NoWay {
        summary: String,
        /// Every candidate failed on rejected proxy credentials.
        rejected_only: bool,
    },
    #[error("{0}")]
    Handshake(#[from] tunnel::ws::HandshakeError),
    #[error("HTTP transport: {0}")]
    Http(#[from] HttpError),
    /// The inner channel failed: a different gateway key, tampering, or the gateway's verdict
    /// on the token (sent inside).
    #[error("{0}")]
    Inner(String),
    /// The gateway's inner key is not the pinned one (v1's inner channel): re-enroll only if
    /// the gateway's key really changed.
    #[error("{0}")]
    KeyMismatch(String),
    /// The gateway refused the token, authenticated: v2's sealed verdict, v1's inner channel,
    /// or a v1 bearer token's HTTP status over TLS proven the gateway's own. Never an HTTP
    /// status a middlebox could have written.
    #[error("gateway refused the session with {status}: {text}")]
    Refused { status: u16, text: String },
    #[error("tunnel hello with the gateway failed: {0}")]
    Session(#[from] tunnel::SessionError),
    /// The outer TLS is not proven the gateway's own and no inner key is known: the token is
    /// not sent.
    #[error("not sending the token: the TLS to the gateway is not proven to be the gateway's own (its certificate is neither issued by --ca nor the enrolled key), so something on the way, such as a TLS-inspecting proxy, could read it; pass --ca with the gateway's own CA, or run `sallyport enroll` (or pass --gateway-inner-key from `sallyport-gateway inner-key`) so that the token travels only inside the inner channel. Seen: {seen}")]
    Untrusted { seen: String },
}

impl ConnectError {
    /// The WebSocket upgrade did not survive the way (a proxy stripped it): the HTTP transport
    /// may still get through.
    pub fn upgrade_stripped(&self) -> bool {
        match self {
            ConnectError::Handshake(tunnel::ws::HandshakeError::Refused { status, .. }) => {
                matches!(status, 426 | 400 | 405 | 501) || (200..300).contains(status)
            }
            ConnectError::Handshake(tunnel::ws::HandshakeError::Cut(_)) => true,
            _ => false,
        }
    }

    /// HTTP status of the gateway's refusal of the token (401 bad token, 429 too many).
    pub fn token_status(&self) -> Option<u16> {
        match self {
            ConnectError::Handshake(h) => h.status(),
            ConnectError::Http(h) => h.status(),
            ConnectError::Refused { status, .. } => Some(*status),
            _ => None,
        }
        .filter(|s| matches!(s, 401 | 403 | 429))
    }
}

impl GatewayReached for ConnectError {
    /// A refusal with the gateway's own statuses (bad token, too many sessions), a hello, an
    /// inner-channel answer, or a stripped upgrade (an HTTP answer: the way carries HTTP)
    /// means the way out works.
    fn reached_gateway(&self) -> bool {
        match self {
            ConnectError::Handshake(h) => {
                matches!(h.status(), Some(401 | 429)) || self.upgrade_stripped()
            }
            ConnectError::Http(h) => matches!(h.status(), Some(401 | 403 | 429)),
            ConnectError::Inner(_)
            | ConnectError::KeyMismatch(_)
            | ConnectError::Refused { .. } => true,
            ConnectError::Session(tunnel::SessionError::Version { .. }) => true,
            _ => false,
        }
    }

    /// Only [`ConnectError::Refused`] with the gateway's "bad credential" status: a refusal
    /// that cannot be forged on the way, so it may slow the retries down (`Backoff::refused`).
    fn refused_credential(&self) -> bool {
        matches!(self, ConnectError::Refused { status: 401, .. })
    }
}

impl From<ProbeError<ConnectError>> for ConnectError {
    fn from(e: ProbeError<ConnectError>) -> ConnectError {
        match e {
            ProbeError::Gateway(e) => e,
            e => ConnectError::NoWay {
                rejected_only: e.only_rejected_credentials(),
                summary: e.to_string(),
            },
        }
    }
}

impl ConnectError {
    /// Every way out failed on rejected proxy credentials: retrying would risk locking the
    /// account (see [`crate::park_after_rejected_credentials`]).
    pub fn credentials_rejected(&self) -> bool {
        matches!(
            self,
            ConnectError::NoWay {
                rejected_only: true,
                ..
            }
        )
    }
}

/// An error and its causes on one line, each said once: a message that already includes its
/// cause's text (`cannot listen on …: Address already in use`) does not get it appended again,
/// as `{:#}` would.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot listen on 127.0.0.1:1080: {source}")]
    struct Bind {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let e = Bind {
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        let line = super::one_line(&e);
        assert_eq!(line.matches("ddress in use").count(), 1, "{line}");
    }
}
