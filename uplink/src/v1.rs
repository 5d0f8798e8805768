//! Protocol v1 (bearer tokens, `sp_…`), until the gateways' `accept_v1_until`: how the token may
//! travel on one connection, and the v1 inner channel (`tunnel::inner`) that keeps it from a
//! TLS-inspecting proxy. Protocol v2 ([`crate::v2`]) needs none of this: it never sends a secret.

use crate::connect::Uplink;
use crate::{ConnectError, Secret};
use egress::GatewayStream;
use tunnel::inner::{InnerError, PublicKey};

/// A v1 credential and what proves the gateway's TLS before the bearer token rides it.
#[derive(Clone)]
pub struct V1 {
    pub token: Secret,
    pub trust: Trust,
}

/// What makes the outer TLS the gateway's own, for a v1 bearer token.
#[derive(Clone)]
pub enum Trust {
    /// The TLS configuration itself admits only the gateway (the connector's `--ca`, which is
    /// then the only root).
    Config,
    /// Proven connection by connection (the agent, whose TLS also trusts the OS store, where a
    /// TLS-inspecting proxy's CA sits).
    Prove {
        /// The gateway's inner-channel key, when enrolled: the token then travels inside it.
        inner_key: Option<PublicKey>,
        /// The enrolled pin of the gateway's TLS key.
        key_pin: Option<String>,
        /// `--ca`: a certificate issued by it is the gateway's own.
        anchor: Option<egress::CaAnchor>,
    },
}

/// How the token is carried on one connection.
#[derive(Debug)]
pub enum Carry {
    /// `Authorization: Bearer`: only over TLS proven to be the gateway's own.
    Bearer,
    /// Inside the inner channel bound to this key: the outer TLS may be anyone's.
    Inner(PublicKey),
}

/// Is the outer TLS the gateway's own? Its certificate carries the enrolled key pin, or (with no
/// pin) it is issued by `--ca` itself (not merely by something in the OS store). Plain `ws://`
/// counts only to a loopback address.
pub fn proven_own(up: &Uplink, trust: &Trust, io: &GatewayStream) -> bool {
    if let GatewayStream::Plain(_) = io {
        return is_loopback_host(&up.gateway.host);
    }
    match trust {
        Trust::Config => true,
        // An enrolled pin is the stronger statement: when there is one, it alone decides.
        Trust::Prove {
            key_pin: Some(pin), ..
        } => io.key_pin().is_some_and(|seen| *pin == seen),
        Trust::Prove { anchor, .. } => anchor
            .as_ref()
            .is_some_and(|a| a.issued(io, &up.gateway.host)),
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Decides how the token may travel on `io`. The bearer token never rides TLS that is not
/// proven the gateway's own: without an inner key, such a connection is refused, naming who
/// issued the certificate that was seen.
pub fn carry(up: &Uplink, trust: &Trust, io: &GatewayStream) -> Result<Carry, ConnectError> {
    if let Trust::Prove {
        inner_key: Some(key),
        key_pin,
        ..
    } = trust
    {
        // With the inner key, only the enrolled pin lets the inner channel be skipped.
        let pinned = matches!(
            (key_pin, io.key_pin()),
            (Some(pin), Some(seen)) if *pin == seen
        );
        return Ok(if pinned && !up.always_inner {
            Carry::Bearer
        } else {
            Carry::Inner(*key)
        });
    }
    if proven_own(up, trust, io) {
        Ok(Carry::Bearer)
    } else {
        Err(ConnectError::Untrusted {
            seen: io.peer_summary(),
        })
    }
}

/// An inner-channel failure, with both keys when they differ.
pub fn inner_error(up: &Uplink, key: &PublicKey, e: InnerError) -> ConnectError {
    match e {
        InnerError::Auth { status, text } => ConnectError::Refused { status, text },
        InnerError::KeyMismatch(text) => ConnectError::KeyMismatch(format!(
            "the gateway's inner key does not match the pinned one: {text}; this agent is pinned to {key} (gateway {})",
            up.gateway
        )),
        e => ConnectError::Inner(e.to_string()),
    }
}
