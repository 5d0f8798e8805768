//! Finding the way out: the candidates, probed in order with staggered starts, and the one that
//! worked remembered per network.
//!
//! **Candidates** ([`Way::discover`]), in this order (`docs/egress.md`):
//!
//! 1. `--proxy` when it is not `auto`: that one only (an admin's explicit choice is obeyed, as
//!    curl does);
//! 2. `--pac URL|FILE`: the PAC file's answer for the gateway URL, a failover list (a PAC that
//!    cannot be fetched or evaluated is reported and the automatic chain follows, as browsers do);
//! 3. the environment (`https_proxy`, `HTTPS_PROXY`, `all_proxy`, `ALL_PROXY`, with `NO_PROXY`);
//! 4. the OS settings ([`crate::system`]): manual proxies, their PAC URL, or auto-detect;
//! 5. WPAD by DNS: `http://wpad.<suffix>/wpad.dat` for each DNS search suffix, never above the
//!    organisation's domain ([`crate::pac::wpad_urls`]);
//! 6. direct.
//!
//! **Probing** ([`Way::connect`]): happy-eyeballs style, the first candidate starts at once and
//! each next one [`STAGGER`] later (or at once when the previous one failed); the first to
//! complete a verified gateway handshake wins and the others are dropped. A candidate whose
//! proxy rejected our credentials is never tried again (accounts lock), only reported.
//!
//! **Memory**: the winner is remembered per network ([`crate::network::key`]); the next connect
//! on the same network tries it alone first, and probes everything again only when it fails.

use crate::auth::Scheme;
use crate::{dial_via, pac, proxy, system, Egress, EgressError, GatewayStream, GatewayUrl, Proxy};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Delay between the starts of two candidates.
pub const STAGGER: Duration = Duration::from_millis(250);
/// How long a PAC fetch (or a WPAD try) may take.
pub const PAC_TIMEOUT: Duration = Duration::from_secs(3);
/// How long all WPAD tries together may take (several search domains, each walked up, must not
/// hold back the direct candidate for long).
pub const WPAD_BUDGET: Duration = Duration::from_secs(6);

/// One way out, and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub proxy: Proxy,
    /// e.g. `--proxy`, `environment HTTPS_PROXY`, `PAC http://wpad.corp/wpad.dat`, `direct`.
    pub source: String,
    pub origin: Origin,
}

/// Where a candidate came from, which decides what its proxy may be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Named by the user or IT: `--proxy`, `--pac`, the environment, OS manual settings (and
    /// direct). Only these get a password in clear (Basic, SOCKS5).
    Named,
    /// From a PAC URL in the OS settings: no password in clear, challenge-response as usual.
    OsPac,
    /// Found by WPAD (DNS, or the OS's auto-detect), which anyone on the LAN can answer: no
    /// password in clear, and no NTLM, Digest or NTLM-capable Negotiate unless the admin policy
    /// allows it ([`Egress::wpad_credentials`]).
    Wpad,
}

impl Candidate {
    /// Named by the user or IT, not found on the network.
    pub fn trusted(&self) -> bool {
        self.origin == Origin::Named
    }
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (from {})", self.proxy, self.source)
    }
}

/// What the discovery found: the candidates in order, and notes on what it looked at
/// (`PAC at http://wpad.corp/wpad.dat: timeout after 3s`).
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    pub candidates: Vec<Candidate>,
    pub notes: Vec<String>,
}

/// The result of trying one candidate.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub candidate: Candidate,
    /// `Ok` with a description of the gateway's certificate when TLS was used, or why it failed.
    pub outcome: Result<String, String>,
    pub elapsed: Duration,
    /// The way out works but the gateway refused the credential (an authenticated refusal,
    /// see [`GatewayReached::refused_credential`]); `outcome` is then `Err` with its text.
    pub refused: bool,
}

/// Errors of the gateway handshake run on a fresh connection (the WebSocket upgrade and the
/// tunnel hello): did they come from the gateway itself? Then the way out works, and the error
/// (a bad token, too many sessions) is the gateway's answer, not the path's.
pub trait GatewayReached {
    fn reached_gateway(&self) -> bool;
    /// The gateway itself (authenticated, not a forgeable HTTP status) refused the credential:
    /// the way out works, the token does not.
    fn refused_credential(&self) -> bool {
        false
    }
}

/// Why no session could be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError<E: fmt::Display + fmt::Debug> {
    #[error("no way out to the gateway worked: {summary}")]
    NoWay {
        attempts: Vec<Attempt>,
        summary: String,
    },
    /// The path works; the gateway refused (its error says why).
    #[error("{0}")]
    Gateway(E),
}

impl<E: fmt::Display + fmt::Debug> ProbeError<E> {
    /// True when every failed path failed on rejected proxy credentials: nothing will work
    /// until the configuration changes.
    pub fn only_rejected_credentials(&self) -> bool {
        match self {
            ProbeError::NoWay { attempts, .. } => {
                !attempts.is_empty()
                    && attempts.iter().all(|a| {
                        a.outcome.as_ref().err().is_some_and(|e| {
                            e.contains("rejected the") && e.contains("credentials")
                                || e.contains("our credentials are held back")
                                    && e.contains("rejected them")
                        })
                    })
            }
            ProbeError::Gateway(_) => false,
        }
    }
}

#[derive(Default)]
struct Memory {
    /// Network key → the way out that worked there.
    chosen: HashMap<String, Candidate>,
    /// Proxy → the scheme it accepted (Basic is then sent at once).
    schemes: HashMap<String, Scheme>,
    /// Proxy → why its credentials were rejected. Never retried (until the credentials file
    /// changes).
    rejected: HashMap<String, String>,
    /// Our credentials are held back from every proxy: after a 407 on them (until restart or a
    /// change of the credentials file: `None`), or after they went out without a clear answer
    /// (until the instant).
    held: Option<(Option<Instant>, String)>,
}

/// How long credentials that got no clear answer are held back.
/// (Directories commonly lock after 5 failures in 30 minutes: this allows 3.)
pub const UNCONFIRMED_HOLD: Duration = Duration::from_secs(10 * 60);

/// The way out: discovery, probing and memory. One per agent/connector, shared by its sessions.
pub struct Way {
    egress: Egress,
    memory: Mutex<Memory>,
    /// The credentials in use, and the stamp of the credentials file they were read from
    /// ([`Way::refresh_credentials`]).
    credentials: Mutex<(Option<crate::Credentials>, Option<crate::FileStamp>)>,
    stagger: Duration,
    /// One probe at a time: sessions that connect together (a connector's N sessions) wait
    /// for the first one's answer instead of each sending the password.
    probing: tokio::sync::Mutex<()>,
}

enum Outcome<T, E> {
    Won(T, String),
    Reached(E),
    Failed(String),
}

impl Way {
    pub fn new(egress: Egress) -> Arc<Way> {
        let stamp = egress.credentials_file.as_ref().and_then(|f| f.stamp());
        Arc::new(Way {
            credentials: Mutex::new((egress.auth.credentials.clone(), stamp)),
            egress,
            memory: Mutex::new(Memory::default()),
            stagger: STAGGER,
            probing: tokio::sync::Mutex::new(()),
        })
    }

    pub fn egress(&self) -> &Egress {
        &self.egress
    }

    /// Re-reads the proxy credentials file when it changed since it was last read (a corrected
    /// password): the new credentials are used from the next attempt on, and what an earlier
    /// password earned (a 407 that parks every way out, a hold after no clear answer) is
    /// forgotten. True when the file changed. Errors in the new file are logged (never the
    /// password) and leave no credentials until it is fixed.
    pub fn refresh_credentials(&self) -> bool {
        let Some(file) = &self.egress.credentials_file else {
            return false;
        };
        let stamp = file.stamp();
        let Ok(mut cur) = self.credentials.lock() else {
            return false;
        };
        if stamp == cur.1 {
            return false;
        }
        cur.1 = stamp;
        cur.0 = match file.read() {
            Ok(c) => {
                tracing::info!(file = %file.path.display(), user = %c.user, "the proxy credentials file changed; its credentials are used from the next attempt on");
                Some(c)
            }
            Err(e) => {
                tracing::warn!("{e}; no proxy password until the file is fixed");
                None
            }
        };
        drop(cur);
        if let Ok(mut m) = self.memory.lock() {
            m.rejected.clear();
            m.held = None;
            m.schemes.clear();
        }
        true
    }

    /// Returns when the credentials file changes, or a Kerberos ticket cache appears or changes
    /// (`kinit`; [`crate::auth::negotiate::ccache_file`]), polled every second; never when
    /// there is neither to watch. Ends the wait of a way out parked after a 407 for our
    /// credentials: a corrected password, or a ticket that needs no password (the rejected one
    /// stays held back).
    pub async fn credentials_changed(&self) {
        let ccache = self
            .egress
            .auth
            .negotiate
            .then(crate::auth::negotiate::ccache_file)
            .flatten();
        if self.egress.credentials_file.is_none() && ccache.is_none() {
            return std::future::pending().await;
        }
        let mut ticket = ccache.as_deref().and_then(crate::FileStamp::of);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if self.refresh_credentials() {
                return;
            }
            if let Some(path) = &ccache {
                let now = crate::FileStamp::of(path);
                if now != ticket && now.is_some() {
                    tracing::info!(cache = %path.display(), "the Kerberos ticket cache changed; trying again with the ticket");
                    return;
                }
                ticket = now;
            }
        }
    }

    /// The way that worked last on the current network, if any.
    pub fn remembered(&self) -> Option<Candidate> {
        let key = crate::network::key();
        self.memory.lock().ok()?.chosen.get(&key).cloned()
    }

    /// Lists the candidates for reaching `url`, in the order they are tried.
    pub async fn discover(&self, url: &GatewayUrl) -> Discovery {
        let mut d = Discovery::default();
        let policy = &self.egress.auth.policy;
        d.notes.extend(policy.describe());
        if let Some(p) = &self.egress.proxy {
            d.candidates.push(Candidate {
                proxy: p.clone(),
                source: "--proxy".into(),
                origin: Origin::Named,
            });
            return d;
        }
        if let Some(pac) = &self.egress.pac {
            match pac_candidates(
                pac,
                url,
                &format!("--pac {pac}"),
                Origin::Named,
                PAC_TIMEOUT,
            )
            .await
            {
                Ok(list) => {
                    d.notes.push(format!("PAC {pac}: {}", names(&list)));
                    d.candidates = list;
                    return d;
                }
                Err(e) => d
                    .notes
                    .push(format!("{e}; using the automatic chain instead")),
            }
        }
        // The environment, with curl's precedence.
        let var = ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
            .into_iter()
            .find(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()));
        match proxy::from_env(|k| std::env::var(k).ok(), &url.host) {
            Some(Ok(p)) => d.candidates.push(Candidate {
                proxy: p,
                source: format!("environment {}", var.unwrap_or("HTTPS_PROXY")),
                origin: Origin::Named,
            }),
            Some(Err(e)) => d.notes.push(format!("environment: {e}")),
            None if var.is_some() => d
                .notes
                .push(format!("environment: NO_PROXY exempts {}", url.host)),
            None => {}
        }
        let mut wpad_done = false;
        if self.egress.system {
            for sp in tokio::task::spawn_blocking(system::read)
                .await
                .unwrap_or_default()
            {
                match sp.mode {
                    system::SystemMode::Direct => {
                        d.notes.push(format!("{}: no proxy", sp.source));
                    }
                    system::SystemMode::Manual {
                        https,
                        socks,
                        no_proxy,
                    } => {
                        if proxy::no_proxy_matches(&no_proxy.join(","), &url.host) {
                            d.notes
                                .push(format!("{}: its exceptions exempt {}", sp.source, url.host));
                            continue;
                        }
                        for p in [https, socks].into_iter().flatten() {
                            d.candidates.push(Candidate {
                                proxy: p,
                                source: sp.source.clone(),
                                origin: Origin::Named,
                            });
                        }
                    }
                    system::SystemMode::Pac(loc) => {
                        let source = format!("{} PAC {loc}", sp.source);
                        match pac_candidates(&loc, url, &source, Origin::OsPac, PAC_TIMEOUT).await {
                            Ok(list) => d.candidates.extend(list),
                            Err(e) => d.notes.push(format!("{}: {e}", sp.source)),
                        }
                    }
                    system::SystemMode::Wpad => {
                        wpad_done = true;
                        match &policy.wpad {
                            Some(why) => d.notes.push(format!(
                                "{}: automatic detection (WPAD) not used: turned off by {why}",
                                sp.source
                            )),
                            None => self.wpad(url, &mut d).await,
                        }
                    }
                }
            }
        }
        if self.egress.wpad && !wpad_done {
            match &policy.wpad {
                Some(why) => d
                    .notes
                    .push(format!("WPAD: not looked up: turned off by {why}")),
                None => self.wpad(url, &mut d).await,
            }
        }
        d.candidates.push(Candidate {
            proxy: Proxy::Direct,
            source: "direct".into(),
            origin: Origin::Named,
        });
        // The first mention of a proxy wins.
        let mut seen = Vec::new();
        d.candidates.retain(|c| {
            let dup = seen.contains(&c.proxy);
            seen.push(c.proxy.clone());
            !dup
        });
        d
    }

    async fn wpad(&self, url: &GatewayUrl, d: &mut Discovery) {
        let suffixes = pac::dns_suffixes();
        if suffixes.is_empty() {
            d.notes
                .push("WPAD: no DNS search domain, nothing to look up".into());
        }
        let deadline = Instant::now() + WPAD_BUDGET;
        for suffix in suffixes {
            for loc in pac::wpad_urls(&suffix) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    d.notes.push(format!(
                        "WPAD: {loc} not tried, the {WPAD_BUDGET:?} budget for WPAD is used up"
                    ));
                    continue;
                }
                let source = format!("WPAD {loc}");
                match pac_candidates(&loc, url, &source, Origin::Wpad, left.min(PAC_TIMEOUT)).await
                {
                    Ok(list) => {
                        d.notes.push(format!("WPAD {loc}: {}", names(&list)));
                        d.candidates.extend(list);
                        return;
                    }
                    Err(e) => d.notes.push(format!("WPAD: {e}")),
                }
            }
        }
    }

    /// Sets up a verified session to the gateway: the remembered way first, else every
    /// candidate, staggered. `verify` runs the gateway handshake on a fresh stream (WebSocket
    /// upgrade + tunnel hello) and returns the session.
    pub async fn connect<T, E, V, Fut>(
        &self,
        url: &GatewayUrl,
        tls: Option<&Arc<rustls::ClientConfig>>,
        timeout: Duration,
        verify: V,
    ) -> Result<(T, Candidate), ProbeError<E>>
    where
        V: Fn(GatewayStream) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: fmt::Display + fmt::Debug + GatewayReached,
    {
        let _probing = self.probing.lock().await;
        let key = crate::network::key();
        let remembered = self
            .memory
            .lock()
            .ok()
            .and_then(|m| m.chosen.get(&key).cloned());
        let mut attempts = Vec::new();
        if let Some(c) = &remembered {
            let started = Instant::now();
            match self.attempt(url, tls, timeout, c, &verify).await {
                Outcome::Won(t, _) => return Ok((t, c.clone())),
                Outcome::Reached(e) => return Err(ProbeError::Gateway(e)),
                Outcome::Failed(why) => {
                    tracing::info!(way = %c, %why, "the remembered way out failed; probing again");
                    attempts.push(Attempt {
                        candidate: c.clone(),
                        outcome: Err(why),
                        elapsed: started.elapsed(),
                        refused: false,
                    });
                }
            }
        }
        let d = self.discover(url).await;
        let candidates: Vec<Candidate> = d
            .candidates
            .into_iter()
            .filter(|c| remembered.as_ref().map(|r| &r.proxy) != Some(&c.proxy))
            .collect();
        let mut pending = FuturesUnordered::new();
        let mut next = 0;
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                _ = &mut timer, if next < candidates.len() => {
                    let c = &candidates[next];
                    next += 1;
                    let started = Instant::now();
                    let verify = &verify;
                    pending.push(async move {
                        (c, started, self.attempt(url, tls, timeout, c, verify).await)
                    });
                    timer.as_mut().reset(tokio::time::Instant::now() + self.stagger);
                }
                Some((c, started, outcome)) = pending.next(), if !pending.is_empty() => {
                    match outcome {
                        Outcome::Won(t, _) => {
                            if let Ok(mut m) = self.memory.lock() {
                                m.chosen.insert(key, c.clone());
                            }
                            tracing::info!(way = %c, "way out to the gateway found");
                            return Ok((t, c.clone()));
                        }
                        Outcome::Reached(e) => {
                            if let Ok(mut m) = self.memory.lock() {
                                m.chosen.insert(key, c.clone());
                            }
                            return Err(ProbeError::Gateway(e));
                        }
                        Outcome::Failed(why) => {
                            tracing::info!(way = %c, %why, "way out failed");
                            attempts.push(Attempt { candidate: c.clone(), outcome: Err(why), elapsed: started.elapsed(), refused: false });
                            // Happy eyeballs: a failure starts the next one at once.
                            timer.as_mut().reset(tokio::time::Instant::now());
                        }
                    }
                }
                else => break,
            }
        }
        let summary = attempts
            .iter()
            .map(|a| {
                format!(
                    "{}: {}",
                    a.candidate,
                    a.outcome.as_ref().err().map(String::as_str).unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        Err(ProbeError::NoWay { attempts, summary })
    }

    /// Tries every candidate to its end (for `sallyport doctor`), staggered like [`Way::connect`]
    /// but without stopping at the first success. Remembers nothing.
    pub async fn diagnose<T, E, V, Fut>(
        &self,
        url: &GatewayUrl,
        tls: Option<&Arc<rustls::ClientConfig>>,
        timeout: Duration,
        verify: V,
    ) -> (Discovery, Vec<Attempt>)
    where
        V: Fn(GatewayStream) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: fmt::Display + fmt::Debug + GatewayReached,
    {
        let d = self.discover(url).await;
        let tries = d.candidates.iter().enumerate().map(|(i, c)| {
            let verify = &verify;
            async move {
                tokio::time::sleep(self.stagger * i as u32).await;
                let started = Instant::now();
                let mut refused = false;
                let outcome = match self.attempt(url, tls, timeout, c, verify).await {
                    Outcome::Won(_, cert) => Ok(cert),
                    Outcome::Reached(e) if e.refused_credential() => {
                        refused = true;
                        Err(format!(
                            "reached the gateway, which refused the credential: {e}"
                        ))
                    }
                    Outcome::Reached(e) => Ok(format!("reached the gateway, which answered: {e}")),
                    Outcome::Failed(why) => Err(why),
                };
                Attempt {
                    candidate: c.clone(),
                    outcome,
                    elapsed: started.elapsed(),
                    refused,
                }
            }
        });
        let attempts = futures_util::future::join_all(tries).await;
        (d, attempts)
    }

    async fn attempt<T, E, V, Fut>(
        &self,
        url: &GatewayUrl,
        tls: Option<&Arc<rustls::ClientConfig>>,
        timeout: Duration,
        c: &Candidate,
        verify: &V,
    ) -> Outcome<T, E>
    where
        V: Fn(GatewayStream) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: fmt::Display + fmt::Debug + GatewayReached,
    {
        match self.dial(url, tls, timeout, c).await {
            Ok(stream) => {
                let cert = stream.peer_summary();
                match verify(stream).await {
                    Ok(t) => Outcome::Won(t, cert),
                    Err(e) if e.reached_gateway() => Outcome::Reached(e),
                    Err(e) => Outcome::Failed(e.to_string()),
                }
            }
            Err(why) => Outcome::Failed(why),
        }
    }

    /// Opens one more connection to the gateway along candidate `c` (a way found before):
    /// the HTTP transport needs several. Honours what the probe learnt (the proxy's scheme,
    /// credentials held back or rejected). `Err` explains the failure in one line.
    pub async fn dial(
        &self,
        url: &GatewayUrl,
        tls: Option<&Arc<rustls::ClientConfig>>,
        timeout: Duration,
        c: &Candidate,
    ) -> Result<GatewayStream, String> {
        let proxy_key = c.proxy.to_string();
        // A proxy that rejected our credentials is still asked, without them (they are held
        // back from every proxy): a Kerberos ticket obtained since needs no password.
        let (rejected, remembered) = match self.memory.lock() {
            Ok(m) => (
                m.rejected.get(&proxy_key).cloned(),
                m.schemes.get(&proxy_key).copied(),
            ),
            Err(_) => (None, None),
        };
        self.refresh_credentials();
        let mut auth = self.egress.auth.clone();
        auth.credentials = self.credentials.lock().ok().and_then(|c| c.0.clone());
        auth.no_cleartext = !c.trusted();
        auth.wpad_guard = c.origin == Origin::Wpad && !self.egress.wpad_credentials;
        if let Ok(mut m) = self.memory.lock() {
            if let Some((until, why)) = m.held.clone() {
                if until.is_some_and(|t| Instant::now() >= t) {
                    m.held = None;
                } else if auth.credentials.is_some() {
                    auth.credentials = None;
                    auth.withheld = Some(why);
                }
            }
        }
        if let (Some(why), Some(_)) = (rejected, &auth.credentials) {
            auth.credentials = None;
            auth.withheld = Some(why);
        }
        let dialled = match &self.egress.native_tls {
            Some(native) => {
                crate::dial_via_native(url, native, timeout, &c.proxy, &auth, remembered).await
            }
            None => dial_via(url, tls, timeout, &c.proxy, &auth, remembered).await,
        };
        match dialled {
            Ok((stream, scheme)) => {
                if let (Some(s), Ok(mut m)) = (scheme, self.memory.lock()) {
                    m.schemes.insert(proxy_key, s);
                }
                Ok(stream)
            }
            Err(e) => {
                if let EgressError::Proxy(pe) = &e {
                    if pe.credentials_rejected() {
                        tracing::warn!(proxy = %c.proxy, error = %pe, "proxy rejected our credentials; they go to no proxy again until restart (or until the credentials file changes)");
                        if let Ok(mut m) = self.memory.lock() {
                            m.rejected.insert(proxy_key, pe.to_string());
                            m.held = Some((None, format!("{} rejected them", c.proxy)));
                        }
                    } else if pe.credentials_unconfirmed() {
                        tracing::warn!(proxy = %c.proxy, error = %pe, "our credentials got no clear answer; held back for 10 minutes");
                        if let Ok(mut m) = self.memory.lock() {
                            m.held = Some((
                                Some(Instant::now() + UNCONFIRMED_HOLD),
                                format!("{} gave no clear answer to them", c.proxy),
                            ));
                        }
                    }
                }
                Err(explain_dial(&c.proxy, url, &e))
            }
        }
    }
}

/// A dial error, with the likely cause for direct timeouts.
fn explain_dial(p: &Proxy, url: &GatewayUrl, e: &EgressError) -> String {
    match (p, e) {
        (
            Proxy::Direct,
            EgressError::ConnectTimeout {
                role: "gateway", ..
            },
        ) => {
            format!("{e} — outbound {} is probably blocked", url.port)
        }
        _ => e.to_string(),
    }
}

fn names(list: &[Candidate]) -> String {
    list.iter()
        .map(|c| c.proxy.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Fetches and evaluates a PAC file for the gateway URL; its answer as candidates.
async fn pac_candidates(
    location: &str,
    url: &GatewayUrl,
    source: &str,
    origin: Origin,
    timeout: Duration,
) -> Result<Vec<Candidate>, String> {
    let script = pac::fetch(location, timeout)
        .await
        .map_err(|e| e.to_string())?;
    // Browsers pass https URLs to the PAC without their path.
    let pac_url = format!("https://{}/", url.authority());
    let host = url.host.clone();
    let name = location.to_string();
    let list = tokio::task::spawn_blocking(move || {
        let p = pac::Pac::new(&name, &script, pac::PacLimits::default())?;
        p.find_proxy(&pac_url, &host)
    })
    .await
    .map_err(|e| format!("PAC at {location}: {e}"))?
    .map_err(|e| e.to_string())?;
    let n = list.len();
    Ok(list
        .into_iter()
        .enumerate()
        .map(|(i, proxy)| Candidate {
            proxy,
            origin,
            source: if n > 1 {
                format!("{source}, entry {} of {n}", i + 1)
            } else {
                source.to_string()
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AuthOptions, Credentials};
    use crate::proxy::Password;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A proxy that answers every request with 407 Basic; counts requests carrying a password.
    async fn refusing_proxy() -> (u16, Arc<AtomicUsize>) {
        refusing_proxy_asking("Basic realm=\"corp\"").await
    }

    /// A proxy that answers every request with 407 and `Proxy-Authenticate: <challenge>`
    /// (several, comma-separated); counts requests carrying `Proxy-Authorization`.
    async fn refusing_proxy_asking(challenge: &'static str) -> (u16, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let with_password = Arc::new(AtomicUsize::new(0));
        let count = with_password.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut b = [0u8; 1024];
                    loop {
                        let Ok(n) = s.read(&mut b).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&b[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let req: Vec<u8> = buf.drain(..end + 4).collect();
                            if String::from_utf8_lossy(&req).contains("Proxy-Authorization") {
                                count.fetch_add(1, Ordering::SeqCst);
                            }
                            let answer = format!("HTTP/1.1 407 Auth\r\nProxy-Authenticate: {challenge}\r\nContent-Length: 0\r\n\r\n");
                            let _ = s.write_all(answer.as_bytes()).await;
                        }
                    }
                });
            }
        });
        (port, with_password)
    }

    fn way(proxy: Option<Proxy>) -> Arc<Way> {
        Way::new(egress(proxy))
    }

    fn egress(proxy: Option<Proxy>) -> Egress {
        Egress {
            proxy,
            auth: AuthOptions {
                credentials: Some(Credentials::new("alice", Password::new("pw"))),
                ..Default::default()
            },
            system: false,
            wpad: false,
            ..Egress::default()
        }
    }

    #[derive(Debug)]
    struct Never;
    impl fmt::Display for Never {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("never")
        }
    }
    impl GatewayReached for Never {
        fn reached_gateway(&self) -> bool {
            false
        }
    }

    fn url() -> GatewayUrl {
        GatewayUrl::parse("ws://127.0.0.1:9/").unwrap()
    }

    #[tokio::test]
    async fn credentials_rejected_by_one_proxy_go_to_no_other() {
        let (p1, n1) = refusing_proxy().await;
        let (p2, n2) = refusing_proxy().await;
        let w = way(None);
        let cand = |port| Candidate {
            proxy: format!("http://127.0.0.1:{port}").parse().unwrap(),
            source: "test".into(),
            origin: Origin::Named,
        };
        let verify = |_io: GatewayStream| async { Err::<(), Never>(Never) };
        let t = Duration::from_secs(5);
        let Outcome::Failed(why) = w.attempt(&url(), None, t, &cand(p1), &verify).await else {
            panic!("expected a failure")
        };
        assert!(why.contains("rejected the Basic credentials"), "{why}");
        let Outcome::Failed(why) = w.attempt(&url(), None, t, &cand(p2), &verify).await else {
            panic!("expected a failure")
        };
        assert!(
            why.contains("held back") && why.contains("rejected them"),
            "{why}"
        );
        assert_eq!(n1.load(Ordering::SeqCst), 1);
        assert_eq!(
            n2.load(Ordering::SeqCst),
            0,
            "the password went to a second proxy"
        );
    }

    #[tokio::test]
    async fn sessions_connecting_together_send_the_password_once() {
        let (port, n) = refusing_proxy().await;
        let w = way(Some(format!("http://127.0.0.1:{port}").parse().unwrap()));
        let verify = |_io: GatewayStream| async { Err::<(), Never>(Never) };
        let u = url();
        let t = Duration::from_secs(5);
        let tries = (0..4).map(|_| w.connect(&u, None, t, verify));
        let results = futures_util::future::join_all(tries).await;
        assert!(results.iter().all(|r| r.is_err()));
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "the password was sent more than once"
        );
        assert!(results
            .iter()
            .all(|r| r.as_ref().err().unwrap().only_rejected_credentials()));
    }

    /// What a proxy asking for NTLM and Digest got from a candidate of `origin`: (how many
    /// requests carried `Proxy-Authorization`, why the attempt failed).
    async fn ntlm_and_digest_asked_by(origin: Origin, policy_allows: bool) -> (usize, String) {
        let (port, n) =
            refusing_proxy_asking("NTLM, Digest realm=\"corp\", nonce=\"abc\", qop=\"auth\"").await;
        let w = Way::new(Egress {
            wpad_credentials: policy_allows,
            ..egress(None)
        });
        let why = failed_attempt(&w, port, origin).await;
        (n.load(Ordering::SeqCst), why)
    }

    /// Why an attempt through the (refusing) proxy on `port`, found by WPAD, failed.
    async fn failed_attempt(w: &Way, port: u16, origin: Origin) -> String {
        let c = Candidate {
            proxy: format!("http://127.0.0.1:{port}").parse().unwrap(),
            source: "WPAD http://wpad.corp/wpad.dat".into(),
            origin,
        };
        let verify = |_io: GatewayStream| async { Err::<(), Never>(Never) };
        let Outcome::Failed(why) = w
            .attempt(&url(), None, Duration::from_secs(5), &c, &verify)
            .await
        else {
            panic!("expected a failure")
        };
        why
    }

    #[tokio::test]
    async fn a_wpad_proxy_asking_for_ntlm_or_digest_gets_no_answer() {
        let (sent, why) = ntlm_and_digest_asked_by(Origin::Wpad, false).await;
        assert_eq!(sent, 0, "a WPAD proxy got an NTLM/Digest answer: {why}");
        assert!(
            why.contains("NTLM and Digest not answered: this proxy was found by WPAD, which anyone on the LAN can answer; set [proxy_auth] wpad_credentials = \"allow\""),
            "{why}"
        );
        // The admin policy allows it; proxies from the OS's PAC URL are answered as before.
        for (origin, allow) in [(Origin::Wpad, true), (Origin::OsPac, false)] {
            let (sent, why) = ntlm_and_digest_asked_by(origin, allow).await;
            assert!(sent > 0, "{origin:?}, allowed {allow}: {why}");
            assert!(!why.contains("found by WPAD"), "{why}");
        }
    }

    #[tokio::test]
    async fn a_spoofable_proxy_never_gets_basic() {
        let (port, n) = refusing_proxy().await;
        let why = failed_attempt(&way(None), port, Origin::Wpad).await;
        assert!(why.contains("in clear to a proxy found by WPAD"), "{why}");
        assert_eq!(n.load(Ordering::SeqCst), 0);
    }
}
