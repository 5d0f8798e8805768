//! The same-user check on Windows: the TCP table (`GetExtendedTcpTable`,
//! `TCP_TABLE_OWNER_PID_ALL`; Wine 8 lists only a few rows for `…_CONNECTIONS`) names the
//! process owning the connecting socket, and the UDP table (`GetExtendedUdpTable`,
//! `UDP_TABLE_OWNER_PID`) the processes owning the sockets a datagram may have come from; that
//! process's token names its user (a SID), compared with the user of our own token.
//!
//! Another user's process cannot be opened by a normal user, and kernel-owned sockets (pid 0, 4)
//! have no user token: the connection is then refused, naming the pid, never served. The table
//! layout and the SID encoding are parsed by plain functions, tested on every OS.

use super::same;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `MIB_TCP_STATE_*` values of rows that are not a live client socket: CLOSED, LISTEN,
/// TIME_WAIT (owned by nobody), DELETE_TCB.
const NOT_LIVE: [u32; 4] = [1, 2, 11, 12];

/// One row of a TCP table with owning process ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpRow {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u32,
    pub pid: u32,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// A port as the table stores it: network byte order in the low 16 bits of a DWORD, i.e. the
/// first two bytes in memory.
fn port_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// The rows of a `MIB_TCPTABLE_OWNER_PID` (IPv4: `dwNumEntries`, then 24-byte rows of state,
/// local address and port, remote address and port, pid) or a `MIB_TCP6TABLE_OWNER_PID` (IPv6:
/// 56-byte rows of local address, scope and port, remote address, scope and port, state, pid).
/// A count larger than the buffer holds is cut to the rows present.
pub fn parse_tcp_table(buf: &[u8], v6: bool) -> Vec<TcpRow> {
    let Some(count) = u32_at(buf, 0) else {
        return Vec::new();
    };
    let row_len = if v6 { 56 } else { 24 };
    let rows = buf.get(4..).unwrap_or(&[]);
    rows.chunks_exact(row_len)
        .take(count as usize)
        .filter_map(|r| {
            if v6 {
                let ip = |at: usize| -> Option<IpAddr> {
                    let a: [u8; 16] = r.get(at..at + 16)?.try_into().ok()?;
                    Some(IpAddr::V6(Ipv6Addr::from(a)))
                };
                Some(TcpRow {
                    local: SocketAddr::new(ip(0)?, port_at(r, 20)?),
                    remote: SocketAddr::new(ip(24)?, port_at(r, 44)?),
                    state: u32_at(r, 48)?,
                    pid: u32_at(r, 52)?,
                })
            } else {
                let ip = |at: usize| -> Option<IpAddr> {
                    let a: [u8; 4] = r.get(at..at + 4)?.try_into().ok()?;
                    Some(IpAddr::V4(Ipv4Addr::from(a)))
                };
                Some(TcpRow {
                    state: u32_at(r, 0)?,
                    local: SocketAddr::new(ip(4)?, port_at(r, 8)?),
                    remote: SocketAddr::new(ip(12)?, port_at(r, 16)?),
                    pid: u32_at(r, 20)?,
                })
            }
        })
        .collect()
}

/// One row of a UDP table with owning process ids: a bound socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpRow {
    pub local: SocketAddr,
    pub pid: u32,
}

/// The rows of a `MIB_UDPTABLE_OWNER_PID` (IPv4: `dwNumEntries`, then 12-byte rows of local
/// address, port and pid) or a `MIB_UDP6TABLE_OWNER_PID` (IPv6: 28-byte rows of local address,
/// scope, port and pid). A count larger than the buffer holds is cut to the rows present.
pub fn parse_udp_table(buf: &[u8], v6: bool) -> Vec<UdpRow> {
    let Some(count) = u32_at(buf, 0) else {
        return Vec::new();
    };
    let (row_len, port, pid) = if v6 { (28, 20, 24) } else { (12, 4, 8) };
    let rows = buf.get(4..).unwrap_or(&[]);
    rows.chunks_exact(row_len)
        .take(count as usize)
        .filter_map(|r| {
            let ip = if v6 {
                IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(r.get(..16)?).ok()?))
            } else {
                IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(r.get(..4)?).ok()?))
            };
            Some(UdpRow {
                local: SocketAddr::new(ip, port_at(r, port)?),
                pid: u32_at(r, pid)?,
            })
        })
        .collect()
}

/// The pid owning the live socket `local → remote` (the client's side of a connection to us:
/// its local address is our peer, its remote address our listener). Established or already
/// half-closed: a client that sent its request and shut down its side (FIN_WAIT) still owns it.
pub fn owning_pid(rows: &[TcpRow], local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    rows.iter()
        .find(|r| !NOT_LIVE.contains(&r.state) && same(r.local, local) && same(r.remote, remote))
        .map(|r| r.pid)
}

/// A binary SID in its string form (`S-1-5-21-…`); `None` unless it is well formed (revision
/// 1, at most 15 sub-authorities, exactly as long as its count says).
pub fn sid_string(b: &[u8]) -> Option<String> {
    let (&rev, &count) = (b.first()?, b.get(1)?);
    if rev != 1 || count > 15 || b.len() != 8 + 4 * count as usize {
        return None;
    }
    let auth = b[2..8].iter().fold(0u64, |a, &x| (a << 8) | u64::from(x));
    let mut s = if auth < 1 << 32 {
        format!("S-1-{auth}")
    } else {
        format!("S-1-0x{auth:012X}")
    };
    for i in 0..count as usize {
        let sub: [u8; 4] = b.get(8 + 4 * i..12 + 4 * i)?.try_into().ok()?;
        s.push_str(&format!("-{}", u32::from_le_bytes(sub)));
    }
    Some(s)
}

/// Who owns a connecting socket on Windows.
#[derive(Clone, Debug)]
pub enum Owner {
    /// The user (SID string) of the owning process's token.
    User(String),
    /// A process whose user cannot be read: another user's (access denied), the kernel's
    /// (pid 0, 4), or gone. Never equal to anyone, so it is refused.
    Unreadable { pid: u32, why: String },
}

impl PartialEq for Owner {
    fn eq(&self, other: &Owner) -> bool {
        matches!((self, other), (Owner::User(a), Owner::User(b)) if a == b)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::User(sid) => write!(f, "user {sid}"),
            Owner::Unreadable { pid, why } => {
                write!(f, "process {pid}, whose user cannot be read ({why}),")
            }
        }
    }
}

#[cfg(windows)]
pub use sys::{my_user, process_user};

#[cfg(windows)]
mod sys {
    use super::*;
    use std::ptr;
    use windows_sys::Win32::Foundation::{
        CloseHandle, ERROR_INSUFFICIENT_BUFFER, HANDLE, NO_ERROR,
    };
    use windows_sys::Win32::NetworkManagement::IpHelper::{
        GetExtendedTcpTable, GetExtendedUdpTable, TCP_TABLE_OWNER_PID_ALL, UDP_TABLE_OWNER_PID,
    };
    use windows_sys::Win32::Networking::WinSock::{AF_INET, AF_INET6};
    use windows_sys::Win32::Security::{
        GetLengthSid, GetTokenInformation, TokenUser, TOKEN_QUERY, TOKEN_USER,
    };
    use windows_sys::Win32::System::Threading::{
        GetCurrentProcess, OpenProcess, OpenProcessToken, PROCESS_QUERY_LIMITED_INFORMATION,
    };

    /// The raw TCP table of one address family, with owning pids.
    pub fn tcp_table(v6: bool) -> Result<Vec<u8>, String> {
        owner_table(v6, false)
    }

    /// The raw UDP table of one address family, with owning pids.
    pub fn udp_table(v6: bool) -> Result<Vec<u8>, String> {
        owner_table(v6, true)
    }

    /// The raw TCP or UDP table of one address family, with owning pids.
    fn owner_table(v6: bool, udp: bool) -> Result<Vec<u8>, String> {
        let name = if udp {
            "GetExtendedUdpTable"
        } else {
            "GetExtendedTcpTable"
        };
        let af = u32::from(if v6 { AF_INET6 } else { AF_INET });
        let mut size = 0u32;
        for _ in 0..5 {
            // u32 words: the table's alignment.
            let mut buf = vec![0u32; (size as usize).div_ceil(4)];
            let p = if buf.is_empty() {
                ptr::null_mut()
            } else {
                buf.as_mut_ptr().cast()
            };
            // SAFETY: `p` is null (size query) or points to `size` writable bytes.
            let rc = unsafe {
                if udp {
                    GetExtendedUdpTable(p, &mut size, 0, af, UDP_TABLE_OWNER_PID, 0)
                } else {
                    GetExtendedTcpTable(p, &mut size, 0, af, TCP_TABLE_OWNER_PID_ALL, 0)
                }
            };
            match rc {
                NO_ERROR => {
                    let mut bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
                    bytes.truncate(size as usize);
                    return Ok(bytes);
                }
                ERROR_INSUFFICIENT_BUFFER => continue,
                e => return Err(format!("{name} failed (error {e})")),
            }
        }
        Err(format!("{name}: the table kept growing"))
    }

    fn last_error() -> String {
        std::io::Error::last_os_error().to_string()
    }

    /// The user SID of a process token, as a string.
    fn token_user(token: HANDLE) -> Result<String, String> {
        let mut len = 0u32;
        // SAFETY: a size query with no buffer.
        unsafe { GetTokenInformation(token, TokenUser, ptr::null_mut(), 0, &mut len) };
        if len == 0 {
            return Err(format!("GetTokenInformation: {}", last_error()));
        }
        // u64 words: TOKEN_USER holds a pointer.
        let mut buf = vec![0u64; (len as usize).div_ceil(8)];
        // SAFETY: `buf` has at least `len` writable bytes, suitably aligned.
        let ok = unsafe {
            GetTokenInformation(token, TokenUser, buf.as_mut_ptr().cast(), len, &mut len)
        };
        if ok == 0 {
            return Err(format!("GetTokenInformation: {}", last_error()));
        }
        // SAFETY: on success the buffer starts with a TOKEN_USER whose Sid points into `buf`,
        // valid for GetLengthSid bytes while `buf` lives.
        let sid = unsafe {
            let tu = &*(buf.as_ptr() as *const TOKEN_USER);
            let n = GetLengthSid(tu.User.Sid) as usize;
            std::slice::from_raw_parts(tu.User.Sid as *const u8, n).to_vec()
        };
        sid_string(&sid).ok_or_else(|| "malformed SID in the token".to_string())
    }

    fn process_token_user(process: HANDLE) -> Result<String, String> {
        let mut token: HANDLE = ptr::null_mut();
        // SAFETY: `process` is a valid handle; `token` receives a handle we close.
        if unsafe { OpenProcessToken(process, TOKEN_QUERY, &mut token) } == 0 {
            return Err(format!("OpenProcessToken: {}", last_error()));
        }
        let r = token_user(token);
        // SAFETY: opened above, closed once.
        unsafe { CloseHandle(token) };
        r
    }

    /// The user of process `pid`.
    pub fn process_user(pid: u32) -> Result<String, String> {
        if pid == 0 || pid == 4 {
            return Err("a system process".into());
        }
        // SAFETY: plain call; a null handle is checked.
        let h = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
        if h.is_null() {
            return Err(format!("OpenProcess: {}", last_error()));
        }
        let r = process_token_user(h);
        // SAFETY: opened above, closed once.
        unsafe { CloseHandle(h) };
        r
    }

    /// The user running this agent.
    pub fn my_user() -> Option<String> {
        static ME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        ME.get_or_init(|| {
            // SAFETY: the pseudo-handle of the current process needs no closing.
            process_token_user(unsafe { GetCurrentProcess() })
                .map_err(|e| tracing::warn!("cannot read our own user: {e}"))
                .ok()
        })
        .clone()
    }
}

/// [`super::admit`] with the connecting socket's owner found through the TCP table and the
/// owning process's token. When the table cannot be read the connection is refused.
///
/// Wine (and, briefly, Windows itself) may list a socket that was just connected with process
/// 0, which owns no socket: the table is read again a few times (up to 200 ms) before the
/// owner counts as unreadable.
#[cfg(windows)]
pub async fn check_peer(
    peer: SocketAddr,
    local: SocketAddr,
    allow_remote: bool,
) -> Result<(), String> {
    let mut pid = owner_pid(peer, local)?;
    // Only process 0 is read again: a client on another host has no row at all, and must not
    // wait 200 ms for one.
    for _ in 0..10 {
        if pid != Some(0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        pid = owner_pid(peer, local)?;
    }
    super::admit(peer, allow_remote, me(), pid.map(owner))
}

/// The user of process `pid`, or why it cannot be read.
#[cfg(windows)]
pub fn owner(pid: u32) -> Owner {
    match sys::process_user(pid) {
        Ok(sid) => Owner::User(sid),
        Err(why) => Owner::Unreadable { pid, why },
    }
}

/// The user running this agent, as an [`Owner`].
#[cfg(windows)]
pub fn me() -> Option<Owner> {
    sys::my_user().map(Owner::User)
}

/// The rows of the UDP tables (IPv4 and IPv6) with their owning pids.
#[cfg(windows)]
pub fn udp_rows() -> Result<Vec<UdpRow>, String> {
    let mut rows = Vec::new();
    for v6 in [false, true] {
        rows.extend(parse_udp_table(&sys::udp_table(v6)?, v6));
    }
    Ok(rows)
}

/// The process that owns the client end (`peer`) of a connection to `local`, from the TCP
/// table; `None` when it is not listed.
#[cfg(windows)]
fn owner_pid(peer: SocketAddr, local: SocketAddr) -> Result<Option<u32>, String> {
    let mut rows = Vec::new();
    for v6 in [false, true] {
        match sys::tcp_table(v6) {
            Ok(b) => rows.extend(parse_tcp_table(&b, v6)),
            Err(e) => return Err(format!("cannot check who connected: {e}")),
        }
    }
    let pid = owning_pid(&rows, peer, local);
    if pid.is_none() {
        let near: Vec<&TcpRow> = rows
            .iter()
            .filter(|r| r.local.port() == peer.port() || r.remote.port() == peer.port())
            .collect();
        tracing::debug!(%peer, %local, rows = rows.len(), ?near, "connecting socket not in the TCP table");
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::admit;

    fn v4_row(state: u32, l: [u8; 4], lp: u16, r: [u8; 4], rp: u16, pid: u32) -> Vec<u8> {
        let mut v = state.to_ne_bytes().to_vec();
        v.extend(l);
        v.extend(u32::from(lp.swap_bytes()).to_ne_bytes());
        v.extend(r);
        v.extend(u32::from(rp.swap_bytes()).to_ne_bytes());
        v.extend(pid.to_ne_bytes());
        v
    }

    #[test]
    fn the_ipv4_owner_table_names_the_pid_of_the_connecting_socket() {
        let mut buf = 4u32.to_ne_bytes().to_vec();
        // Our side (the agent's accepted socket), the client's side, a TIME_WAIT leftover and a
        // client that already half-closed (FIN_WAIT2).
        buf.extend(v4_row(5, [127, 0, 0, 1], 1080, [127, 0, 0, 1], 50000, 100));
        buf.extend(v4_row(5, [127, 0, 0, 1], 50000, [127, 0, 0, 1], 1080, 4242));
        buf.extend(v4_row(11, [127, 0, 0, 1], 50001, [127, 0, 0, 1], 1080, 0));
        buf.extend(v4_row(7, [127, 0, 0, 1], 50002, [127, 0, 0, 1], 1080, 77));
        let rows = parse_tcp_table(&buf, false);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[1].local, "127.0.0.1:50000".parse().unwrap());
        let listen = "127.0.0.1:1080".parse().unwrap();
        assert_eq!(
            owning_pid(&rows, "127.0.0.1:50000".parse().unwrap(), listen),
            Some(4242)
        );
        // TIME_WAIT belongs to nobody: not an answer.
        assert_eq!(
            owning_pid(&rows, "127.0.0.1:50001".parse().unwrap(), listen),
            None
        );
        assert_eq!(
            owning_pid(&rows, "127.0.0.1:50002".parse().unwrap(), listen),
            Some(77)
        );
        // A count larger than the rows present is cut; a short buffer is empty.
        let mut lying = buf.clone();
        lying[..4].copy_from_slice(&100u32.to_ne_bytes());
        assert_eq!(parse_tcp_table(&lying, false).len(), 4);
        assert!(parse_tcp_table(&[1, 0], false).is_empty());
    }

    #[test]
    fn the_ipv6_owner_table_parses() {
        let mut row = Vec::new();
        row.extend(std::net::Ipv6Addr::LOCALHOST.octets());
        row.extend(0u32.to_ne_bytes());
        row.extend(u32::from(50000u16.swap_bytes()).to_ne_bytes());
        row.extend(std::net::Ipv6Addr::LOCALHOST.octets());
        row.extend(0u32.to_ne_bytes());
        row.extend(u32::from(1080u16.swap_bytes()).to_ne_bytes());
        row.extend(5u32.to_ne_bytes());
        row.extend(99u32.to_ne_bytes());
        let mut buf = 1u32.to_ne_bytes().to_vec();
        buf.extend(row);
        let rows = parse_tcp_table(&buf, true);
        assert_eq!(
            owning_pid(
                &rows,
                "[::1]:50000".parse().unwrap(),
                "[::1]:1080".parse().unwrap()
            ),
            Some(99)
        );
    }

    #[test]
    fn sids_are_decoded_and_malformed_ones_refused() {
        // S-1-5-18 (LocalSystem).
        assert_eq!(
            sid_string(&[1, 1, 0, 0, 0, 0, 0, 5, 18, 0, 0, 0]).as_deref(),
            Some("S-1-5-18")
        );
        // S-1-5-21-1-2-3-1001.
        let mut b = vec![1, 5, 0, 0, 0, 0, 0, 5];
        for s in [21u32, 1, 2, 3, 1001] {
            b.extend(s.to_le_bytes());
        }
        assert_eq!(sid_string(&b).as_deref(), Some("S-1-5-21-1-2-3-1001"));
        assert_eq!(sid_string(&b[..b.len() - 1]), None, "short");
        assert_eq!(sid_string(&[2, 0, 0, 0, 0, 0, 0, 5]), None, "revision");
        assert_eq!(sid_string(&[]), None);
    }

    #[test]
    fn another_windows_user_or_an_unreadable_owner_is_refused() {
        let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let me = || Some(Owner::User("S-1-5-21-1-2-3-1001".into()));
        assert!(admit(peer, false, me(), me()).is_ok());
        let other = admit(
            peer,
            false,
            me(),
            Some(Owner::User("S-1-5-21-1-2-3-1002".into())),
        )
        .unwrap_err();
        assert!(
            other.contains("user S-1-5-21-1-2-3-1002")
                && other.contains("serves only user S-1-5-21-1-2-3-1001"),
            "{other}"
        );
        let hidden = admit(
            peer,
            true,
            me(),
            Some(Owner::Unreadable {
                pid: 4242,
                why: "OpenProcess: Access is denied.".into(),
            }),
        )
        .unwrap_err();
        assert!(hidden.contains("process 4242"), "{hidden}");
        // Not in the table from loopback, or our own user unknown: refused.
        assert!(admit(peer, false, me(), None).is_err());
        assert!(admit(peer, false, None, me()).is_err());
    }
}
