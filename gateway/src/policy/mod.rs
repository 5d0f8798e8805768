//! Allow-lists: which destinations a connector will dial, and for whom.
//!
//! The connector is the last guard before the trusted network, so this module is deliberately strict
//! and entirely pure logic (the one exception is [`local_addresses`], which asks the OS for this
//! machine's interface addresses).
//!
//! The pieces, from the bottom up:
//!
//! * [`parse_host`] turns whatever an agent asked for into a [`Host`]: a normalised DNS name or an IP
//!   address. It rejects the numeric tricks that some resolvers (`inet_aton`) would quietly turn into
//!   addresses — `167772161`, `0x7f.1`, `0177.0.0.1`, `127.1` — so that a name-based rule can never be
//!   sidestepped by spelling an address as a "name".
//! * [`Route`] is a destination pattern: a [`HostPattern`] plus a [`PortRange`], written like
//!   `db.internal:5432`, `*.internal:22`, `10.20.0.0/16:443`, `[fd00::/8]:22` or `*:*`.
//! * [`Rule`] is a route plus optional `users=`/`groups=` constraints.
//! * [`Policy`] is the allow-list. [`Policy::check`] is asked before resolving a name and
//!   [`Policy::check_resolved`] for every address the name resolved to: loopback, link-local,
//!   cloud metadata ([`CLOUD_METADATA`]), unspecified, multicast, broadcast and the connector's
//!   own addresses are refused unless a rule
//!   lists them explicitly as a network (`127.0.0.1/32:8080`), so that `*.internal:*` does not
//!   accidentally open the connector's own admin ports to anyone who controls an internal DNS record.

//!
//! | file | what |
//! |---|---|
//! | `routes` | destinations: [`Host`] and [`parse_host`], [`HostPattern`], [`PortRange`], [`Route`] |
//! | `rules` | who may go where: [`Rule`], and the allow-list [`Policy`] with its special-address checks |
//! | `protocol` | what a rule lets the client speak ([`Protocol`]), and the verdict on its first bytes ([`Requirement`]) |
//! | `sniff` | recognisers for those first bytes: TLS ClientHello, SSH line, PostgreSQL packet, HTTP request line |

mod protocol;
mod routes;
mod rules;
pub mod sniff;

pub use protocol::*;
pub use routes::*;
pub use rules::*;

/// A pattern, host or rule that could not be parsed. Each message names the offending text and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A destination host name or address.
    #[error("invalid host {input:?}: {why}")]
    Host { input: String, why: String },
    /// A route pattern such as `db.internal:5432`.
    #[error("invalid route {input:?}: {why}")]
    Route { input: String, why: String },
    /// A rule such as `db.internal:5432 users=alice groups=dba`.
    #[error("invalid rule {input:?}: {why}")]
    Rule { input: String, why: String },
}

fn host_err(input: &str, why: impl Into<String>) -> PolicyError {
    PolicyError::Host {
        input: input.to_string(),
        why: why.into(),
    }
}
fn route_err(input: &str, why: impl Into<String>) -> PolicyError {
    PolicyError::Route {
        input: input.to_string(),
        why: why.into(),
    }
}
fn rule_err(input: &str, why: impl Into<String>) -> PolicyError {
    PolicyError::Rule {
        input: input.to_string(),
        why: why.into(),
    }
}

#[cfg(test)]
mod tests;
