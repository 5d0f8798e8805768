//! Recognisers for the first bytes a client sends: a TLS ClientHello (its SNI and ALPN), an SSH
//! identification line, a PostgreSQL startup/SSLRequest/GSSENCRequest/CancelRequest packet and
//! an HTTP/1 request line.
//!
//! These are network parsers fed with whatever an app chose to send: every length is checked
//! against the bytes actually held, nothing allocates more than the input, and each answers as
//! early as it can. Each takes the bytes received so far and says [`Sniff::More`] (a prefix of
//! something it would accept: read more), [`Sniff::Is`] or [`Sniff::Not`] (with a short reason
//! built from fixed text and numbers only, never the peer's bytes). Fuzzed by `fuzz/`
//! (`sniff_tls`, `sniff_ssh`, `sniff_postgres`, `sniff_http`).

/// What a recogniser made of the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff<T> {
    /// Could still become one: more bytes are needed.
    More,
    /// It is one.
    Is(T),
    /// It is not one, and more bytes would not change that.
    Not(String),
}

impl<T> Sniff<T> {
    /// The same verdict about `f` of what was recognised.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Sniff<U> {
        match self {
            Sniff::More => Sniff::More,
            Sniff::Is(t) => Sniff::Is(f(t)),
            Sniff::Not(why) => Sniff::Not(why),
        }
    }
}

fn not<T>(why: impl Into<String>) -> Sniff<T> {
    Sniff::Not(why.into())
}

/// Longest TLS record payload (RFC 8446 §5.1: 2^14 bytes).
pub const TLS_MAX_RECORD: usize = 16 * 1024;

/// What a ClientHello says about where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// The `server_name` extension's host name (RFC 6066), as sent (lossy UTF-8, not validated).
    pub sni: Option<String>,
    /// The ALPN protocol names offered (RFC 7301), lossy UTF-8.
    pub alpn: Vec<String>,
}

/// A cursor that never reads past its slice: every read says `None` instead.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| ((b[0] as usize) << 16) | ((b[1] as usize) << 8) | b[2] as usize)
    }
    /// A vector with a `len_bytes`-byte length prefix.
    fn vec(&mut self, len_bytes: usize) -> Option<&'a [u8]> {
        let n = match len_bytes {
            1 => self.u8()?,
            2 => self.u16()?,
            _ => self.u24()?,
        };
        self.take(n)
    }
}

/// A TLS ClientHello (RFC 8446 §4.1.2, also TLS 1.0–1.2), possibly split over several handshake
/// records. `More` while the records so far hold a prefix of one.
pub fn tls_client_hello(buf: &[u8]) -> Sniff<ClientHello> {
    // Gather the handshake bytes from the records received so far (the last may be partial),
    // until they hold the whole ClientHello: what follows it (a ChangeCipherSpec, early data)
    // is not looked at.
    let mut hs: Vec<u8> = Vec::new();
    let mut rest = buf;
    let hello_len = |hs: &[u8]| {
        (hs.len() >= 4).then(|| ((hs[1] as usize) << 16) | ((hs[2] as usize) << 8) | hs[3] as usize)
    };
    loop {
        if let Some(&kind) = hs.first() {
            if kind != 1 {
                return not(format!("TLS handshake type {kind} is not a ClientHello"));
            }
        }
        if hello_len(&hs).is_some_and(|len| hs.len() >= 4 + len) {
            break;
        }
        if rest.is_empty() {
            return Sniff::More;
        }
        if rest[0] != 0x16 {
            return not(if hs.is_empty() {
                "not a TLS handshake record".to_string()
            } else {
                format!("TLS record type {} before the ClientHello ended", rest[0])
            });
        }
        if rest.len() >= 2 && rest[1] != 0x03 {
            return not("not a TLS record version (3.x)");
        }
        if rest.len() < 5 {
            return Sniff::More;
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 || len > TLS_MAX_RECORD {
            return not(format!(
                "TLS record length {len} (must be 1 to {TLS_MAX_RECORD})"
            ));
        }
        let have = (rest.len() - 5).min(len);
        hs.extend_from_slice(&rest[5..5 + have]);
        rest = &rest[5 + have..];
    }
    let len = hello_len(&hs).unwrap_or(0);
    match parse_client_hello(&hs[4..4 + len]) {
        Some(ch) => Sniff::Is(ch),
        None => not("malformed TLS ClientHello"),
    }
}

/// The ClientHello body; `None` if any length points outside it.
fn parse_client_hello(body: &[u8]) -> Option<ClientHello> {
    let mut r = Reader { buf: body };
    let version = r.take(2)?;
    if version[0] != 3 {
        return None;
    }
    r.take(32)?; // random
    let session_id = r.vec(1)?;
    if session_id.len() > 32 {
        return None;
    }
    let suites = r.vec(2)?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return None;
    }
    if r.vec(1)?.is_empty() {
        return None; // compression methods: at least "null"
    }
    let mut hello = ClientHello::default();
    if r.buf.is_empty() {
        return Some(hello); // no extensions (SSL 3.0 style)
    }
    let mut exts = Reader { buf: r.vec(2)? };
    while !exts.buf.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec(2)?;
        let mut d = Reader { buf: data };
        match kind {
            0 => {
                let mut list = Reader { buf: d.vec(2)? };
                while !list.buf.is_empty() {
                    let name_type = list.u8()?;
                    let name = list.vec(2)?;
                    if name_type == 0 && hello.sni.is_none() {
                        hello.sni = Some(String::from_utf8_lossy(name).into_owned());
                    }
                }
            }
            16 => {
                let mut list = Reader { buf: d.vec(2)? };
                while !list.buf.is_empty() {
                    let proto = list.vec(1)?;
                    hello.alpn.push(String::from_utf8_lossy(proto).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

/// Longest SSH identification line, CR LF included (RFC 4253 §4.2).
pub const SSH_MAX_IDENT: usize = 255;

/// The client's SSH identification line (RFC 4253 §4.2): `SSH-2.0-softwareversion[ comments]`
/// and CR LF (a bare LF is accepted, as OpenSSH does). Only the client's line is checked: the
/// RFC lets only the server send other lines before it. Returns the line without its end.
pub fn ssh_ident(buf: &[u8]) -> Sniff<String> {
    const PREFIX: &[u8] = b"SSH-2.0-";
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        return not(if buf.starts_with(b"SSH-") {
            "SSH identification is not SSH-2.0"
        } else {
            "not an SSH identification line"
        });
    }
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() >= SSH_MAX_IDENT {
            return not(format!(
                "SSH identification line longer than {SSH_MAX_IDENT} bytes"
            ));
        }
        // Everything so far must be printable for it to become a line.
        return match buf
            .iter()
            .position(|&b| !(b' '..=b'~').contains(&b) && b != b'\r')
        {
            Some(_) => not("SSH identification line holds a control or non-ASCII byte"),
            None => Sniff::More,
        };
    };
    if end + 1 > SSH_MAX_IDENT {
        return not(format!(
            "SSH identification line longer than {SSH_MAX_IDENT} bytes"
        ));
    }
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() == PREFIX.len() {
        return not("SSH identification line without a software version");
    }
    if line.iter().any(|&b| !(b' '..=b'~').contains(&b)) {
        return not("SSH identification line holds a control or non-ASCII byte");
    }
    Sniff::Is(String::from_utf8_lossy(line).into_owned())
}

/// Longest PostgreSQL startup packet the server accepts (`MAX_STARTUP_PACKET_LENGTH`).
pub const PG_MAX_STARTUP: usize = 10_000;

/// The first packet of a PostgreSQL client (protocol 3, "Start-up" in the PostgreSQL manual,
/// chapter "Frontend/Backend Protocol").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgFirst {
    /// `SSLRequest`: the client waits for the server's `S`/`N` and then speaks TLS (or sends
    /// a startup message): nothing after these 8 bytes is checked.
    SslRequest,
    /// `GSSENCRequest`: as `SslRequest`, for GSSAPI encryption.
    GssEncRequest,
    /// `CancelRequest` (a process id and a secret key; nothing follows).
    CancelRequest,
    /// `StartupMessage` for protocol 3.minor, with well-formed name/value pairs.
    Startup { minor: u16 },
}

/// A PostgreSQL client's first packet.
pub fn postgres_first(buf: &[u8]) -> Sniff<PgFirst> {
    // The length comes first, at most PG_MAX_STARTUP (0x2710): "GET ", a ClientHello or
    // "SSH-" fail on their first byte.
    let max = (PG_MAX_STARTUP as u32).to_be_bytes();
    for (i, &b) in buf.iter().take(3).enumerate() {
        if b > max[i] || (i < 2 && b != 0) {
            return not("not a PostgreSQL startup packet (length out of range)");
        }
    }
    if buf.len() < 8 {
        return Sniff::More;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if !(8..=PG_MAX_STARTUP).contains(&len) {
        return not(format!(
            "PostgreSQL startup packet length {len} (must be 8 to {PG_MAX_STARTUP})"
        ));
    }
    match code {
        80877103 | 80877104 if len != 8 => not(format!(
            "PostgreSQL SSL/GSS request of length {len} (must be 8)"
        )),
        80877103 => Sniff::Is(PgFirst::SslRequest),
        80877104 => Sniff::Is(PgFirst::GssEncRequest),
        // A process id and a key: 4 bytes before protocol 3.2, up to 256 since.
        80877102 if !(16..=12 + 256).contains(&len) => {
            not(format!("PostgreSQL cancel request of length {len}"))
        }
        80877102 if buf.len() < len => Sniff::More,
        80877102 => Sniff::Is(PgFirst::CancelRequest),
        c if c >> 16 == 3 => {
            if buf.len() < len {
                return Sniff::More;
            }
            startup_params(&buf[8..len]).map(|()| PgFirst::Startup {
                minor: (c & 0xffff) as u16,
            })
        }
        c => not(format!(
            "PostgreSQL protocol {}.{} (only 3.x is spoken)",
            c >> 16,
            c & 0xffff
        )),
    }
}

/// The startup message's parameters: NUL-terminated name and value pairs, then a lone NUL
/// ending exactly at the packet's end.
fn startup_params(mut body: &[u8]) -> Sniff<()> {
    loop {
        let Some(end) = body.iter().position(|&b| b == 0) else {
            return not("PostgreSQL startup parameters not NUL-terminated");
        };
        if end == 0 {
            return if body.len() == 1 {
                Sniff::Is(())
            } else {
                not("PostgreSQL startup packet has bytes after its parameters")
            };
        }
        body = &body[end + 1..];
        let Some(value_end) = body.iter().position(|&b| b == 0) else {
            return not("PostgreSQL startup parameter without a value");
        };
        body = &body[value_end + 1..];
    }
}

/// An HTTP/1 request line (RFC 9112 §3): what was recognised, never the target itself (it may
/// carry a secret in its query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLine {
    pub method: String,
    /// `1.0`, `1.1`, or `2.0` for the HTTP/2 prior-knowledge preface (`PRI * HTTP/2.0`).
    pub version: String,
    pub target_len: usize,
}

/// Longest HTTP method accepted.
const HTTP_MAX_METHOD: usize = 32;

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The first HTTP/1 request line: `METHOD SP target SP HTTP/1.x` and CR LF (or a bare LF).
/// Empty lines before it are skipped (RFC 9112 §2.2). `More` while it could still become one;
/// how long it may grow is the caller's cap.
pub fn http_request_line(buf: &[u8]) -> Sniff<RequestLine> {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    if start > 4 {
        return not("more than two empty lines before an HTTP request line");
    }
    let line = &buf[start..];
    let end = line.iter().position(|&b| b == b'\n');
    // Without the LF yet, a last CR may be the start of the line's end.
    let text = match end {
        Some(e) => &line[..e],
        None => line,
    };
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    // METHOD
    let m = text.iter().position(|&b| b == b' ').unwrap_or(text.len());
    if text[..m].iter().any(|&b| !is_tchar(b)) {
        return not("not an HTTP request line (method is not a token)");
    }
    if m > HTTP_MAX_METHOD {
        return not(format!("HTTP method longer than {HTTP_MAX_METHOD} bytes"));
    }
    if m == text.len() {
        return match end {
            None => Sniff::More,
            Some(_) => not("not an HTTP request line (no target)"),
        };
    }
    if m == 0 {
        return not("not an HTTP request line (no method)");
    }
    // target: visible ASCII or obs-text, no controls
    let after = &text[m + 1..];
    let t = after.iter().position(|&b| b == b' ').unwrap_or(after.len());
    if after[..t].iter().any(|&b| b < 0x21 || b == 0x7f) {
        return not("HTTP request target holds a control byte");
    }
    if t == after.len() {
        return match end {
            None => Sniff::More,
            Some(_) => not("HTTP request line without a version (HTTP/0.9 is not spoken)"),
        };
    }
    if t == 0 {
        return not("HTTP request line with an empty target");
    }
    let version = &after[t + 1..];
    let wanted: &[&[u8]] = &[b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0"];
    let fits = |w: &[u8]| w.starts_with(version);
    match end {
        None if wanted.iter().any(|w| fits(w)) => Sniff::More,
        None => not("HTTP request line with an unknown version"),
        Some(_) => {
            let method = String::from_utf8_lossy(&text[..m]).into_owned();
            let v = match version {
                b"HTTP/1.1" => "1.1",
                b"HTTP/1.0" => "1.0",
                b"HTTP/2.0" if method == "PRI" && &after[..t] == b"*" => "2.0",
                _ => return not("HTTP request line with an unknown version"),
            };
            Sniff::Is(RequestLine {
                method,
                version: v.to_string(),
                target_len: t,
            })
        }
    }
}

/// Up to `n` bytes of `buf` as safe text for a log: printable ASCII as is (but `'` and `\`
/// escaped), anything else as `\xNN`.
pub fn preview(buf: &[u8], n: usize) -> String {
    let mut s = String::new();
    for &b in buf.iter().take(n) {
        match b {
            b'\'' | b'\\' => {
                s.push('\\');
                s.push(b as char)
            }
            b' '..=b'~' => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

#[cfg(test)]
/// A ClientHello as TLS records: `sni`, `alpn`, split into records of `record` bytes.
pub(crate) fn client_hello(sni: Option<&str>, alpn: &[&str], record: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    if let Some(name) = sni {
        let n = name.len();
        exts.extend_from_slice(&[0, 0]);
        exts.extend_from_slice(&((n + 5) as u16).to_be_bytes());
        exts.extend_from_slice(&((n + 3) as u16).to_be_bytes());
        exts.push(0);
        exts.extend_from_slice(&(n as u16).to_be_bytes());
        exts.extend_from_slice(name.as_bytes());
    }
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for p in alpn {
            list.push(p.len() as u8);
            list.extend_from_slice(p.as_bytes());
        }
        exts.extend_from_slice(&[0, 16]);
        exts.extend_from_slice(&((list.len() + 2) as u16).to_be_bytes());
        exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
        exts.extend_from_slice(&list);
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut out = Vec::new();
    for chunk in hs.chunks(record) {
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every strict prefix of an accepted input says `More` (so nothing is refused early), and
    /// no prefix of anything panics.
    fn prefixes_wait<T: std::fmt::Debug>(input: &[u8], f: fn(&[u8]) -> Sniff<T>) {
        for i in 0..input.len() {
            assert!(
                matches!(f(&input[..i]), Sniff::More),
                "prefix of {i} bytes: {:?}",
                f(&input[..i])
            );
        }
    }

    #[test]
    fn a_client_hello_split_over_records_and_reads_gives_its_sni() {
        for record in [5, 100, 16384] {
            let ch = client_hello(Some("Wiki.Internal"), &["h2", "http/1.1"], record);
            prefixes_wait(&ch, tls_client_hello);
            assert_eq!(
                tls_client_hello(&ch),
                Sniff::Is(ClientHello {
                    sni: Some("Wiki.Internal".into()),
                    alpn: vec!["h2".into(), "http/1.1".into()],
                })
            );
        }
        let none = client_hello(None, &[], 16384);
        assert_eq!(tls_client_hello(&none), Sniff::Is(ClientHello::default()));
    }

    #[test]
    fn a_lying_tls_length_is_never_trusted() {
        let mut ch = client_hello(Some("a.internal"), &[], 16384);
        // SNI entry length pointing past the extension: malformed, no panic.
        let at = ch.windows(10).position(|w| w == b"a.internal").unwrap();
        ch[at - 2] = 0xff;
        ch[at - 1] = 0xff;
        assert!(matches!(tls_client_hello(&ch), Sniff::Not(_)));
        // A record longer than TLS allows.
        assert!(matches!(
            tls_client_hello(&[0x16, 3, 1, 0x40, 0x01]),
            Sniff::Not(_)
        ));
        // A handshake length of 16 MiB waits for more (the caller's cap ends it).
        assert_eq!(
            tls_client_hello(&[0x16, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]),
            Sniff::More
        );
        // Not TLS at all, on the first byte.
        assert!(matches!(tls_client_hello(b"G"), Sniff::Not(_)));
        assert!(matches!(tls_client_hello(b"\x16\x04"), Sniff::Not(_)));
        // An alert record after a partial ClientHello.
        let mut two = client_hello(Some("a.internal"), &[], 20);
        two.truncate(25);
        two.extend_from_slice(&[0x15, 3, 3, 0, 2, 2, 40]);
        assert!(matches!(tls_client_hello(&two), Sniff::Not(_)));
    }

    #[test]
    fn ssh_identification_lines() {
        let line = b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n";
        prefixes_wait(line, ssh_ident);
        assert_eq!(
            ssh_ident(line),
            Sniff::Is("SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13".into())
        );
        // Followed by the key exchange in the same read.
        let mut more = line.to_vec();
        more.extend_from_slice(&[0, 0, 5, 0xdc, 4, 20]);
        assert!(matches!(ssh_ident(&more), Sniff::Is(_)));
        assert_eq!(ssh_ident(b"SSH-2.0-x\n"), Sniff::Is("SSH-2.0-x".into()));
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"SSH-1.5-old\r\n",
            b"SSH-2.0-\r\n",
            b"SSH-2.0-a\x00b\r\n",
            b"\x16\x03\x01",
        ] {
            assert!(matches!(ssh_ident(bad), Sniff::Not(_)), "{bad:?}");
        }
        // Endless line: refused at the RFC's limit, not buffered on.
        let mut long = b"SSH-2.0-".to_vec();
        long.resize(SSH_MAX_IDENT, b'a');
        assert!(matches!(ssh_ident(&long), Sniff::Not(_)));
        assert_eq!(ssh_ident(&long[..SSH_MAX_IDENT - 1]), Sniff::More);
    }

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = vec![0, 3, 0, 0];
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn postgres_first_packets() {
        let s = startup(&[("user", "alice"), ("database", "app")]);
        prefixes_wait(&s, postgres_first);
        assert_eq!(postgres_first(&s), Sniff::Is(PgFirst::Startup { minor: 0 }));
        let ssl = [0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f];
        prefixes_wait(&ssl, postgres_first);
        assert_eq!(postgres_first(&ssl), Sniff::Is(PgFirst::SslRequest));
        let gss = [0, 0, 0, 8, 4, 0xd2, 0x16, 0x30];
        assert_eq!(postgres_first(&gss), Sniff::Is(PgFirst::GssEncRequest));
        let mut cancel = vec![0, 0, 0, 16, 4, 0xd2, 0x16, 0x2e];
        cancel.extend_from_slice(&[1; 8]);
        prefixes_wait(&cancel, postgres_first);
        assert_eq!(postgres_first(&cancel), Sniff::Is(PgFirst::CancelRequest));
        // Hostile lengths and bodies.
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x16\x03\x01\x02\x00",
            &[0, 0, 0, 4, 0, 3, 0, 0],
            &[0, 0, 0x27, 0x11, 0, 3, 0, 0],
            &[0, 0, 0, 12, 4, 0xd2, 0x16, 0x2f, 0, 0, 0, 0],
            &[0, 0, 0, 8, 0, 2, 0, 0],
            &[0, 0, 0, 10, 0, 3, 0, 0, b'x', 0],
            &[0, 0, 0, 11, 0, 3, 0, 0, 0, 0, 0],
        ] {
            assert!(matches!(postgres_first(bad), Sniff::Not(_)), "{bad:?}");
        }
        // A declared length not yet received waits (within the 10 000-byte limit).
        assert_eq!(postgres_first(&[0, 0, 0x27, 0x10, 0, 3, 0, 0]), Sniff::More);
    }

    #[test]
    fn http_request_lines() {
        let line = b"GET /a?token=secret HTTP/1.1\r\nHost: x\r\n\r\n";
        prefixes_wait(&line[..30], http_request_line);
        assert_eq!(
            http_request_line(line),
            Sniff::Is(RequestLine {
                method: "GET".into(),
                version: "1.1".into(),
                target_len: 15,
            })
        );
        assert!(matches!(
            http_request_line(b"\r\nPOST http://x/ HTTP/1.0\n"),
            Sniff::Is(_)
        ));
        assert!(matches!(
            http_request_line(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Sniff::Is(_)
        ));
        for bad in [
            &b"\x16\x03\x01"[..],
            b"SSH-2.0-OpenSSH\r\n",
            b"GET /\r\n",
            b"GET  HTTP/1.1\r\n",
            b"GET / HTTP/3.0\r\n",
            b"GET / FTP/1.0",
            b"GET /\x01 HTTP/1.1\r\n",
            b"GET / HTTP/2.0\r\n",
            b"\r\n\r\n\r\nGET / HTTP/1.1\r\n",
        ] {
            assert!(matches!(http_request_line(bad), Sniff::Not(_)), "{bad:?}");
        }
        let long_method = [b'A'; 40];
        assert!(matches!(http_request_line(&long_method), Sniff::Not(_)));
    }

    #[test]
    fn previews_are_short_and_escaped() {
        assert_eq!(preview(b"GET / HTTP/1.1", 5), "GET /");
        assert_eq!(preview(b"\x16\x03'\\\n", 8), "\\x16\\x03\\'\\\\\\x0a");
    }
}
