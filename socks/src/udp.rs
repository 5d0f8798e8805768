//! SOCKS5 UDP (RFC 1928 §7): the header of each datagram on the relay port, and the hook
//! through which `UDP ASSOCIATE` reaches the caller.
//!
//! Every datagram between the app and the relay port starts with
//! `RSV:u16 | FRAG:u8 | ATYP:u8 | DST.ADDR | DST.PORT`, then the data. [`parse_header`] reads what
//! an app sends (a network parser: fuzzed by `fuzz/fuzz_targets/socks5_udp.rs`), refusing
//! fragments (`FRAG ≠ 0`, dropped as most servers do), unknown address types and names that
//! [`Target::has_valid_host`] refuses; [`write_header`] writes the header of a reply. The relay
//! itself (sockets, the same-user check, the tunnel) is the caller's: an [`Associator`].

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;

use crate::{DialError, Target};

/// Why a datagram from the app is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UdpHeaderError {
    #[error("datagram shorter than its SOCKS5 UDP header")]
    Truncated,
    #[error("fragmented datagram (FRAG {0}): fragments are not supported")]
    Fragmented(u8),
    #[error("reserved bytes are not zero")]
    Reserved,
    #[error("unknown address type {0:#04x}")]
    AddressType(u8),
    #[error("invalid destination name")]
    BadName,
}

/// Parses the SOCKS5 UDP header of `buf`: the destination and the data after the header.
pub fn parse_header(buf: &[u8]) -> Result<(Target, &[u8]), UdpHeaderError> {
    let [r0, r1, frag, atyp, rest @ ..] = buf else {
        return Err(UdpHeaderError::Truncated);
    };
    if (*r0, *r1) != (0, 0) {
        return Err(UdpHeaderError::Reserved);
    }
    if *frag != 0 {
        return Err(UdpHeaderError::Fragmented(*frag));
    }
    let (host, rest) = match atyp {
        0x01 => {
            let (a, rest) = split(rest, 4)?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            (ip.to_string(), rest)
        }
        0x04 => {
            let (a, rest) = split(rest, 16)?;
            let mut b = [0u8; 16];
            b.copy_from_slice(a);
            (Ipv6Addr::from(b).to_string(), rest)
        }
        0x03 => {
            let (n, rest) = split(rest, 1)?;
            let (name, rest) = split(rest, n[0] as usize)?;
            let name = std::str::from_utf8(name).map_err(|_| UdpHeaderError::BadName)?;
            (name.to_string(), rest)
        }
        other => return Err(UdpHeaderError::AddressType(*other)),
    };
    let (p, data) = split(rest, 2)?;
    let target = Target::new(host, u16::from_be_bytes([p[0], p[1]]));
    if !target.has_valid_host() {
        return Err(UdpHeaderError::BadName);
    }
    Ok((target, data))
}

fn split(b: &[u8], n: usize) -> Result<(&[u8], &[u8]), UdpHeaderError> {
    if b.len() < n {
        return Err(UdpHeaderError::Truncated);
    }
    Ok(b.split_at(n))
}

/// Writes the header of a datagram to the app (`FRAG = 0`), `from` being its source: an IPv4 or
/// IPv6 address when it is one, else a domain name (cut to 255 bytes), then `data`.
pub fn write_header(from: &Target, data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0, 0, 0]);
    match from.host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => {
            out.push(0x01);
            out.extend_from_slice(&ip.octets());
        }
        Ok(IpAddr::V6(ip)) => {
            out.push(0x04);
            out.extend_from_slice(&ip.octets());
        }
        Err(_) => {
            let name = &from.host.as_bytes()[..from.host.len().min(255)];
            out.push(0x03);
            out.push(name.len() as u8);
            out.extend_from_slice(name);
        }
    }
    out.extend_from_slice(&from.port.to_be_bytes());
    out.extend_from_slice(data);
}

/// What `UDP ASSOCIATE` asks for.
#[derive(Clone, Debug)]
pub struct UdpRequest {
    /// The control connection's peer (the app).
    pub client: SocketAddr,
    /// The control connection's local address (the relay binds this IP).
    pub local: SocketAddr,
    /// The source the app said it will send from (`DST.ADDR`/`DST.PORT` of the request):
    /// `None` parts were not given (unspecified address, port 0, or a name).
    pub declared_ip: Option<IpAddr>,
    pub declared_port: Option<u16>,
}

/// A relay made for one association: its address (the reply's `BND.ADDR`/`BND.PORT`), and the
/// work that relays until it ends. Dropping the future ends the association.
pub struct UdpRelay {
    pub bound: SocketAddr,
    pub run: Pin<Box<dyn Future<Output = ()> + Send>>,
}

/// The future an [`Associator`] returns.
pub type AssociateFuture = Pin<Box<dyn Future<Output = Result<UdpRelay, DialError>> + Send>>;

/// Serves `UDP ASSOCIATE` (the agent does, over its tunnel). Without one, the SOCKS5 server
/// answers it with 0x07 as it always did.
pub trait Associator: Send + Sync + 'static {
    fn associate(&self, request: UdpRequest) -> AssociateFuture;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_type_parses_and_writes_back_the_same() {
        for (host, port) in [("10.1.2.3", 53), ("fd00::1", 5353), ("dns.internal", 53)] {
            let t = Target::new(host, port);
            let mut out = Vec::new();
            write_header(&t, b"query", &mut out);
            assert_eq!(parse_header(&out).unwrap(), (t, &b"query"[..]));
        }
    }

    #[test]
    fn fragments_are_dropped_not_reassembled() {
        let mut out = Vec::new();
        write_header(&Target::new("10.0.0.1", 53), b"x", &mut out);
        out[2] = 1;
        assert_eq!(parse_header(&out), Err(UdpHeaderError::Fragmented(1)));
    }

    #[test]
    fn truncated_headers_bad_names_and_types_are_refused() {
        let mut out = Vec::new();
        write_header(&Target::new("dns.internal", 53), b"", &mut out);
        for n in 0..out.len() {
            assert!(parse_header(&out[..n]).is_err(), "cut at {n}");
        }
        assert_eq!(
            parse_header(&[0, 0, 0, 0x05, 1, 2]),
            Err(UdpHeaderError::AddressType(5))
        );
        assert_eq!(
            parse_header(&[0, 0, 0, 0x03, 3, b'a', b' ', b'b', 0, 53]),
            Err(UdpHeaderError::BadName)
        );
        assert_eq!(
            parse_header(&[0, 0, 0, 0x03, 0, 0, 53]),
            Err(UdpHeaderError::BadName)
        );
    }
}
