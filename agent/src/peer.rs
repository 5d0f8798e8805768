//! Who is on the other end of a local TCP connection.
//!
//! The agent's ports lead into the trusted network, so on a shared machine they must serve only
//! the user who runs the agent. On Linux the kernel lists every TCP socket with its owner in
//! `/proc/net/tcp` and `/proc/net/tcp6`; the client's socket is the one whose local address is
//! our peer address and whose remote address is our listening address. On Windows the TCP
//! table (`GetExtendedTcpTable`) names the owning process of each connection, and that
//! process's token names its user (a SID), compared with ours; a connection whose owner or user
//! cannot be found is refused (multi-user Windows: Remote Desktop Services, Citrix). Parsing and
//! comparing are plain functions, tested on any OS; other systems skip the check (loopback-only
//! binding still applies there).

pub mod windows;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A Unix user id, as the owner of a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uid(pub u32);

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {}", self.0)
    }
}

/// Parses a `/proc/net/tcp{,6}` address such as `0100007F:1F90`.
pub(crate) fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => {
            let v = u32::from_str_radix(ip, 16).ok()?;
            IpAddr::V4(Ipv4Addr::from(v.to_ne_bytes()))
        }
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                let v = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                bytes[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    a.port() == b.port() && canon(a.ip()) == canon(b.ip())
}

/// Finds the owner uid of the socket `local → remote` (state `want_state`, e.g. `01`
/// established or `0A` listening) in the text of `/proc/net/tcp`.
pub fn find_owner(
    table: &str,
    local: SocketAddr,
    remote: Option<SocketAddr>,
    want_state: &str,
) -> Option<u32> {
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Some(l), Some(r)) = (parse_addr(f[1]), parse_addr(f[2])) else {
            continue;
        };
        if f[3] != want_state || !same(l, local) {
            continue;
        }
        if let Some(remote) = remote {
            if !same(r, remote) {
                continue;
            }
        }
        return f[7].parse().ok();
    }
    None
}

#[cfg(target_os = "linux")]
fn lookup(local: SocketAddr, remote: Option<SocketAddr>, state: &str) -> Option<u32> {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|p| {
        let text = std::fs::read_to_string(p).ok()?;
        find_owner(&text, local, remote, state)
    })
}

/// Asks the kernel (sock_diag over netlink) for the owner of the TCP socket whose local address
/// is `local` and remote address is `remote`: one hash lookup, however many sockets exist. Each
/// thread keeps its netlink socket (four system calls less per client connection, on the path
/// of every new connection); a socket that fails, or answers out of turn, is dropped and the
/// question asked once more on a fresh one.
#[cfg(target_os = "linux")]
fn diag_owner(local: SocketAddr, remote: SocketAddr) -> std::io::Result<Option<u32>> {
    use std::cell::RefCell;
    thread_local! {
        static DIAG: RefCell<Option<(netlink_sys::Socket, u32)>> = const { RefCell::new(None) };
    }
    DIAG.with(|cell| {
        let mut slot = cell.borrow_mut();
        let mut last = None;
        for _ in 0..2 {
            if slot.is_none() {
                *slot = Some((diag_socket()?, 0));
            }
            let (socket, seq) = slot.as_mut().expect("just set");
            *seq = seq.wrapping_add(1);
            match diag_ask(socket, *seq, local, remote) {
                Ok(owner) => return Ok(owner),
                Err(e) => {
                    *slot = None;
                    last = Some(e);
                }
            }
        }
        Err(last.expect("asked twice"))
    })
}

#[cfg(target_os = "linux")]
fn diag_socket() -> std::io::Result<netlink_sys::Socket> {
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NlAddr};
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    Ok(socket)
}

/// One question on `socket`: the answer must carry `seq` (a late answer to an earlier question
/// is an error, and the caller starts over on a fresh socket).
#[cfg(target_os = "linux")]
fn diag_ask(
    socket: &netlink_sys::Socket,
    seq: u32,
    local: SocketAddr,
    remote: SocketAddr,
) -> std::io::Result<Option<u32>> {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::SockDiagMessage;

    let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST;
    hdr.sequence_number = seq;
    let mut packet = NetlinkMessage::new(
        hdr,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: local.port(),
                destination_port: remote.port(),
                source_address: local.ip(),
                destination_address: remote.ip(),
                interface_id: 0,
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = [0u8; 128];
    let len = packet.buffer_len();
    if len > buf.len() {
        return Err(std::io::Error::other("sock_diag request too long"));
    }
    packet.serialize(&mut buf[..len]);
    socket.send(&buf[..len], 0)?;
    let mut rx = [0u8; 1024];
    let n = socket.recv(&mut &mut rx[..], 0)?;
    let m = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[..n])
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    if m.header.sequence_number != seq {
        return Err(std::io::Error::other("sock_diag answer out of turn"));
    }
    match m.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => Ok(Some(r.header.uid)),
        // ENOENT: no such socket (it closed already).
        _ => Ok(None),
    }
}

/// Our effective uid (the owner of `/proc/self`).
#[cfg(target_os = "linux")]
pub fn my_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    // It does not change while we run; asked once (a `statx` less per client connection).
    static UID: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UID.get_or_init(|| std::fs::metadata("/proc/self").ok().map(|m| m.uid()))
}

/// Whether `addr` is a loopback address (IPv4, IPv6, or IPv4 mapped into IPv6).
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
        || matches!(addr.ip(), IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
}

/// Whether the connection from `peer` to our `local` listening address may be served, whatever
/// the peer's source address: a local process binding a LAN address (`curl --interface`) is still
/// a local process. `Err` carries the reason to log when it may not.
///
/// * When the connecting socket is on this machine, its owner must be the user running the agent.
/// * A non-loopback source is refused outright unless `allow_remote` (`--allow-remote-clients`,
///   which requires local authentication).
/// * A socket not found on this machine is another host's, admitted only when `allow_remote`
///   (local authentication then applies); from a loopback source it is refused.
///
/// The owner is a [`Uid`] on Linux and a [`windows::Owner`] (the user of the owning process)
/// on Windows.
pub fn admit<T: PartialEq + fmt::Display>(
    peer: SocketAddr,
    allow_remote: bool,
    me: Option<T>,
    owner: Option<T>,
) -> Result<(), String> {
    let loopback = is_loopback(peer);
    let me = me.ok_or("cannot determine our own user")?;
    match owner {
        Some(user) if user != me => Err(format!(
            "connection from {user} (source {}), but this agent serves only {me}",
            peer.ip()
        )),
        _ if !loopback && !allow_remote => Err(format!(
            "connection from {}, not a loopback address; the agent serves other hosts only with --allow-remote-clients",
            peer.ip()
        )),
        None if loopback => Err("cannot find the connecting socket's owner".into()),
        _ => Ok(()),
    }
}

/// [`admit`] with the owner of the connecting socket asked of the kernel.
#[cfg(target_os = "linux")]
pub fn check_peer(peer: SocketAddr, local: SocketAddr, allow_remote: bool) -> Result<(), String> {
    let owner = match diag_owner(peer, local) {
        Ok(o) => o,
        // No netlink (a locked-down container): the slower /proc scan gives the same answer.
        Err(_) => lookup(peer, Some(local), "01"),
    };
    admit(peer, allow_remote, my_uid().map(Uid), owner.map(Uid))
}

/// Whether the client at `peer` (connected to our `local`) may use this agent: [`admit`] with
/// the owner of its socket (on Windows read from the TCP table, which may need a moment).
pub async fn check(peer: SocketAddr, local: SocketAddr, allow_remote: bool) -> Result<(), String> {
    #[cfg(windows)]
    return windows::check_peer(peer, local, allow_remote).await;
    #[cfg(not(windows))]
    check_peer(peer, local, allow_remote)
}

#[cfg(not(any(target_os = "linux", windows)))]
pub fn check_peer(peer: SocketAddr, _local: SocketAddr, allow_remote: bool) -> Result<(), String> {
    // No owner lookup here: the address rule still applies.
    admit(peer, allow_remote, Some(Uid(0)), Some(Uid(0)))
}

/// The uid listening on `addr`, if any (to explain an "address in use").
#[cfg(target_os = "linux")]
pub fn listener_owner(addr: SocketAddr) -> Option<u32> {
    lookup(addr, None, "0A")
}

/// The socket inode of the listener on `addr` in the text of `/proc/net/tcp`.
pub fn find_listener_inode(table: &str, addr: SocketAddr) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "0A" || !same(parse_addr(f[1])?, addr) {
            return None;
        }
        f[9].parse().ok()
    })
}

/// The process (pid, name) holding the listener on `addr`, when it is one of ours (only our own
/// processes' descriptors are readable): to say "already in use by sallyport (pid 1234)".
#[cfg(target_os = "linux")]
pub fn listener_process(addr: SocketAddr) -> Option<(u32, String)> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|p| find_listener_inode(&std::fs::read_to_string(p).ok()?, addr))?;
    let needle = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == needle) {
                let name = std::fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default();
                return Some((pid, name));
            }
        }
    }
    None
}

#[cfg(not(target_os = "linux"))]
pub fn listener_process(_addr: SocketAddr) -> Option<(u32, String)> {
    None
}

#[cfg(not(target_os = "linux"))]
pub fn listener_owner(_addr: SocketAddr) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0438 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:C350 0100007F:0438 01 00000000:00000000 00:00000000 00000000  1001        0 2 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:C351 0100007F:0438 01 00000000:00000000 00:00000000 00000000  1000        0 3 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn the_connecting_socket_owner_is_found_by_both_addresses() {
        let listen: SocketAddr = "127.0.0.1:1080".parse().unwrap();
        let other_user: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let same_user: SocketAddr = "127.0.0.1:50001".parse().unwrap();
        assert_eq!(
            find_owner(TABLE, other_user, Some(listen), "01"),
            Some(1001)
        );
        assert_eq!(find_owner(TABLE, same_user, Some(listen), "01"), Some(1000));
        assert_eq!(find_owner(TABLE, listen, None, "0A"), Some(1000));
        assert_eq!(
            find_owner(TABLE, "127.0.0.1:9".parse().unwrap(), None, "0A"),
            None
        );
    }

    #[test]
    fn ipv6_entries_parse() {
        let a = parse_addr("00000000000000000000000001000000:0050").unwrap();
        assert_eq!(a, "[::1]:80".parse().unwrap());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_names_the_owner_of_our_own_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _s = l.accept().unwrap();
        let owner = diag_owner(c.local_addr().unwrap(), l.local_addr().unwrap()).unwrap();
        assert_eq!(owner, my_uid());
        assert!(check_peer(c.local_addr().unwrap(), l.local_addr().unwrap(), false).is_ok());
    }

    /// The thread's netlink socket is kept between questions: an answer "no such socket" (a
    /// client that closed before we asked) must not leave a reply behind that the next question
    /// would take as its own.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_kept_netlink_socket_answers_each_question_with_its_own_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for _ in 0..50 {
            let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let _s = l.accept().unwrap();
            assert_eq!(diag_owner(gone, l.local_addr().unwrap()).unwrap(), None);
            let owner = diag_owner(c.local_addr().unwrap(), l.local_addr().unwrap()).unwrap();
            assert_eq!(owner, my_uid());
        }
    }

    #[test]
    fn another_local_user_via_a_lan_source_address_is_refused() {
        let lan: SocketAddr = "10.1.2.3:50000".parse().unwrap();
        // Without --allow-remote-clients: refused whoever it is.
        assert!(admit(lan, false, Some(Uid(1000)), Some(Uid(1001)))
            .unwrap_err()
            .contains("uid 1001"));
        assert!(admit(lan, false, Some(Uid(1000)), Some(Uid(1000)))
            .unwrap_err()
            .contains("not a loopback address"));
        assert!(admit(lan, false, Some(Uid(1000)), None).is_err());
        // With it: a local socket of another user is still refused; ours and other hosts' pass
        // (local authentication follows).
        assert!(admit(lan, true, Some(Uid(1000)), Some(Uid(1001)))
            .unwrap_err()
            .contains("uid 1001"));
        assert!(admit(lan, true, Some(Uid(1000)), Some(Uid(1000))).is_ok());
        assert!(admit(lan, true, Some(Uid(1000)), None).is_ok());
    }

    #[test]
    fn loopback_peers_must_be_found_and_ours() {
        for peer in ["127.0.0.1:50000", "[::1]:50000", "[::ffff:127.0.0.1]:50000"] {
            let peer: SocketAddr = peer.parse().unwrap();
            for allow_remote in [false, true] {
                assert!(admit(peer, allow_remote, Some(Uid(1000)), Some(Uid(1000))).is_ok());
                assert!(admit(peer, allow_remote, Some(Uid(1000)), Some(Uid(1001))).is_err());
                assert!(admit(peer, allow_remote, Some(Uid(1000)), None).is_err());
                assert!(admit(peer, allow_remote, None, Some(Uid(1000))).is_err());
            }
        }
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert_eq!(
            find_owner(
                "header\nnonsense\n1: zz:zz yy 01 a b c 5\n",
                "127.0.0.1:1".parse().unwrap(),
                None,
                "01"
            ),
            None
        );
    }
}
