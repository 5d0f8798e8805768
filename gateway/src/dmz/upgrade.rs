//! Who is asking, and may they: the client's address behind a trusted load balancer, the
//! WebSocket upgrade, the bearer token, and the per-token session count.

use super::endpoints::is_trusted;
use super::limits::CountGuard;
use super::{ForwardedHeader, Shared};
use crate::auth::{Identity, TokenStore};
use crate::http::{self, RequestHead};
use crate::logsafe::Clean;
use crate::metrics::AuthFailure;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

/// What an upgraded connection turned out to be.
pub(crate) enum Upgraded<S> {
    Agent(S, RequestHead, Identity, SocketAddr, CountGuard<String>),
    /// An agent that authenticates inside the inner channel (after the upgrade).
    InnerAgent(S, RequestHead, SocketAddr),
    Connector(S, RequestHead, Identity, SocketAddr, CountGuard<String>),
    /// Protocol version 2: msg2 went out with the `101`; msg3 comes as the first message.
    V2 {
        io: S,
        head: RequestHead,
        client: SocketAddr,
        responder: Box<tunnel::handshake::Responder>,
        offer: tunnel::handshake::Offer,
        is_agent: bool,
    },
}

/// The client's real address: the TCP peer, or, when the peer is a trusted load balancer, the
/// right-most address in the one header that balancer sets (`header`) that is not itself
/// trusted. The other header is never read: a client can send it, and the balancer passes it on.
pub fn client_addr(
    trusted: &[IpNet],
    header: ForwardedHeader,
    peer: SocketAddr,
    head: &RequestHead,
) -> SocketAddr {
    if !is_trusted(trusted, peer.ip()) {
        return peer;
    }
    // Each entry as the balancer wrote it; `None` for one that names no address (`unknown`,
    // an obfuscated `_node`), which ends the walk: what lies left of it is the client's say.
    let mut chain: Vec<Option<IpAddr>> = Vec::new();
    for (k, v) in &head.headers {
        match header {
            ForwardedHeader::XForwardedFor if k.eq_ignore_ascii_case("x-forwarded-for") => {
                chain.extend(v.split(',').map(|s| forwarded_ip(s.trim())));
            }
            ForwardedHeader::Forwarded if k.eq_ignore_ascii_case("forwarded") => {
                for element in v.split(',') {
                    // One `for=` per element (`for=a;proto=https, for=b`).
                    let found = element.split(';').find_map(|pair| {
                        let (key, value) = pair.trim().split_once('=')?;
                        key.trim()
                            .eq_ignore_ascii_case("for")
                            .then(|| forwarded_ip(value.trim().trim_matches('"')))
                    });
                    if let Some(ip) = found {
                        chain.push(ip);
                    }
                }
            }
            _ => {}
        }
    }
    for entry in chain.iter().rev() {
        match entry {
            Some(ip) if is_trusted(trusted, *ip) => continue,
            Some(ip) => return SocketAddr::new(*ip, 0),
            None => return peer,
        }
    }
    peer
}

/// An address as a balancer writes it: `198.51.100.7`, `198.51.100.7:4711`, `2001:db8::7`,
/// `[2001:db8::7]`, `[2001:db8::7]:4711`. `None` for anything else.
fn forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .and_then(|x| x.parse::<IpAddr>().ok())
}

/// Validates the upgrade request and the token; answers 101 or a reasoned refusal.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn upgrade<S>(
    shared: &Shared,
    mut io: S,
    head: RequestHead,
    client: SocketAddr,
    is_agent: bool,
    inner: bool,
    exporter: bool,
) -> Option<Upgraded<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let is_ws = head.method == "GET"
        && head.header_has("upgrade", "websocket")
        && head.header_has("connection", "upgrade");
    let key = head.header("sec-websocket-key").map(str::to_string);
    if !is_ws || key.is_none() {
        debug!(method = %head.method, "request without a WebSocket upgrade");
        let _ = http::respond(
            &mut io,
            426,
            &[("upgrade", "websocket")],
            "sallyport: expected a WebSocket upgrade; a proxy on the way may have stripped it\n",
        )
        .await;
        return None;
    }
    if head.header("sec-websocket-version") != Some("13") {
        let _ = http::respond(
            &mut io,
            426,
            &[("sec-websocket-version", "13")],
            "sallyport: WebSocket version 13 required\n",
        )
        .await;
        return None;
    }
    let accept = tunnel::ws::accept_key(key.unwrap_or_default().as_bytes());
    if let Some(hello) = head.header(tunnel::ws::HELLO_HEADER) {
        use base64::Engine;
        let msg1 = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(hello.trim())
            .unwrap_or_default();
        let (responder, offer, msg2) = match super::v2::answer1(shared, &msg1, is_agent, exporter) {
            Ok(x) => x,
            Err(text) => {
                shared
                    .ops
                    .metrics
                    .auth_failed(role_of(is_agent), AuthFailure::Handshake);
                // A hint only (unauthenticated), but the honest one.
                let _ = http::respond(&mut io, 403, &[], &format!("sallyport: {text}\n")).await;
                return None;
            }
        };
        let reply = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&msg2);
        if let Err(e) =
            http::switch_to_websocket_with(&mut io, &accept, &[(tunnel::ws::HELLO_HEADER, &reply)])
                .await
        {
            debug!(error = %e, "client left during the upgrade");
            return None;
        }
        return Some(Upgraded::V2 {
            io,
            head,
            client,
            responder: Box::new(responder),
            offer,
            is_agent,
        });
    }
    if !shared.config.v2.v1_open(SystemTime::now()) {
        shared
            .ops
            .metrics
            .auth_failed(role_of(is_agent), AuthFailure::WrongVersion);
        let _ = http::respond(
            &mut io,
            426,
            &[],
            &format!("sallyport: {}\n", super::v2::V1_CLOSED),
        )
        .await;
        return None;
    }
    if inner {
        // The token comes later, inside the channel: nothing readable on the way.
        if let Err(e) = http::switch_to_websocket(&mut io, &accept).await {
            debug!(error = %e, "client left during the upgrade");
            return None;
        }
        return Some(Upgraded::InnerAgent(io, head, client));
    }
    let presented = bearer(head.header("authorization"));
    let identity = match verify_token(shared, presented, client, is_agent) {
        Ok(id) => id,
        Err(msg) => {
            let _ = http::respond(
                &mut io,
                401,
                &[("www-authenticate", "Bearer realm=\"sallyport\"")],
                &format!("sallyport: {msg}\n"),
            )
            .await;
            return None;
        }
    };
    // Sessions per token are counted before the upgrade, so a refusal is a plain HTTP 429.
    let Some(slot) = count_session(shared, &identity, is_agent, client) else {
        let _ = http::respond(
            &mut io,
            429,
            &[],
            "sallyport: too many sessions for this token\n",
        )
        .await;
        return None;
    };
    if let Err(e) = http::switch_to_websocket(&mut io, &accept).await {
        debug!(error = %e, "client left during the upgrade");
        return None;
    }
    Some(if is_agent {
        Upgraded::Agent(io, head, identity, client, slot)
    } else {
        Upgraded::Connector(io, head, identity, client, slot)
    })
}

/// The `role` label of a client on the agent or the connector endpoint.
pub(crate) fn role_of(is_agent: bool) -> crate::metrics::Role {
    if is_agent {
        crate::metrics::Role::Agent
    } else {
        crate::metrics::Role::Connector
    }
}

/// The token of an `Authorization: Bearer …` header value ("" when there is none).
pub(crate) fn bearer(header: Option<&str>) -> &str {
    header
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .unwrap_or("")
}

/// Checks a presented token; `Err` is the one line the client is told (the detailed reason
/// goes to our log only).
pub(crate) fn verify_token(
    shared: &Shared,
    presented: &str,
    client: SocketAddr,
    is_agent: bool,
) -> Result<Identity, &'static str> {
    let store: Arc<TokenStore> = if is_agent {
        shared.config.agent_tokens.current()
    } else {
        shared.config.connector_tokens.current()
    };
    store.verify(presented, SystemTime::now()).map_err(|e| {
        shared
            .ops
            .metrics
            .auth_failed(role_of(is_agent), AuthFailure::of(&e));
        // Anyone can cause this line: at most a few a second, the rest counted.
        static LOG: crate::logsafe::Throttle = crate::logsafe::Throttle::new(20);
        if let Some(left_out) = LOG.allow() {
            warn!(%client, role = if is_agent { "agent" } else { "connector" }, reason = %Clean(&e.to_string()), left_out, "refused token");
        }
        // A valid token of the other kind (its secret matches there, so this tells its holder
        // nothing they could not know): say what it is, so the mix-up is plain on their side.
        let other = if is_agent {
            shared.config.connector_tokens.current()
        } else {
            shared.config.agent_tokens.current()
        };
        match other.verify(presented, SystemTime::now()) {
            Ok(_) if is_agent => {
                "invalid token: this is a connector token; an agent needs an agent token (token new --kind agent)"
            }
            Ok(_) => {
                "invalid token: this is an agent token; a connector needs a connector token (token new --kind connector)"
            }
            Err(_) => e.client_message(),
        }
    })
}

/// Counts a session of `client` against its token's limit; `None` when the limit is reached.
/// Counted, the handshake authenticated: its charge goes back to the address's budget
/// ([`super::preauth::HandshakeBudget::authenticated`]).
pub(crate) fn count_session(
    shared: &Shared,
    id: &Identity,
    is_agent: bool,
    client: SocketAddr,
) -> Option<CountGuard<String>> {
    let counts = if is_agent {
        &shared.agent_sessions
    } else {
        &shared.connector_sessions
    };
    let slot = counts.acquire(&id.token_id);
    if slot.is_none() {
        shared
            .ops
            .metrics
            .auth_failed(role_of(is_agent), AuthFailure::SessionLimit);
        warn!(token = %id.token_id, role = if is_agent { "agent" } else { "connector" }, "session limit per token reached");
    } else {
        shared
            .handshakes
            .authenticated(client.ip(), is_agent, &id.token_id);
    }
    slot
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: "GET".into(),
            path: "/agent".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            leftover: vec![],
            raw: vec![],
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_load_balancers() {
        let xff = ForwardedHeader::XForwardedFor;
        let lb: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let trusted: Vec<IpNet> = vec!["10.0.0.0/24".parse().unwrap()];
        let h = head(&[("X-Forwarded-For", "203.0.113.9, 10.0.0.7")]);
        assert_eq!(
            client_addr(&trusted, xff, lb, &h).ip().to_string(),
            "203.0.113.9"
        );
        // From an untrusted peer the header is a claim, not a fact.
        let other: SocketAddr = "198.51.100.1:4000".parse().unwrap();
        assert_eq!(client_addr(&trusted, xff, other, &h), other);
        let fwd = ForwardedHeader::Forwarded;
        let h = head(&[("Forwarded", "for=\"[2001:db8::1]:4711\";proto=https")]);
        assert_eq!(
            client_addr(&trusted, fwd, lb, &h).ip().to_string(),
            "2001:db8::1"
        );
        let h = head(&[("Forwarded", "For=192.0.2.60:80;by=10.0.0.5")]);
        assert_eq!(
            client_addr(&trusted, fwd, lb, &h).ip().to_string(),
            "192.0.2.60"
        );
    }

    /// Behind nginx, a client-sent `Forwarded: for=…` (which nginx passes on) used to win over
    /// the `X-Forwarded-For` nginx set: audit logs and the identity stamped to connectors
    /// carried a forged address.
    #[test]
    fn a_client_forged_forwarded_header_is_ignored_behind_an_xff_balancer() {
        let lb: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let trusted: Vec<IpNet> = vec!["10.0.0.0/24".parse().unwrap()];
        // What nginx forwards: the client's own XFF (forged, left) plus the real address it
        // appended, and the client's Forwarded header untouched.
        let h = head(&[
            ("X-Forwarded-For", "192.0.2.66, 198.51.100.7"),
            ("Forwarded", "for=192.0.2.99"),
        ]);
        let got = client_addr(&trusted, ForwardedHeader::XForwardedFor, lb, &h);
        assert_eq!(got.ip().to_string(), "198.51.100.7");
        // And the other way round for a balancer that writes Forwarded.
        let h = head(&[
            ("Forwarded", "for=192.0.2.66, for=198.51.100.7"),
            ("X-Forwarded-For", "192.0.2.99"),
        ]);
        let got = client_addr(&trusted, ForwardedHeader::Forwarded, lb, &h);
        assert_eq!(got.ip().to_string(), "198.51.100.7");
        assert!("Forwarded".parse::<ForwardedHeader>().is_ok());
    }

    /// Found by the `client_addr` fuzz target: an entry the parser could not read (a balancer
    /// that writes `ip:port`, `unknown` or an obfuscated node) was skipped, and the next
    /// address to its left, which the client wrote, was believed.
    #[test]
    fn an_unreadable_forwarded_entry_ends_the_walk_instead_of_believing_the_client() {
        let lb: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let trusted: Vec<IpNet> = vec!["10.0.0.0/24".parse().unwrap()];
        let xff = ForwardedHeader::XForwardedFor;
        // Azure Application Gateway appends ip:port.
        let h = head(&[("X-Forwarded-For", "192.0.2.66, 198.51.100.7:4711")]);
        assert_eq!(
            client_addr(&trusted, xff, lb, &h).ip().to_string(),
            "198.51.100.7"
        );
        let h = head(&[("X-Forwarded-For", "192.0.2.66, unknown")]);
        assert_eq!(client_addr(&trusted, xff, lb, &h), lb);
        let fwd = ForwardedHeader::Forwarded;
        let h = head(&[("Forwarded", "for=192.0.2.66, FOR=_hidden")]);
        assert_eq!(client_addr(&trusted, fwd, lb, &h), lb);
        let h = head(&[(
            "Forwarded",
            "for=192.0.2.66, FOR=\"[2001:db8::7]\";proto=https",
        )]);
        assert_eq!(
            client_addr(&trusted, fwd, lb, &h).ip().to_string(),
            "2001:db8::7"
        );
        assert!("x-real-ip".parse::<ForwardedHeader>().is_err());
    }
}
