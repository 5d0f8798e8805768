//! SOCKS5 `UDP ASSOCIATE` over the tunnel: one relay socket per association, bound on the
//! address the app's control connection reached, carrying datagrams as `DGRAM` frames on the
//! gateway session (`docs/protocol.md`, "Datagrams").
//!
//! Who may send to a relay socket: the association's client only (RFC 1928: the address the
//! request named, else the control connection's address; the first datagram that passes fixes
//! the port), **and** only a socket of the user running the agent — looked up per source
//! address in the kernel's UDP table (`/proc/net/udp{,6}` on Linux, `GetExtendedUdpTable` and
//! the owning process's user on Windows), as `peer.rs` does for TCP connections, with a small
//! cache. Other systems (macOS) have no lookup and answer `0x07`.
//! Everything else, fragments and malformed headers included, is dropped and counted; the counts
//! are logged once when the association ends.

use crate::peer;
use crate::pool::Pool;
use socks::udp::{parse_header, write_header, AssociateFuture, Associator, UdpRelay, UdpRequest};
use socks::{DialError, DialErrorKind, Target};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tracing::{debug, info, info_span, Instrument};
use tunnel::{meta, Association, Dest, Meta};

/// Associations one agent serves at once.
pub const MAX_ASSOCIATIONS: usize = 64;

/// An association with no datagram either way for this long is ended.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a source address's owner is remembered.
const OWNER_TTL: Duration = Duration::from_secs(1);

/// Source addresses whose owner is remembered (the cache is emptied when full).
const OWNER_CACHE: usize = 256;

/// Owner lookups (each reads the kernel's UDP table) per second per listener: a flood from many
/// source ports costs at most this many, the rest are dropped unlooked.
const OWNER_LOOKUPS_PER_SECOND: u32 = 200;

/// Serves `UDP ASSOCIATE` for one SOCKS5 listener.
pub struct UdpAssociator {
    pool: Arc<Pool>,
    session_wait: Duration,
    permits: Arc<Semaphore>,
    owners: Arc<OwnerCheck>,
}

impl UdpAssociator {
    pub fn new(pool: Arc<Pool>, session_wait: Duration, allow_remote: bool) -> UdpAssociator {
        UdpAssociator {
            pool,
            session_wait,
            permits: Arc::new(Semaphore::new(MAX_ASSOCIATIONS)),
            owners: Arc::new(OwnerCheck {
                allow_remote,
                cache: Mutex::new(HashMap::new()),
                lookups: Mutex::new((Instant::now(), 0)),
            }),
        }
    }
}

impl Associator for UdpAssociator {
    fn associate(&self, request: UdpRequest) -> AssociateFuture {
        let (pool, wait) = (self.pool.clone(), self.session_wait);
        let (permits, owners) = (self.permits.clone(), self.owners.clone());
        Box::pin(async move {
            // Datagrams carry no password: only local apps whose socket's owner is checked.
            if !cfg!(any(target_os = "linux", windows)) {
                return Err(DialError::new(
                    DialErrorKind::NotSupported,
                    "UDP ASSOCIATE needs the owner check of UDP sockets, not built on this system",
                ));
            }
            if !canonical_ip(request.client.ip()).is_loopback() {
                return Err(DialError::new(
                    DialErrorKind::NotSupported,
                    "UDP ASSOCIATE is served to local apps only (datagrams carry no password)",
                ));
            }
            let permit = permits.try_acquire_owned().map_err(|_| {
                DialError::new(
                    DialErrorKind::Unavailable,
                    format!("this agent already serves {MAX_ASSOCIATIONS} UDP associations"),
                )
            })?;
            let session = pool
                .session(wait)
                .await
                .map_err(|e| DialError::new(DialErrorKind::Unavailable, e))?;
            if !session.datagrams() {
                return Err(DialError::new(
                    DialErrorKind::NotSupported,
                    "the gateway does not carry UDP (it runs an older version)",
                ));
            }
            let socket = UdpSocket::bind(SocketAddr::new(request.local.ip(), 0))
                .await
                .map_err(|e| DialError::new(DialErrorKind::Other, format!("UDP relay: {e}")))?;
            let bound = socket
                .local_addr()
                .map_err(|e| DialError::new(DialErrorKind::Other, format!("UDP relay: {e}")))?;
            let mut m = Meta::default();
            m.set(meta::FRONT, "socks5");
            let assoc = session
                .open_association(m)
                .map_err(|e| DialError::new(crate::dialer::kind_for(e.code()), e.to_string()))?;
            let span = info_span!("udp", assoc = assoc.id(), relay = %bound);
            let run = async move {
                let _permit = permit;
                relay(socket, assoc, request, owners).await
            }
            .instrument(span);
            Ok(UdpRelay {
                bound,
                run: Box::pin(run),
            })
        })
    }
}

/// Why datagrams were dropped, counted per association.
#[derive(Default, Debug)]
struct Drops {
    /// From an address other than the association's client.
    foreign: u64,
    /// From another local user's socket (or one whose owner cannot be found).
    other_user: u64,
    /// Malformed header, unknown address type, bad name.
    malformed: u64,
    /// `FRAG ≠ 0`.
    fragment: u64,
    /// The session's datagram queue was full, or the datagram too large.
    queue: u64,
    /// A reply before the client sent anything (no address to send it to).
    no_client: u64,
}

/// Relays between the app's datagrams on `socket` and the tunnel association until the
/// association ends (session lost, closed by the gateway) or goes idle; the caller drops it
/// when the app closes the control connection.
async fn relay(socket: UdpSocket, assoc: Association, req: UdpRequest, owners: Arc<OwnerCheck>) {
    let mut client: Option<SocketAddr> = None;
    let mut buf = vec![0u8; 65_536];
    let mut out = Vec::with_capacity(2048);
    let mut drops = Drops::default();
    let mut deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
    let why = loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, src) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(error = %e, "udp relay receive failed");
                        continue;
                    }
                };
                if !from_client(src, &req, client) {
                    drops.foreign += 1;
                    continue;
                }
                if let Err(why) = owners.check(src) {
                    if drops.other_user == 0 {
                        info!(source = %src, reason = %why, "dropping datagrams from another user's socket");
                    }
                    drops.other_user += 1;
                    continue;
                }
                let (target, data) = match parse_header(&buf[..n]) {
                    Ok(x) => x,
                    Err(socks::udp::UdpHeaderError::Fragmented(_)) => {
                        drops.fragment += 1;
                        continue;
                    }
                    Err(_) => {
                        drops.malformed += 1;
                        continue;
                    }
                };
                client.get_or_insert(src);
                match assoc.send(&Dest::new(target.host, target.port), data) {
                    Ok(()) => deadline = tokio::time::Instant::now() + IDLE_TIMEOUT,
                    Err(_) => drops.queue += 1,
                }
            }
            d = assoc.recv() => match d {
                Ok(d) => {
                    let Some(to) = client else {
                        drops.no_client += 1;
                        continue;
                    };
                    // The client's socket may have closed and its port gone to another user.
                    if owners.check(to).is_err() {
                        drops.other_user += 1;
                        continue;
                    }
                    write_header(&Target::new(d.addr.host, d.addr.port), &d.payload, &mut out);
                    if let Err(e) = socket.send_to(&out, to).await {
                        debug!(error = %e, "udp relay send failed");
                    }
                    deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
                }
                Err((code, reason)) => break format!("ended by the gateway ({code}): {reason}"),
            },
            _ = tokio::time::sleep_until(deadline) => break format!("idle for {IDLE_TIMEOUT:?}"),
        }
    };
    let (dropped_in, received, sent) = assoc.counts();
    info!(%why, sent, received, dropped_in, ?drops, "udp association ended");
}

/// RFC 1928: datagrams come from the association's client. Before the first one, that is the
/// address and port the request named, else the control connection's address (any port); after
/// it, exactly the address and port of the first.
fn from_client(src: SocketAddr, req: &UdpRequest, fixed: Option<SocketAddr>) -> bool {
    if let Some(c) = fixed {
        return canonical(c) == canonical(src);
    }
    let ip = req.declared_ip.unwrap_or(req.client.ip());
    canonical_ip(ip) == canonical_ip(src.ip()) && req.declared_port.is_none_or(|p| p == src.port())
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(a.ip()), a.port())
}

/// A source address's verdict and when it was made.
type Verdict = (Instant, Result<(), String>);

/// The same-user check for datagram sources, with a small cache.
struct OwnerCheck {
    allow_remote: bool,
    cache: Mutex<HashMap<SocketAddr, Verdict>>,
    /// Lookups in the second that started at the instant.
    lookups: Mutex<(Instant, u32)>,
}

impl OwnerCheck {
    fn check(&self, src: SocketAddr) -> Result<(), String> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, verdict)) = cache.get(&src) {
            if at.elapsed() < OWNER_TTL {
                return verdict.clone();
            }
        }
        {
            let mut l = self.lookups.lock().unwrap_or_else(|e| e.into_inner());
            if l.0.elapsed() >= Duration::from_secs(1) {
                *l = (Instant::now(), 0);
            }
            if l.1 >= OWNER_LOOKUPS_PER_SECOND {
                return Err("too many new source addresses this second".into());
            }
            l.1 += 1;
        }
        let verdict = owner_verdict(src, self.allow_remote);
        if cache.len() >= OWNER_CACHE {
            cache.clear();
        }
        cache.insert(src, (Instant::now(), verdict.clone()));
        verdict
    }
}

/// [`peer::admit`] for the UDP socket that sent from `src`. Every socket bound to that port and
/// address (or the unspecified address) counts: if any belongs to another user, refused (two
/// users' sockets can share a port with `SO_REUSEADDR`).
#[cfg(target_os = "linux")]
fn owner_verdict(src: SocketAddr, allow_remote: bool) -> Result<(), String> {
    let me = peer::my_uid().map(peer::Uid);
    let mut owners = Vec::new();
    for p in ["/proc/net/udp", "/proc/net/udp6"] {
        if let Ok(table) = std::fs::read_to_string(p) {
            owners.extend(udp_owners(&table, src).into_iter().map(peer::Uid));
        }
    }
    let owner = deciding_owner(owners, &me);
    peer::admit(src, allow_remote, me, owner)
}

/// [`peer::admit`] for the UDP socket that sent from `src`, as on Linux: every socket in the UDP
/// tables that could have sent it counts, through the user of its owning process (one that
/// cannot be read is refused). When the tables cannot be read the datagram is refused.
#[cfg(windows)]
fn owner_verdict(src: SocketAddr, allow_remote: bool) -> Result<(), String> {
    use peer::windows;
    let rows = windows::udp_rows().map_err(|e| format!("cannot check who sent: {e}"))?;
    let mut pids: Vec<u32> = rows
        .iter()
        .filter(|r| could_send(r.local, src))
        .map(|r| r.pid)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    let me = windows::me();
    let owner = deciding_owner(pids.into_iter().map(windows::owner).collect(), &me);
    peer::admit(src, allow_remote, me, owner)
}

#[cfg(not(any(target_os = "linux", windows)))]
fn owner_verdict(src: SocketAddr, allow_remote: bool) -> Result<(), String> {
    // No owner lookup here (as for TCP on these systems): the address rules still apply.
    peer::admit(src, allow_remote, Some(peer::Uid(0)), Some(peer::Uid(0)))
}

/// Of the owners of every socket that could have sent a datagram, the one that decides: any
/// other than `me` (refused), else the first (ours), else none.
fn deciding_owner<T: PartialEq>(owners: Vec<T>, me: &Option<T>) -> Option<T> {
    let mut owners = owners.into_iter();
    let first = owners.next()?;
    if me.as_ref() != Some(&first) {
        return Some(first);
    }
    owners.find(|o| me.as_ref() != Some(o)).or(Some(first))
}

/// Whether a UDP socket bound to `local` could have sent from `src`: same port, and bound to
/// its address or the unspecified one.
fn could_send(local: SocketAddr, src: SocketAddr) -> bool {
    let ip = canonical_ip(local.ip());
    local.port() == src.port() && (ip.is_unspecified() || ip == canonical_ip(src.ip()))
}

/// The owners of the sockets in a `/proc/net/udp{,6}` table that could have sent from `src`:
/// bound to its port, on its address or the unspecified one.
pub fn udp_owners(table: &str, src: SocketAddr) -> Vec<u32> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || !could_send(peer::parse_addr(f[1])?, src) {
                return None;
            }
            f[7].parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 0100007F:C350 00000000:0000 07 00000000:00000000 00:00000000 00000000  1001        0 1 2 0000000000000000 0
  2: 00000000:C351 0100007F:0438 01 00000000:00000000 00:00000000 00000000  1000        0 2 2 0000000000000000 0
  3: 0100007F:C352 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 3 2 0000000000000000 0
  4: 00000000:C352 00000000:0000 07 00000000:00000000 00:00000000 00000000  1001        0 4 2 0000000000000000 0
";

    #[test]
    fn a_datagrams_sender_is_found_on_its_address_or_the_unspecified_one() {
        let other: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let wildcard: SocketAddr = "127.0.0.1:50001".parse().unwrap();
        assert_eq!(udp_owners(UDP, other), vec![1001]);
        assert_eq!(udp_owners(UDP, wildcard), vec![1000]);
        assert!(udp_owners(UDP, "127.0.0.1:9".parse().unwrap()).is_empty());
    }

    #[test]
    fn a_port_shared_with_another_users_socket_counts_both_owners() {
        let shared: SocketAddr = "127.0.0.1:50002".parse().unwrap();
        assert_eq!(udp_owners(UDP, shared), vec![1000, 1001]);
    }

    #[test]
    fn another_users_socket_sharing_the_port_decides_whatever_the_order() {
        let me = Some(peer::Uid(1000));
        for owners in [vec![1000, 1001], vec![1001, 1000], vec![1001]] {
            let owners = owners.into_iter().map(peer::Uid).collect();
            assert_eq!(deciding_owner(owners, &me), Some(peer::Uid(1001)));
        }
        assert_eq!(
            deciding_owner(vec![peer::Uid(1000)], &me),
            Some(peer::Uid(1000))
        );
        assert_eq!(deciding_owner(Vec::new(), &me), None);
    }

    /// `MIB_UDPTABLE_OWNER_PID` / `MIB_UDP6TABLE_OWNER_PID` as Windows lays them out.
    fn windows_udp_table(rows: &[(IpAddr, u16, u32)]) -> Vec<u8> {
        let mut buf = (rows.len() as u32).to_ne_bytes().to_vec();
        for (ip, port, pid) in rows {
            match ip {
                IpAddr::V4(v4) => buf.extend(v4.octets()),
                IpAddr::V6(v6) => {
                    buf.extend(v6.octets());
                    buf.extend(0u32.to_ne_bytes()); // scope
                }
            }
            buf.extend(u32::from(port.swap_bytes()).to_ne_bytes());
            buf.extend(pid.to_ne_bytes());
        }
        buf
    }

    #[test]
    fn a_datagrams_sender_is_found_in_the_windows_udp_tables() {
        use peer::windows::parse_udp_table;
        let lo4: IpAddr = "127.0.0.1".parse().unwrap();
        let any4: IpAddr = "0.0.0.0".parse().unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        let v4 = windows_udp_table(&[(lo4, 50000, 4242), (any4, 50001, 77), (lo4, 53, 4)]);
        let v6 = windows_udp_table(&[(any6, 50002, 99), ("::1".parse().unwrap(), 50003, 5)]);
        let mut rows = parse_udp_table(&v4, false);
        rows.extend(parse_udp_table(&v6, true));
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[0].local, "127.0.0.1:50000".parse().unwrap());
        assert_eq!(rows[4].local, "[::1]:50003".parse().unwrap());
        let senders = |src: &str| -> Vec<u32> {
            let src: SocketAddr = src.parse().unwrap();
            rows.iter()
                .filter(|r| could_send(r.local, src))
                .map(|r| r.pid)
                .collect()
        };
        assert_eq!(senders("127.0.0.1:50000"), vec![4242]);
        assert_eq!(senders("127.0.0.1:50001"), vec![77]);
        // A dual-stack socket bound to `::` sends IPv4 datagrams too.
        assert_eq!(senders("127.0.0.1:50002"), vec![99]);
        assert_eq!(senders("[::1]:50003"), vec![5]);
        assert!(senders("127.0.0.1:50003").is_empty());
        assert!(senders("127.0.0.2:50000").is_empty());
        // A count larger than the rows present is cut; a short buffer is empty.
        let mut lying = v6.clone();
        lying[..4].copy_from_slice(&9u32.to_ne_bytes());
        assert_eq!(parse_udp_table(&lying, true).len(), 2);
        assert!(parse_udp_table(&v4[..3], false).is_empty());
        assert!(parse_udp_table(&v4[..20], false).len() == 1);
    }

    #[test]
    fn only_the_associations_client_may_send_and_the_first_datagram_fixes_its_port() {
        let req = UdpRequest {
            client: "127.0.0.1:40000".parse().unwrap(),
            local: "127.0.0.1:1080".parse().unwrap(),
            declared_ip: None,
            declared_port: Some(5000),
        };
        let ok: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert!(from_client(ok, &req, None));
        assert!(!from_client("127.0.0.1:5001".parse().unwrap(), &req, None));
        assert!(!from_client("127.0.0.2:5000".parse().unwrap(), &req, None));
        assert!(from_client(ok, &req, Some(ok)));
        assert!(!from_client(
            "127.0.0.1:5001".parse().unwrap(),
            &req,
            Some(ok)
        ));
        let any_port = UdpRequest {
            declared_port: None,
            ..req
        };
        assert!(from_client(
            "127.0.0.1:5001".parse().unwrap(),
            &any_port,
            None
        ));
    }
}
