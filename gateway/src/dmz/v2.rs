//! Protocol version 2 at the DMZ (`tunnel::handshake`): msg1 answered within the connection's
//! handshake budget, msg3 checked cheapest first (the key Noise proved, the claims, the token
//! file, the issuer's signature), a sealed verdict of one size, and the session in the mode the
//! rule allows. A session counts toward its token's limits only after msg3 proved the key, so a
//! replayed or forged first message locks nobody out.
//!
//! What the gateway stores for version 2: its static key(s) (the inner key, and a next one for
//! rotation), the issuers' public keys, and the agents' public keys in the token file. None of it
//! lets a thief connect as an agent.

use super::limits::CountGuard;
use super::upgrade::count_session;
use super::Shared;
use crate::auth::{AuthError, Identity};
use crate::logsafe::Clean;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{debug, info, warn};
use tunnel::handshake::{self, Hello, Mode, Offer, Responder, TlsKey, Verdict};
use tunnel::inner::{self, InnerRx, InnerTx, Joined, KeyPair};
use tunnel::token::{IssuerKey, Kind, TokenError};
use tunnel::{TransportError, TransportRx, TransportTx};

/// The day this protocol version shipped: version 1 is accepted until 90 days after it unless
/// the admin sets `v2.accept_v1_until`.
pub const RELEASE_DATE: &str = "2026-12-05";

/// Version 2 settings (`[v2]` in the DMZ's config file).
#[derive(Clone)]
pub struct V2Config {
    /// The gateway's static keys: the current one (the inner key), then the next one.
    pub keys: Vec<Arc<KeyPair>>,
    /// Issuers whose signature on a token's claims is accepted.
    pub issuers: Vec<IssuerKey>,
    /// This deployment's name: a token for another one is refused.
    pub deployment: Option<String>,
    /// A token must be in the token file (the default). `false` (a cluster without a shared
    /// token file): a token signed by one of `issuers` is accepted by its claims alone, and
    /// only `revoked` takes it back.
    pub require_listed: bool,
    /// The signed revocation list every instance reloads (`[v2] revoked`).
    pub revoked: Option<Arc<crate::auth::ReloadingRevocations>>,
    /// Renewal keys (`renew.pub`): they sign renewed agent tokens, and only those.
    pub renewal_keys: Vec<IssuerKey>,
    /// Past this age the list is stale: tokens accepted by claims alone are refused.
    pub revoked_max_age: std::time::Duration,
    /// The admin trusts the TLS-terminating load balancer in front (its keys in `tls_keys`):
    /// sessions through it may run in mode `Outer`, readable by that balancer.
    pub trust_lb: bool,
    /// Outer TLS keys an agent may legitimately see: this gateway's certificate's, and the
    /// configured keys of its load balancer.
    pub tls_keys: Vec<TlsKey>,
    /// Version 1 (bearer tokens) is refused after this.
    pub accept_v1_until: SystemTime,
}

impl V2Config {
    /// The keys whose signature a token of this kind may carry: the issuers', and for agent
    /// tokens the renewal keys too (an issuer connector never signs a connector token).
    pub fn signers(&self, agent: bool) -> std::borrow::Cow<'_, [IssuerKey]> {
        if agent && !self.renewal_keys.is_empty() {
            let mut all = self.issuers.clone();
            all.extend_from_slice(&self.renewal_keys);
            std::borrow::Cow::Owned(all)
        } else {
            std::borrow::Cow::Borrowed(&self.issuers)
        }
    }

    /// Why tokens accepted by claims alone are refused now (for the log), if they are: the
    /// signed list is older than `revoked_max_age`.
    pub fn stale_list(&self, now: SystemTime) -> Option<String> {
        let list = self.revoked.as_ref()?.current();
        let age = list.age(now);
        (age > self.revoked_max_age).then(|| {
            format!(
                "the revocation list (serial {}) was signed {} ago, more than v2.revoked_max_age ({}): tokens not in the token file are refused until a newer list is installed (re-sign it: `sallyport-gateway token revoke --list FILE --issuer-key issuer.key`)",
                list.serial,
                humantime::format_duration(Duration::from_secs(age.as_secs())),
                humantime::format_duration(self.revoked_max_age)
            )
        })
    }

    /// With one static key, no issuer (no v2 token is accepted until one is added), no
    /// deployment name, no trusted load balancer, and the default v1 cut-off.
    pub fn new(key: Arc<KeyPair>) -> V2Config {
        V2Config {
            keys: vec![key],
            issuers: Vec::new(),
            deployment: None,
            require_listed: true,
            revoked: None,
            renewal_keys: Vec::new(),
            revoked_max_age: std::time::Duration::from_secs(7 * 86_400),
            trust_lb: false,
            tls_keys: Vec::new(),
            accept_v1_until: V2Config::default_v1_cutoff(),
        }
    }

    /// The default cut-off for version 1: [`RELEASE_DATE`] plus 90 days.
    pub fn default_v1_cutoff() -> SystemTime {
        humantime::parse_rfc3339_weak(&format!("{RELEASE_DATE}T00:00:00Z"))
            .map(|t| t + Duration::from_secs(90 * 86_400))
            .unwrap_or(UNIX_EPOCH)
    }

    /// Whether the token-file entry `c` can still authenticate at `now`: not expired, not a
    /// version 1 token past the cut-off, not on the revocation list.
    pub fn may_authenticate(&self, c: &crate::auth::Identity, now: SystemTime) -> bool {
        !c.expired(now) && !self.on_list(c) && (c.v2 || self.v1_open(now))
    }

    /// Whether the signed revocation list (if any) revokes token `id` issued at `issued_at`.
    pub fn revokes(&self, id: &str, issued_at: u64) -> bool {
        self.revoked
            .as_ref()
            .is_some_and(|r| r.current().revokes(id, issued_at))
    }

    /// Whether the revocation list revokes the identity `c`: only version 2 tokens are on it
    /// (version 1 tokens leave their token file).
    pub fn on_list(&self, c: &crate::auth::Identity) -> bool {
        c.v2 && self.revokes(&c.token_id, c.issued_at)
    }

    /// Whether version 1 is still accepted at `now`.
    pub fn v1_open(&self, now: SystemTime) -> bool {
        now < self.accept_v1_until
    }
}

/// What a version 1 client is told after the cut-off: both versions, by name.
pub const V1_CLOSED: &str = "protocol v1 is no longer accepted here; this gateway speaks v2 (agent and connector 0.2 or later, with an sp2_ token)";

/// The offer of msg2 on a connection (`exporter`: the gateway terminates this TLS itself).
pub(crate) fn offer(shared: &Shared, exporter: bool) -> Offer {
    Offer {
        exporter,
        trust_lb: shared.config.v2.trust_lb,
        time: now_secs(),
        tls_keys: shared.config.v2.tls_keys.clone(),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Answers msg1 (anonymous: anyone with the token's public gateway key can send one, so the
/// caller has counted it against the address's handshake budget).
pub(crate) fn answer1(
    shared: &Shared,
    msg1: &[u8],
    is_agent: bool,
    exporter: bool,
) -> Result<(Responder, Offer, bytes::Bytes), String> {
    let keys: Vec<&KeyPair> = shared.config.v2.keys.iter().map(|k| k.as_ref()).collect();
    let role = if is_agent {
        handshake::Role::Agent
    } else {
        handshake::Role::Connector
    };
    let offer = offer(shared, exporter);
    match Responder::read1(&keys, role, msg1, &offer) {
        Ok((r, msg2)) => Ok((r, offer, msg2)),
        Err(e) => {
            debug!(error = %e, "v2 hello refused");
            Err(format!(
                "the hello is not for this gateway's key ({}); is the token for this gateway?",
                shared.config.v2.keys[0].public()
            ))
        }
    }
}

/// The checks of msg3, cheapest first (the proved key against the claims, the token file,
/// kind, dates, deployment and gateway key, then the issuer's signature). `Err` is the status and one line for the agent (the
/// channel is authenticated by now: the agent may learn why) and the reason for our log.
pub(crate) fn verify(
    shared: &Shared,
    hello: &Hello,
    gateway_key: &[u8; 32],
    is_agent: bool,
) -> Result<Identity, (u16, &'static str, String)> {
    let c = hello.signed.claims();
    if c.agent_key != hello.remote_static {
        return Err((
            401,
            "invalid token",
            format!(
                "token {:?}: the claims name another key than the one proved",
                c.id
            ),
        ));
    }
    // The token file first: until the key is known here, every refusal reads the same, so
    // nobody learns deployment names or dates from made-up claims.
    let store = if is_agent {
        shared.config.agent_tokens.current()
    } else {
        shared.config.connector_tokens.current()
    };
    let v2 = &shared.config.v2;
    if v2.revokes(&c.id, c.issued_at) {
        return Err((
            401,
            "token revoked or unknown here",
            format!("token {:?} is on the revocation list", c.id),
        ));
    }
    let id = match store.verify_v2(&c.id, &hello.remote_static, SystemTime::now()) {
        // The signed issue time, so that the list's `revoke ID before T` reaches it too.
        Ok(id) => Identity {
            issued_at: c.issued_at,
            ..id
        },
        // Not listed here, and this cluster does not list tokens: the claims are the identity.
        // The issuer's signature first, so that made-up claims learn nothing from the checks
        // below (a deployment name, whether an id is listed): every refusal before it reads
        // the same.
        Err(AuthError::UnknownId { .. }) if !v2.require_listed => {
            hello
                .signed
                .verify(&v2.signers(is_agent))
                .map_err(|e| (401, "token revoked or unknown here", e.to_string()))?;
            // Fail closed: a list nobody re-signed for too long may be missing revocations.
            if let Some(stale) = v2.stale_list(SystemTime::now()) {
                return Err((401, "token revoked or unknown here", stale));
            }
            Identity::from_claims(c).map_err(|why| (401, "token revoked or unknown here", why))?
        }
        Err(e) => {
            let msg = match e {
                AuthError::Expired { .. } => "token expired",
                _ => "token revoked or unknown here",
            };
            return Err((401, msg, e.to_string()));
        }
    };
    let kind = if is_agent {
        Kind::Agent
    } else {
        Kind::Connector
    };
    if is_agent && c.expires.is_none() {
        return Err((
            401,
            "invalid token",
            format!("token {:?}: an agent token without expiry", c.id),
        ));
    }
    c.check(kind, now_secs(), v2.deployment.as_deref(), gateway_key)
        .map_err(|e| {
            let msg = match e {
                TokenError::Expired { .. } => "token expired",
                TokenError::NotYet { .. } => "token not valid yet",
                TokenError::WrongDeployment { .. } => "token is for another deployment",
                _ => "invalid token",
            };
            (401, msg, e.to_string())
        })?;
    hello
        .signed
        .verify(&v2.signers(is_agent))
        .map_err(|e| (401, "invalid token", e.to_string()))?;
    Ok(id)
}

/// A version 2 session transport over the carrier halves.
pub(crate) type V2Transport<Tx, Rx> = Joined<InnerTx<Tx>, InnerRx<Rx>>;

/// After msg2 was sent: reads msg3 (by `deadline`), checks it, counts the session and answers
/// the sealed verdict. `gateway_exporter`: this TLS connection's exporter value when the gateway
/// terminates it; `allow_outer` false keeps the session sealed whatever the rule says (the HTTP
/// fallback, where every request may ride another TLS connection).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn accept<Tx: TransportTx, Rx: TransportRx>(
    shared: &Arc<Shared>,
    mut tx: Tx,
    mut rx: Rx,
    responder: Responder,
    offer: &Offer,
    gateway_exporter: Option<[u8; 32]>,
    allow_outer: bool,
    client: SocketAddr,
    deadline: tokio::time::Instant,
    is_agent: bool,
) -> Option<(V2Transport<Tx, Rx>, Identity, CountGuard<String>)> {
    let msg3 = match tokio::time::timeout_at(deadline, rx.recv()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) | Ok(Err(TransportError::Closed)) => {
            debug!("left before msg3");
            return None;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "no msg3");
            return None;
        }
        Err(_) => {
            debug!("no msg3 within the handshake deadline");
            return None;
        }
    };
    let key = *responder.key();
    let (cipher, hello) = match responder.read3(&msg3) {
        Ok(x) => x,
        Err(e) => {
            // Nothing authenticated to answer to: end the connection.
            info!(%client, error = %e, "v2 handshake failed at msg3");
            let role = super::upgrade::role_of(is_agent);
            shared
                .ops
                .metrics
                .auth_failed(role, crate::metrics::AuthFailure::Handshake);
            return None;
        }
    };
    let (mut sealer, opener) = cipher.split();
    let id = match verify(shared, &hello, &key, is_agent) {
        Ok(id) => id,
        Err((status, msg, why)) => {
            use crate::metrics::AuthFailure as F;
            let reason = match msg {
                "token expired" => F::Expired,
                "token revoked or unknown here" => F::Unknown,
                _ => F::InvalidToken,
            };
            let role = super::upgrade::role_of(is_agent);
            shared.ops.metrics.auth_failed(role, reason);
            static LOG: crate::logsafe::Throttle = crate::logsafe::Throttle::new(20);
            if let Some(left_out) = LOG.allow() {
                warn!(%client, role = if is_agent { "agent" } else { "connector" }, reason = %Clean(&why), left_out, "refused v2 token");
            }
            refuse(&mut tx, &mut sealer, status, msg, deadline).await;
            return None;
        }
    };
    let Some(slot) = count_session(shared, &id, is_agent, client) else {
        refuse(
            &mut tx,
            &mut sealer,
            429,
            "too many sessions for this token",
            deadline,
        )
        .await;
        return None;
    };
    let mode = if allow_outer {
        handshake::choose_mode(offer, gateway_exporter.as_ref(), &hello.binding)
    } else {
        Mode::Sealed
    };
    let verdict = handshake::seal_verdict(&mut sealer, &Verdict::Ok(mode)).ok()?;
    let sent = tokio::time::timeout_at(deadline, async {
        tx.send(verdict).await?;
        tx.flush().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return None;
    }
    debug!(token = %id.token_id, ?mode, "v2 handshake done");
    let keys = (mode == Mode::Sealed).then_some((sealer, opener));
    Some((inner::joined(tx, rx, keys), id, slot))
}

/// Sends a sealed refusal (by `deadline`; a client that does not read cannot hold us).
async fn refuse<Tx: TransportTx>(
    tx: &mut Tx,
    sealer: &mut inner::Sealer,
    status: u16,
    text: &str,
    deadline: tokio::time::Instant,
) {
    let v = handshake::seal_verdict(
        sealer,
        &Verdict::Refused {
            status,
            text: text.to_string(),
        },
    );
    if let Ok(v) = v {
        let _ = tokio::time::timeout_at(deadline, async {
            let _ = tx.send(v).await;
            let _ = tx.flush().await;
        })
        .await;
    }
}
