//! HTTP `CONNECT` through a corporate proxy, with its authentication rounds.
//!
//! The handshake, as browsers and curl do it:
//!
//! 1. `CONNECT gw:443` without credentials (or with Basic at once when this proxy took Basic
//!    before: one round trip saved).
//! 2. `407` lists schemes in `Proxy-Authenticate`; [`auth::choose`] picks the strongest we can do.
//!    The 407's body is drained so that the connection can carry the next round; when the proxy
//!    closes it (or says `Connection: close`) the next round goes on a new connection.
//! 3. NTLM needs two rounds on **one** connection (negotiate → challenge → authenticate); a proxy
//!    that closes in between cannot be answered, and we say so.
//! 4. A `407` in answer to our credentials is final: domain accounts lock after a few failures,
//!    so nothing here (nor above) retries them. Digest's `stale=true` (an expired nonce, not a
//!    wrong password) is the one exception, retried once.
//!
//! Bounded everywhere: the response head is at most 16 KiB and is read without consuming a byte
//! beyond it (the TLS handshake follows on the same connection), a 407 body above 64 KiB is not
//! drained (the connection is dropped instead), and there are at most [`MAX_ROUNDS`] requests.

use crate::auth::{self, AuthOptions, Challenge, Scheme};
use crate::proxy::ProxyError;
use base64::Engine;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest response head we read.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Longest 407 body we drain to keep the connection; longer ones close it.
const MAX_DRAIN: u64 = 64 * 1024;
/// Requests per handshake: plain, Negotiate, NTLM negotiate + authenticate, a stale Digest.
pub const MAX_ROUNDS: usize = 6;

/// A parsed response head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub reason: String,
    pub challenges: Vec<Challenge>,
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// The proxy will close the connection after this response.
    pub close: bool,
}

/// Parses a complete response head (up to and including the blank line). Pure, for fuzzing.
pub fn parse_head(buf: &[u8]) -> Result<Head, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete response head".into()),
        Err(e) => return Err(format!("{e} in the response head")),
    }
    let status = resp.code.unwrap_or(0);
    if status < 100 {
        return Err(format!("status code {status:03} is not an HTTP status"));
    }
    let mut head = Head {
        status,
        reason: resp.reason.unwrap_or("").to_string(),
        challenges: Vec::new(),
        content_length: None,
        chunked: false,
        // HTTP/1.0 closes unless it says keep-alive.
        close: resp.version == Some(0),
    };
    for h in resp.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            "proxy-authenticate" => head.challenges.extend(Challenge::parse_all(&value)),
            "content-length" => {
                let n = value
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| format!("bad Content-Length `{}`", value.trim()))?;
                if head.content_length.is_some_and(|m| m != n) {
                    return Err("conflicting Content-Length headers".into());
                }
                head.content_length = Some(n);
            }
            "transfer-encoding" => {
                head.chunked |= value.to_ascii_lowercase().contains("chunked");
            }
            "connection" | "proxy-connection" => {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    head.close = true;
                } else if v.contains("keep-alive") {
                    head.close = false;
                }
            }
            _ => {}
        }
    }
    head.challenges.truncate(64);
    Ok(head)
}

/// Reads one response head byte by byte: nothing after the blank line may be consumed.
async fn read_head<S: AsyncRead + Unpin>(io: &mut S, proxy: &str) -> Result<Head, ProxyError> {
    let mut buf = Vec::with_capacity(512);
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(ProxyError::Malformed {
                proxy: proxy.into(),
                why: format!("response head longer than {MAX_RESPONSE_HEAD} bytes"),
            });
        }
        let n = io.read(&mut b).await.map_err(|source| ProxyError::Io {
            proxy: proxy.into(),
            source,
        })?;
        if n == 0 {
            return Err(ProxyError::Malformed {
                proxy: proxy.into(),
                why: if buf.is_empty() {
                    "it closed the connection without answering".into()
                } else {
                    "connection closed before a complete answer".into()
                },
            });
        }
        buf.push(b[0]);
    }
    parse_head(&buf).map_err(|why| ProxyError::Malformed {
        proxy: proxy.into(),
        why,
    })
}

/// Reads and discards a 407 body so the connection can carry the next round. `false` when the
/// connection cannot be reused (close, chunked, too long, or an error).
async fn drain<S: AsyncRead + Unpin>(io: &mut S, head: &Head) -> bool {
    if head.close {
        return false;
    }
    if head.chunked {
        return drain_chunked(io).await;
    }
    let Some(mut left) = head.content_length else {
        // Neither length nor chunked: the body runs to the close.
        return false;
    };
    if left > MAX_DRAIN {
        return false;
    }
    let mut buf = [0u8; 4096];
    while left > 0 {
        let want = (left as usize).min(buf.len());
        match io.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => left -= n as u64,
        }
    }
    true
}

/// Skips a chunked body (at most [`MAX_DRAIN`] bytes of chunks, lines of at most 1 KiB).
async fn drain_chunked<S: AsyncRead + Unpin>(io: &mut S) -> bool {
    async fn line<S: AsyncRead + Unpin>(io: &mut S) -> Option<String> {
        let mut l = Vec::new();
        let mut b = [0u8; 1];
        while !l.ends_with(b"\r\n") {
            if l.len() > 1024 || io.read(&mut b).await.ok()? == 0 {
                return None;
            }
            l.push(b[0]);
        }
        Some(String::from_utf8_lossy(&l[..l.len() - 2]).into_owned())
    }
    let mut total = 0u64;
    loop {
        let Some(size) = line(io).await else {
            return false;
        };
        let hex = size.split(';').next().unwrap_or("").trim();
        let Ok(n) = u64::from_str_radix(hex, 16) else {
            return false;
        };
        if n == 0 {
            // Trailers, then the blank line.
            loop {
                match line(io).await {
                    Some(l) if l.is_empty() => return true,
                    Some(_) => continue,
                    None => return false,
                }
            }
        }
        total += n;
        if total > MAX_DRAIN {
            return false;
        }
        let mut left = n + 2; // data and its CRLF
        let mut buf = [0u8; 4096];
        while left > 0 {
            let want = (left as usize).min(buf.len());
            match io.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => return false,
                Ok(k) => left -= k as u64,
            }
        }
    }
}

/// Where the CONNECT goes and how to authenticate.
pub struct Connect<'a> {
    /// The proxy, for messages (`http://proxy.corp:3128`).
    pub proxy: &'a str,
    /// The proxy's host name, for Negotiate's service name (`HTTP@proxy.corp`).
    pub proxy_host: &'a str,
    /// `host:port` to tunnel to.
    pub target: &'a str,
    pub auth: &'a AuthOptions,
    /// The scheme this proxy accepted last time: Basic goes out at once.
    pub remembered: Option<Scheme>,
    /// Set once a password-derived answer (Basic, Digest, NTLM authenticate) has gone out: a
    /// failure after that (a reset, a timeout, a 403) may have cost a logon attempt, and the
    /// caller must not send the password again at once.
    pub password_sent: &'a std::sync::atomic::AtomicBool,
}

/// The state of an answer in progress.
enum Sent {
    Nothing,
    Basic,
    Digest {
        stale_retried: bool,
    },
    NtlmNegotiate,
    NtlmAuthenticate,
    /// A GSSAPI/SSPI round: Negotiate, or NTLM single sign-on through SSPI (Windows).
    Gss(Scheme),
}

/// Opens a tunnel through the proxy: `dial` makes a new TCP connection to the proxy (called again
/// when the proxy closes between rounds). Returns the connection, positioned right after the
/// `200` head, and the scheme that got us through (to remember for next time).
pub async fn connect<S, E, D, Fut>(c: &Connect<'_>, mut dial: D) -> Result<(S, Option<Scheme>), E>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: FnMut() -> Fut,
    Fut: Future<Output = Result<S, E>>,
    E: From<ProxyError>,
{
    let proxy = c.proxy;
    let creds = c.auth.credentials.as_ref();
    let mut conn: Option<S> = None;
    let mut gss: Option<auth::negotiate::NegotiateContext> = None;
    let mut skip: Vec<Scheme> = Vec::new();
    let mut why_skipped: Vec<String> = Vec::new();
    let (mut header, mut sent) = match (c.remembered, creds) {
        (Some(Scheme::Basic), Some(cr)) => (Some(cr.basic()), Sent::Basic),
        _ => (None, Sent::Nothing),
    };
    for _ in 0..MAX_ROUNDS {
        let mut io = match conn.take() {
            Some(io) => io,
            None => dial().await?,
        };
        if matches!(
            sent,
            Sent::Basic | Sent::Digest { .. } | Sent::NtlmAuthenticate
        ) {
            c.password_sent
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        send(&mut io, proxy, c.target, header.as_deref()).await?;
        let head = read_head(&mut io, proxy).await?;
        if (200..300).contains(&head.status) {
            let used = match sent {
                Sent::Nothing => None,
                Sent::Basic => Some(Scheme::Basic),
                Sent::Digest { .. } => Some(Scheme::Digest),
                Sent::NtlmNegotiate | Sent::NtlmAuthenticate => Some(Scheme::Ntlm),
                Sent::Gss(s) => Some(s),
            };
            return Ok((io, used));
        }
        if head.status != 407 {
            return Err(ProxyError::Refused {
                proxy: proxy.into(),
                target: c.target.into(),
                status: head.status,
                reason: head.reason,
            }
            .into());
        }
        let reusable = drain(&mut io, &head).await;
        if reusable {
            conn = Some(io);
        }
        let rejected = |scheme: Scheme| ProxyError::AuthRejected {
            proxy: proxy.into(),
            user: creds.map(|c| c.user.clone()).unwrap_or_default(),
            scheme: scheme.name().into(),
        };
        // What we sent decides what this 407 means.
        let offers = |s: Scheme| head.challenges.iter().any(|ch| ch.known() == Some(s));
        match sent {
            // Basic sent at once (remembered) to a proxy that no longer offers it: as if
            // nothing had been sent; choose among what it offers now.
            Sent::Basic if c.remembered == Some(Scheme::Basic) && !offers(Scheme::Basic) => {
                skip.push(Scheme::Basic);
            }
            Sent::Basic => return Err(rejected(Scheme::Basic).into()),
            Sent::NtlmAuthenticate => return Err(rejected(Scheme::Ntlm).into()),
            Sent::Digest { stale_retried } => {
                let stale = head.challenges.iter().find(|ch| {
                    ch.known() == Some(Scheme::Digest)
                        && auth::digest::parse_params(&ch.rest)
                            .is_ok_and(|p| auth::digest::is_stale(&p))
                });
                match (stale, creds) {
                    (Some(ch), Some(cr)) if !stale_retried => {
                        header = Some(digest_header(ch, cr, c.target, proxy)?);
                        sent = Sent::Digest {
                            stale_retried: true,
                        };
                        continue;
                    }
                    _ => return Err(rejected(Scheme::Digest).into()),
                }
            }
            Sent::NtlmNegotiate => {
                let Some(token) = head
                    .challenges
                    .iter()
                    .find(|ch| ch.known() == Some(Scheme::Ntlm))
                    .and_then(Challenge::token)
                else {
                    return Err(ProxyError::Malformed {
                        proxy: proxy.into(),
                        why: "it answered our NTLM negotiation without an NTLM challenge".into(),
                    }
                    .into());
                };
                if !reusable {
                    return Err(ProxyError::AuthFailed {
                        proxy: proxy.into(),
                        scheme: "NTLM".into(),
                        why: format!(
                            "the connection was closed between the NTLM rounds ({}); NTLM needs one connection",
                            closed_why(&head)
                        ),
                    }
                    .into());
                }
                let Some(cr) = creds else {
                    return Err(rejected(Scheme::Ntlm).into());
                };
                header = Some(ntlm_authenticate(&token, cr, proxy)?);
                sent = Sent::NtlmAuthenticate;
                continue;
            }
            Sent::Gss(scheme) => {
                // A continuation token (SPNEGO's further legs, SSPI NTLM's challenge) goes
                // back into the same context, on the same connection.
                let token = head
                    .challenges
                    .iter()
                    .find(|ch| ch.known() == Some(scheme))
                    .and_then(Challenge::token);
                // Single sign-on failures lock nothing (no password is typed here): they are
                // reported as what they are and the next scheme is tried.
                let why = match (token, gss.take(), reusable) {
                    (Some(token), Some(ctx), true) => match gss_step(ctx, Some(token)).await {
                        Ok((ctx, Some(out))) => {
                            gss = Some(ctx);
                            header = Some(format!("{} {}", scheme.name(), b64(&out)));
                            continue;
                        }
                        Ok((_, None)) => format!("the proxy refused our {scheme} single sign-on"),
                        Err(why) => format!("{scheme}: {why}"),
                    },
                    (Some(_), _, false) => format!(
                        "{scheme}: the connection was closed between the rounds ({})",
                        closed_why(&head)
                    ),
                    (None, _, _) if scheme == Scheme::Ntlm => {
                        "NTLM: the proxy answered without an NTLM challenge".to_string()
                    }
                    _ => format!("the proxy refused our {scheme} ticket"),
                };
                why_skipped.push(why);
                skip.push(scheme);
            }
            Sent::Nothing => {}
        }
        // Choose a scheme; Negotiate may fail locally (no ticket), then try the next one.
        loop {
            let Some(scheme) = auth::choose(&head.challenges, c.auth, &skip) else {
                let mut why = if let Some(w) = &c.auth.withheld {
                    format!("our credentials are held back: {w}")
                } else if let Some(refusal) = auth::policy_refusal(&head.challenges, c.auth) {
                    refusal
                } else if let Some(refusal) = auth::wpad_refusal(&head.challenges, c.auth) {
                    refusal
                } else if creds.is_none() {
                    "no credentials configured (set a proxy user and SALLYPORT_PROXY_PASSWORD, or a credentials file)".to_string()
                } else if c.auth.no_cleartext
                    && head
                        .challenges
                        .iter()
                        .any(|ch| ch.known() == Some(Scheme::Basic))
                {
                    "Basic would send the password in clear to a proxy found by WPAD/PAC (anyone on the LAN can spoof those); name it with --proxy to allow that".to_string()
                } else {
                    "none of which sallyport can answer".to_string()
                };
                for w in &why_skipped {
                    why.push_str("; ");
                    why.push_str(w);
                }
                return Err(ProxyError::AuthRequired {
                    proxy: proxy.into(),
                    schemes: auth::offered_names(&head.challenges),
                    why,
                }
                .into());
            };
            let challenge = head
                .challenges
                .iter()
                .find(|ch| ch.known() == Some(scheme))
                .cloned()
                .unwrap_or_else(|| Challenge::parse(scheme.name()));
            match (scheme, creds) {
                (Scheme::Basic, Some(cr)) => {
                    header = Some(cr.basic());
                    sent = Sent::Basic;
                }
                (Scheme::Digest, Some(cr)) => {
                    header = Some(digest_header(&challenge, cr, c.target, proxy)?);
                    sent = Sent::Digest {
                        stale_retried: false,
                    };
                }
                (Scheme::Basic | Scheme::Digest, None) => {
                    // `choose` offers these only with credentials; be safe anyway.
                    skip.push(scheme);
                    continue;
                }
                (Scheme::Ntlm, Some(_)) => {
                    header = Some(format!("NTLM {}", b64(&auth::ntlm::negotiate_message())));
                    sent = Sent::NtlmNegotiate;
                }
                (Scheme::Ntlm, None) | (Scheme::Negotiate, _) => {
                    // Without a password NTLM is only possible as Windows single sign-on.
                    let package = if scheme == Scheme::Ntlm {
                        auth::negotiate::Package::Ntlm
                    } else if auth::kerberos_only(c.auth) {
                        // SPNEGO may fall back to NTLM (Windows): Kerberos alone for WPAD's
                        // proxies, and when the admin policy turned NTLM off.
                        auth::negotiate::Package::Kerberos
                    } else {
                        auth::negotiate::Package::Negotiate
                    };
                    match gss_start(c.proxy_host, package).await {
                        Ok((ctx, token)) => {
                            gss = Some(ctx);
                            header = Some(format!("{} {}", scheme.name(), b64(&token)));
                            sent = Sent::Gss(scheme);
                        }
                        Err(why) => {
                            tracing::debug!(proxy, %why, "{scheme} not possible");
                            skip.push(scheme);
                            why_skipped.push(format!("{scheme}: {why}"));
                            continue;
                        }
                    }
                }
            }
            break;
        }
    }
    Err(ProxyError::AuthFailed {
        proxy: proxy.into(),
        scheme: "authentication".into(),
        why: format!("no tunnel after {MAX_ROUNDS} rounds; the proxy keeps asking"),
    }
    .into())
}

/// Why a 407's connection could not carry the next round.
fn closed_why(head: &Head) -> &'static str {
    if head.close {
        "the proxy said Connection: close; a load balancer in front of it needs session persistence"
    } else if head.content_length.is_some_and(|n| n > MAX_DRAIN) {
        "its 407 body was too long to skip, so we closed it"
    } else {
        "the proxy closed it, or its 407 had no length"
    }
}

async fn send<S: AsyncWrite + Unpin>(
    io: &mut S,
    proxy: &str,
    target: &str,
    auth: Option<&str>,
) -> Result<(), ProxyError> {
    let mut req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: sallyport/{}\r\nProxy-Connection: keep-alive\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(a) = auth {
        req.push_str("Proxy-Authorization: ");
        req.push_str(a);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let ioerr = |source| ProxyError::Io {
        proxy: proxy.into(),
        source,
    };
    io.write_all(req.as_bytes()).await.map_err(ioerr)?;
    io.flush().await.map_err(ioerr)
}

fn digest_header(
    challenge: &Challenge,
    cr: &auth::Credentials,
    target: &str,
    proxy: &str,
) -> Result<String, ProxyError> {
    let fail = |why: String| ProxyError::AuthFailed {
        proxy: proxy.into(),
        scheme: "Digest".into(),
        why,
    };
    let params = auth::digest::parse_params(&challenge.rest).map_err(|e| fail(e.to_string()))?;
    let cnonce = format!("{:016x}", rand::random::<u64>());
    auth::digest::authorization(
        &params,
        &cr.user,
        cr.password.expose(),
        "CONNECT",
        target,
        1,
        &cnonce,
    )
    .map_err(|e| fail(e.to_string()))
}

fn ntlm_authenticate(
    challenge: &[u8],
    cr: &auth::Credentials,
    proxy: &str,
) -> Result<String, ProxyError> {
    let ch = auth::ntlm::ChallengeMessage::parse(challenge).map_err(|e| ProxyError::Malformed {
        proxy: proxy.into(),
        why: format!("NTLM challenge: {e}"),
    })?;
    let (domain, user) = auth::ntlm::split_domain_user(&cr.user);
    let msg = auth::ntlm::authenticate_message(
        &ch,
        user,
        domain,
        cr.password.expose(),
        "SALLYPORT",
        rand::random(),
        auth::ntlm::current_filetime(),
    )
    .map_err(|e| ProxyError::AuthFailed {
        proxy: proxy.into(),
        scheme: "NTLM".into(),
        why: e.to_string(),
    })?;
    Ok(format!("NTLM {}", b64(&msg)))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Starts a GSSAPI/SSPI context for `HTTP@proxy_host` and returns its first token. Runs off the
/// async threads: GSSAPI may ask the KDC for a service ticket.
async fn gss_start(
    proxy_host: &str,
    package: auth::negotiate::Package,
) -> Result<(auth::negotiate::NegotiateContext, Vec<u8>), String> {
    let service = format!("HTTP@{proxy_host}");
    tokio::task::spawn_blocking(move || {
        let mut ctx = auth::negotiate::NegotiateContext::new_with_package(&service, package)
            .map_err(|e| e.to_string())?;
        let token = ctx
            .step(None)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "GSSAPI produced no token".to_string())?;
        Ok((ctx, token))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Feeds the proxy's token into the context; the next token to send, if any.
async fn gss_step(
    mut ctx: auth::negotiate::NegotiateContext,
    token: Option<Vec<u8>>,
) -> Result<(auth::negotiate::NegotiateContext, Option<Vec<u8>>), String> {
    tokio::task::spawn_blocking(move || {
        let out = ctx.step(token.as_deref()).map_err(|e| e.to_string())?;
        Ok((ctx, out))
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Credentials;
    use crate::proxy::Password;

    /// Plays a proxy on an in-memory pipe: answers each request with the next canned response,
    /// and records the requests.
    async fn run(
        responses: &'static [&'static str],
        auth: AuthOptions,
        remembered: Option<Scheme>,
    ) -> (Result<Option<Scheme>, ProxyError>, Vec<String>) {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let queue = std::sync::Arc::new(std::sync::Mutex::new(responses.iter()));
        let dials = {
            let seen = seen.clone();
            move || {
                let seen = seen.clone();
                let queue = queue.clone();
                async move {
                    let (a, mut b) = tokio::io::duplex(64 * 1024);
                    tokio::spawn(async move {
                        loop {
                            let mut req = Vec::new();
                            let mut byte = [0u8; 1];
                            while !req.ends_with(b"\r\n\r\n") {
                                if b.read(&mut byte).await.unwrap_or(0) == 0 {
                                    return;
                                }
                                req.push(byte[0]);
                            }
                            seen.lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(&req).to_string());
                            let next = queue.lock().unwrap().next().copied();
                            let Some(resp) = next else { return };
                            let _ = b.write_all(resp.as_bytes()).await;
                            if resp.is_empty() || resp.contains("Connection: close") {
                                return;
                            }
                        }
                    });
                    Ok::<_, ProxyError>(a)
                }
            }
        };
        let sent = std::sync::atomic::AtomicBool::new(false);
        let c = Connect {
            proxy: "http://proxy.corp:3128",
            proxy_host: "proxy.corp",
            target: "gw.example.com:443",
            auth: &auth,
            remembered,
            password_sent: &sent,
        };
        let r = connect(&c, dials).await.map(|(_, s)| s);
        let seen = seen.lock().unwrap().clone();
        (r, seen)
    }

    fn alice() -> AuthOptions {
        AuthOptions {
            credentials: Some(Credentials::new("alice", Password::new("pw"))),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn no_auth_needed_sends_no_credentials() {
        let (r, seen) = run(
            &["HTTP/1.1 200 Connection established\r\n\r\n"],
            alice(),
            None,
        )
        .await;
        assert_eq!(r.unwrap(), None);
        assert!(!seen[0].contains("Proxy-Authorization"));
    }

    #[tokio::test]
    async fn basic_after_a_407_on_the_same_connection_and_preemptive_next_time() {
        let (r, seen) = run(
            &[
                "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 5\r\n\r\nhello",
                "HTTP/1.1 200 OK\r\n\r\n",
            ],
            alice(),
            None,
        )
        .await;
        assert_eq!(r.unwrap(), Some(Scheme::Basic));
        assert!(seen[1].contains("Proxy-Authorization: Basic YWxpY2U6cHc="));
        let (r, seen) = run(&["HTTP/1.1 200 OK\r\n\r\n"], alice(), Some(Scheme::Basic)).await;
        assert_eq!(r.unwrap(), Some(Scheme::Basic));
        assert!(seen[0].contains("Basic"), "preemptive: {seen:?}");
    }

    #[tokio::test]
    async fn a_remembered_basic_that_the_proxy_no_longer_offers_is_not_a_rejection() {
        let (r, seen) = run(
            &[
                "HTTP/1.1 407 x\r\nProxy-Authenticate: Digest realm=\"corp\", nonce=\"n1\", qop=\"auth\"\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 200 OK\r\n\r\n",
            ],
            alice(),
            Some(Scheme::Basic),
        )
        .await;
        assert_eq!(r.unwrap(), Some(Scheme::Digest));
        assert!(
            seen[1].contains("Proxy-Authorization: Digest username=\"alice\""),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn a_chunked_407_body_is_skipped_and_the_connection_reused() {
        let (r, seen) = run(
            &[
                "HTTP/1.1 407 x\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                "HTTP/1.1 200 OK\r\n\r\n",
            ],
            alice(),
            None,
        )
        .await;
        assert_eq!(r.unwrap(), Some(Scheme::Basic));
        assert_eq!(seen.len(), 2);
    }

    #[tokio::test]
    async fn a_proxy_that_closes_after_the_407_gets_the_next_round_on_a_new_connection() {
        let (r, seen) = run(
            &[
                "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nConnection: close\r\n\r\n",
                "HTTP/1.1 200 OK\r\n\r\n",
            ],
            alice(),
            None,
        )
        .await;
        assert_eq!(r.unwrap(), Some(Scheme::Basic));
        assert_eq!(seen.len(), 2);
    }

    #[tokio::test]
    async fn a_407_for_our_credentials_is_final_and_names_no_password() {
        let (r, seen) = run(
            &[
                "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 200 OK\r\n\r\n",
            ],
            alice(),
            None,
        )
        .await;
        let e = r.unwrap_err();
        assert!(e.credentials_rejected());
        let e = e.to_string();
        assert!(
            e.contains("rejected the Basic credentials of user `alice`") && !e.contains("pw "),
            "{e}"
        );
        assert_eq!(seen.len(), 2, "never a third try");
    }

    #[tokio::test]
    async fn without_credentials_the_error_names_the_schemes() {
        let (r, _) = run(
            &["HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n"],
            AuthOptions::default(),
            None,
        )
        .await;
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("answered 407, asked for NTLM, Basic, no credentials configured"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn other_statuses_and_garbage_are_clear_errors() {
        let (r, _) = run(&["HTTP/1.1 403 Forbidden\r\n\r\n"], alice(), None).await;
        assert!(r.unwrap_err().to_string().contains("HTTP 403 Forbidden"));
        let (r, _) = run(&["garbage\r\n\r\n"], alice(), None).await;
        assert!(r.unwrap_err().to_string().contains("malformed"));
        let (r, _) = run(&[""], alice(), None).await;
        assert!(r.unwrap_err().to_string().contains("closed the connection"));
    }

    #[tokio::test]
    async fn a_407_loop_ends_after_a_bounded_number_of_rounds() {
        // A proxy that keeps sending NTLM challenges without ever accepting.
        let (r, seen) = run(
            &[
                "HTTP/1.1 407 x\r\nProxy-Authenticate: Negotiate\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 407 x\r\nProxy-Authenticate: Negotiate\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 407 x\r\nProxy-Authenticate: Negotiate\r\nContent-Length: 0\r\n\r\n",
            ],
            AuthOptions {
                negotiate: true,
                ..Default::default()
            },
            None,
        )
        .await;
        assert!(r.is_err());
        assert!(seen.len() <= MAX_ROUNDS);
    }

    #[tokio::test]
    async fn an_endless_response_head_is_cut_at_16_kib() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let _ = b.write_all(b"HTTP/1.1 407 x\r\nX: ").await;
            let junk = vec![b'a'; 1024];
            while b.write_all(&junk).await.is_ok() {}
        });
        let e = read_head(&mut a, "p").await.unwrap_err().to_string();
        assert!(e.contains("longer than 16384 bytes"), "{e}");
    }

    #[test]
    fn heads_parse_with_lengths_and_connection_semantics() {
        let h = parse_head(b"HTTP/1.0 407 Auth\r\nProxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 10\r\n\r\n").unwrap();
        assert_eq!((h.status, h.content_length, h.close), (407, Some(10), true));
        let h = parse_head(b"HTTP/1.0 407 Auth\r\nProxy-Connection: keep-alive\r\n\r\n").unwrap();
        assert!(!h.close);
        let h = parse_head(b"HTTP/1.1 407 Auth\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert!(h.chunked && !h.close);
        assert!(
            parse_head(b"HTTP/1.1 407 x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .is_err()
        );
        assert!(parse_head(b"HTTP/1.1 407 x\r\nContent-Length: -1\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200").is_err());
        // Found by the connect_response fuzz target: httparse reads any three digits.
        assert!(parse_head(b"HTTP/1.1 000 x\r\n\r\n").is_err());
    }
}
