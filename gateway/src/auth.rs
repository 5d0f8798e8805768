//! Bearer tokens for agents and connectors.
//!
//! A token looks like `sp_<id>_<secret>`: `id` names the credential (1-64 chars of `[a-z0-9-]`, safe to
//! log) and `secret` is 256 random bits as 64 lowercase hex characters. The gateway never stores the
//! secret: its token file keeps `sha256 = hex(SHA-256(secret))`, where the hash is taken over the 64
//! ASCII hex characters of the secret part. Verification hashes the presented secret and compares the
//! two hashes in constant time.
//!
//! The token file is TOML, the same format for agents and connectors:
//!
//! ```toml
//! [[token]]
//! id = "alice-laptop"
//! name = "alice"                        # optional, defaults to the id
//! groups = ["dev", "dba"]               # optional
//! sha256 = "<64 hex>"
//! expires = "2027-05-01T00:00:00Z"      # optional, RFC 3339
//! routes = ["db.internal:5432"]         # connectors: the only routes this credential may advertise
//! ```
//!
//! Version 2 tokens (`sp2_…`, see `tunnel::token` and `docs/protocol.md`) are never sent: the
//! agent proves the key derived from the token's secret inside the handshake. Their table holds
//! `public_key = "x25519/<base64>"` (that key) instead of `sha256`, so a stolen token file lets
//! nobody connect; the id, name, groups, routes and expiry work as for version 1. An id is
//! either version 1 or version 2, never both: a v2 id is refused on v1's bearer path.
//!
//! [`ReloadingStore`] re-reads the file when it changes, so revoking a token is "delete its table";
//! sessions subscribe to changes and use [`TokenStore::is_valid`] to cut themselves off.
//!
//! Secrets never reach `Debug`, `Display` or log output: [`TokenSecret`] prints as `sp_<id>_****`, and
//! no error message echoes presented text that could hold a secret.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::RngCore;
use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::policy::Route;

/// Everything that can go wrong with tokens and token files.
///
/// For a refused token, `Display` is the detailed reason for the gateway's log (it may name the token
/// id, never the secret); send the client only [`AuthError::client_message`].
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("malformed token: {why}")]
    Malformed { why: &'static str },
    #[error("token id {id:?} is not in the token file")]
    UnknownId { id: String },
    #[error("token {id:?}: secret does not match the stored sha256")]
    WrongSecret { id: String },
    #[error("token {id:?} expired at {expired}")]
    Expired { id: String, expired: String },
    #[error("invalid token id {id:?}: use 1-64 characters of a-z, 0-9 and '-'")]
    BadId { id: String },
    #[error("token file {path} not found; create one with `sallyport-gateway token new ...`")]
    MissingFile { path: PathBuf },
    #[error("token file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin} line {line}{key}: {message}", key = key.as_ref().map(|k| format!(", key `{k}`")).unwrap_or_default())]
    Invalid {
        origin: String,
        line: usize,
        key: Option<String>,
        message: String,
    },
    #[error("token file {path} already has a token with id {id:?}; pick another id or remove the old one")]
    DuplicateId { path: PathBuf, id: String },
    #[error("could not write token entry: {0}")]
    Serialize(String),
    #[error("token {id:?} is a protocol v2 token; it is never sent as a bearer token")]
    V2Only { id: String },
    #[error("token {id:?} is a protocol v1 token; this handshake is v2")]
    V1Only { id: String },
    #[error("token {id:?}: the key it proved is not the one in the token file")]
    WrongKey { id: String },
    #[error("revocation list {path}: {why}")]
    SignedList { path: PathBuf, why: String },
    #[error("revocation list {path}: {source}")]
    RevocationList {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AuthError {
    /// The only thing a client is told about a refused token.
    pub fn client_message(&self) -> &'static str {
        match self {
            AuthError::Expired { .. } => "token expired",
            _ => "invalid token",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Token strings
// ---------------------------------------------------------------------------------------------

/// A full token string (the one type of agent, connector and `token new`: `uplink::Secret`).
/// Prints as `sp_<id>_****` or `sp2_****`; [`expose`](uplink::Secret::expose) gives the real
/// thing (to show it once to the person who asked for it, or to send a v1 token in an
/// `Authorization` header).
pub type TokenSecret = uplink::Secret;

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_lower_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Makes a new token for `id`: returns the token (show it once, store it nowhere on the gateway) and
/// the hex SHA-256 of its secret part (what goes into the token file).
pub fn generate(id: &str) -> Result<(TokenSecret, String), AuthError> {
    if !valid_id(id) {
        return Err(AuthError::BadId { id: id.to_string() });
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = hex::encode(bytes);
    let hash = hex::encode(hash_secret(&secret));
    Ok((TokenSecret::new(format!("sp_{id}_{secret}")), hash))
}

/// Splits `sp_<id>_<secret>` (surrounding whitespace ignored) into `(id, secret)`, borrowing from `s`.
/// Errors never include the input.
pub fn parse_token(s: &str) -> Result<(&str, &str), AuthError> {
    let s = s.trim();
    let rest = s.strip_prefix("sp_").ok_or(AuthError::Malformed {
        why: "does not start with sp_",
    })?;
    // The id has no '_', so the last '_' separates id and secret.
    let (id, secret) = rest.rsplit_once('_').ok_or(AuthError::Malformed {
        why: "expected sp_<id>_<secret>",
    })?;
    if !valid_id(id) {
        return Err(AuthError::Malformed {
            why: "id part is not 1-64 characters of a-z, 0-9, '-'",
        });
    }
    if !is_lower_hex64(secret) {
        return Err(AuthError::Malformed {
            why: "secret part is not 64 lowercase hex characters",
        });
    }
    Ok((id, secret))
}

// ---------------------------------------------------------------------------------------------
// Token store
// ---------------------------------------------------------------------------------------------

/// Who a verified token belongs to. Holds no secret: `sha256` is the stored hash of the secret
/// (version 1) or the agent's public key (version 2), kept so that [`TokenStore::is_valid`]
/// notices a token re-issued under the same id (not printed by Debug).
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub token_id: String,
    pub name: String,
    pub groups: Vec<String>,
    pub routes: Vec<Route>,
    pub expires: Option<SystemTime>,
    pub sha256: [u8; 32],
    /// A protocol v2 token (`sha256` then holds its public key).
    pub v2: bool,
    /// In a token file; `false`: a v2 token accepted by its issuer's signature alone
    /// (`[v2] require_listed = false`), revoked only by the revocation list.
    pub listed: bool,
    /// A v2 token's claim 6 (issued at, Unix seconds; 0 otherwise): the list's `before`
    /// entries compare with it.
    pub issued_at: u64,
}

impl Identity {
    /// Whether the token has expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        matches!(self.expires, Some(e) if e <= now)
    }

    /// The identity of a v2 token accepted by its signed claims alone (not in a token file).
    pub fn from_claims(c: &tunnel::token::Claims) -> Result<Identity, String> {
        // The name and groups go into logs and into every OPEN: no control characters, even
        // from an issuer.
        let text_ok = |t: &str| !t.chars().any(char::is_control);
        if !c.name.as_deref().is_none_or(text_ok) || !c.groups.iter().all(|g| text_ok(g)) {
            return Err(format!(
                "token {:?}: a name or group with control characters",
                c.id
            ));
        }
        let mut routes = Vec::with_capacity(c.routes.len());
        for r in &c.routes {
            routes.push(
                r.parse::<Route>()
                    .map_err(|e| format!("token {:?}: {e}", c.id))?,
            );
        }
        Ok(Identity {
            token_id: c.id.clone(),
            name: c.name.clone().unwrap_or_else(|| c.id.clone()),
            groups: c.groups.clone(),
            routes,
            expires: c
                .expires
                .map(|e| std::time::UNIX_EPOCH + Duration::from_secs(e)),
            sha256: c.agent_key,
            v2: true,
            listed: false,
            issued_at: c.issued_at,
        })
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("token_id", &self.token_id)
            .field("name", &self.name)
            .field("groups", &self.groups)
            .field(
                "routes",
                &self
                    .routes
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>(),
            )
            .field(
                "expires",
                &self
                    .expires
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            )
            .finish_non_exhaustive()
    }
}

/// The parsed token file. Cheap to share behind an `Arc`; replaced wholesale on reload.
pub struct TokenStore {
    origin: String,
    tokens: HashMap<String, Identity>,
}

impl fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&String> = self.tokens.keys().collect();
        ids.sort();
        f.debug_struct("TokenStore")
            .field("origin", &self.origin)
            .field("ids", &ids)
            .finish()
    }
}

/// The file as written; `Spanned` keeps byte offsets so validation errors can name a line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    token: Vec<RawToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    id: toml::Spanned<String>,
    name: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    sha256: Option<toml::Spanned<String>>,
    public_key: Option<toml::Spanned<String>>,
    expires: Option<toml::Spanned<toml::Value>>,
    #[serde(default)]
    routes: Vec<toml::Spanned<String>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The key of a `key = value` line, to name it in an error without echoing the value.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let (key, _) = l.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && key.len() <= 64 && !key.contains(char::is_whitespace))
        .then(|| key.to_string())
}

impl TokenStore {
    /// Every token of the file (a connector credential's routes say what it may serve).
    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        self.tokens.values()
    }

    /// An empty store (no token is accepted).
    pub fn empty(origin: &str) -> TokenStore {
        TokenStore {
            origin: origin.to_string(),
            tokens: HashMap::new(),
        }
    }

    /// Reads and validates a token file.
    pub fn load(path: &Path) -> Result<TokenStore, AuthError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AuthError::MissingFile {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(AuthError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses token-file text; `origin` (usually the file name) prefixes every error.
    pub fn parse(text: &str, origin: &str) -> Result<TokenStore, AuthError> {
        let invalid = |offset: usize, key: Option<&str>, message: String| AuthError::Invalid {
            origin: origin.to_string(),
            line: line_of(text, offset),
            key: key.map(str::to_string),
            message,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
            AuthError::Invalid {
                origin: origin.to_string(),
                line,
                key: key_on_line(text, line),
                message: e.message().trim().to_string(),
            }
        })?;

        let mut tokens = HashMap::new();
        for t in raw.token {
            let id = t.id.get_ref().clone();
            let at = t.id.span().start;
            if !valid_id(&id) {
                return Err(invalid(
                    at,
                    Some("id"),
                    format!("token id {id:?} must be 1-64 characters of a-z, 0-9 and '-'"),
                ));
            }
            if tokens.contains_key(&id) {
                return Err(invalid(
                    at,
                    Some("id"),
                    format!("token id {id:?} appears twice; ids must be unique"),
                ));
            }
            let (sha256, v2) = match (&t.sha256, &t.public_key) {
                (Some(h), None) => {
                    // Never echo the value: someone may have pasted a whole token here by mistake.
                    let hash_hex = h.get_ref().trim();
                    if !is_lower_hex64(&hash_hex.to_ascii_lowercase()) {
                        return Err(invalid(
                            h.span().start,
                            Some("sha256"),
                            format!("token {id:?}: sha256 must be 64 hex characters (the SHA-256 of the secret, from `sallyport-gateway token new --v1`)"),
                        ));
                    }
                    let mut sha256 = [0u8; 32];
                    hex::decode_to_slice(hash_hex.to_ascii_lowercase(), &mut sha256).map_err(
                        |_| {
                            invalid(
                                h.span().start,
                                Some("sha256"),
                                format!("token {id:?}: sha256 is not hex"),
                            )
                        },
                    )?;
                    (sha256, false)
                }
                (None, Some(k)) => {
                    let key: tunnel::inner::PublicKey = k.get_ref().parse().map_err(|_| {
                        invalid(
                            k.span().start,
                            Some("public_key"),
                            format!("token {id:?}: public_key must be x25519/<base64 of 32 bytes> (from `sallyport-gateway token new`)"),
                        )
                    })?;
                    if tunnel::token::low_order(&key.0) {
                        return Err(invalid(
                            k.span().start,
                            Some("public_key"),
                            format!("token {id:?}: public_key is a low-order point, which proves nothing"),
                        ));
                    }
                    (key.0, true)
                }
                _ => {
                    return Err(invalid(
                        at,
                        Some("id"),
                        format!("token {id:?}: give exactly one of sha256 (protocol v1) and public_key (v2)"),
                    ))
                }
            };
            let expires = match &t.expires {
                None => None,
                Some(sp) => {
                    let text_value = match sp.get_ref() {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Datetime(d) => d.to_string(),
                        _ => String::new(),
                    };
                    let parsed = humantime::parse_rfc3339_weak(text_value.trim()).map_err(|_| {
                        invalid(
                            sp.span().start,
                            Some("expires"),
                            format!("token {id:?}: expires must be an RFC 3339 time like \"2027-05-01T00:00:00Z\""),
                        )
                    })?;
                    Some(parsed)
                }
            };
            let mut routes = Vec::with_capacity(t.routes.len());
            for r in &t.routes {
                let route: Route = r.get_ref().parse().map_err(|e| {
                    invalid(r.span().start, Some("routes"), format!("token {id:?}: {e}"))
                })?;
                routes.push(route);
            }
            let name = t.name.clone().unwrap_or_else(|| id.clone());
            tokens.insert(
                id.clone(),
                Identity {
                    token_id: id,
                    name,
                    groups: t.groups,
                    routes,
                    expires,
                    sha256,
                    v2,
                    listed: true,
                    issued_at: 0,
                },
            );
        }
        Ok(TokenStore {
            origin: origin.to_string(),
            tokens,
        })
    }

    /// Where this store came from (file name).
    pub fn origin(&self) -> &str {
        &self.origin
    }
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    pub fn contains_id(&self, id: &str) -> bool {
        self.tokens.contains_key(id)
    }

    /// Checks a presented token (`sp_<id>_<secret>`, e.g. from `Authorization: Bearer`).
    pub fn verify(&self, presented: &str, now: SystemTime) -> Result<Identity, AuthError> {
        let (id, secret) = parse_token(presented)?;
        let presented_hash = hash_secret(secret);
        let Some(identity) = self.tokens.get(id) else {
            return Err(AuthError::UnknownId { id: id.to_string() });
        };
        if identity.v2 {
            return Err(AuthError::V2Only { id: id.to_string() });
        }
        if !bool::from(presented_hash.ct_eq(&identity.sha256)) {
            return Err(AuthError::WrongSecret { id: id.to_string() });
        }
        if let Some(expires) = identity.expires {
            if expires <= now {
                return Err(AuthError::Expired {
                    id: id.to_string(),
                    expired: humantime::format_rfc3339_seconds(expires).to_string(),
                });
            }
        }
        Ok(identity.clone())
    }

    /// Checks a protocol v2 token whose `key` the handshake proved: the id must be in the file
    /// with that public key, and not expired. (Claims, dates and the issuer's signature are
    /// checked by the caller.)
    pub fn verify_v2(
        &self,
        id: &str,
        key: &[u8; 32],
        now: SystemTime,
    ) -> Result<Identity, AuthError> {
        let Some(identity) = self.tokens.get(id) else {
            return Err(AuthError::UnknownId { id: id.to_string() });
        };
        if !identity.v2 {
            return Err(AuthError::V1Only { id: id.to_string() });
        }
        if !bool::from(key.ct_eq(&identity.sha256)) {
            return Err(AuthError::WrongKey { id: id.to_string() });
        }
        if let Some(expires) = identity.expires.filter(|e| *e <= now) {
            return Err(AuthError::Expired {
                id: id.to_string(),
                expired: humantime::format_rfc3339_seconds(expires).to_string(),
            });
        }
        Ok(identity.clone())
    }

    /// Is a previously verified identity still good: same id, same hash, not expired?
    /// Sessions call this after a reload to cut themselves off when their token was revoked.
    pub fn is_valid(&self, identity: &Identity, now: SystemTime) -> bool {
        match self.tokens.get(&identity.token_id) {
            Some(stored) => {
                bool::from(stored.sha256.ct_eq(&identity.sha256)) && !stored.expired(now)
            }
            None => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reloading
// ---------------------------------------------------------------------------------------------

/// What we last saw of the file, to notice changes cheaply.
type Stamp = (Option<SystemTime>, u64);

/// What a [`Reloading`] file holds: loaded whole, replaced whole.
pub trait Loaded: fmt::Debug + Send + Sync + Sized + 'static {
    /// For logs: `token file`, `revocation list`.
    const WHAT: &'static str;
    /// What loading needs besides the file (the issuer keys that sign a list).
    type Ctx: Send + Sync + 'static;
    /// Loads the file; `current` is what is in force (a list refuses to roll back from it).
    fn load(path: &Path, ctx: &Self::Ctx, current: Option<&Self>) -> Result<Self, AuthError>;
    /// Entries, for the reload log line.
    fn entries(&self) -> usize;
}

impl Loaded for TokenStore {
    const WHAT: &'static str = "token file";
    type Ctx = ();
    fn load(path: &Path, _: &(), _: Option<&Self>) -> Result<Self, AuthError> {
        TokenStore::load(path)
    }
    fn entries(&self) -> usize {
        self.len()
    }
}

/// A token store that follows its file (see [`Reloading`]).
pub type ReloadingStore = Reloading<TokenStore>;

/// The revocation list that follows its file (see [`Reloading`]).
pub type ReloadingRevocations = Reloading<crate::revocation::RevocationList>;

/// A file that is followed: readers take [`current`](Self::current) (a cheap `Arc` clone) or
/// [`subscribe`](Self::subscribe) to hear about reloads; [`watch`](Self::watch) does the
/// polling. A file that turns bad keeps the previous contents in force.
pub struct Reloading<T: Loaded> {
    path: PathBuf,
    ctx: T::Ctx,
    tx: watch::Sender<Arc<T>>,
    /// Last seen file stamp and last logged error (so a bad file is reported once, not every poll).
    seen: Mutex<(Option<Stamp>, Option<String>)>,
}

impl<T: Loaded> fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading")
            .field("path", &self.path)
            .field("current", &*self.current())
            .finish()
    }
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok((m.modified().ok(), m.len()))
}

impl<T: Loaded> Reloading<T> {
    /// Loads the file now; fails if it is missing or invalid (startup should stop on a bad file).
    pub fn open(path: &Path) -> Result<Reloading<T>, AuthError>
    where
        T::Ctx: Default,
    {
        Reloading::open_with(path, T::Ctx::default())
    }

    /// [`open`](Self::open) with what loading needs besides the file.
    pub fn open_with(path: &Path, ctx: T::Ctx) -> Result<Reloading<T>, AuthError> {
        let st = stamp(path).ok();
        let loaded = T::load(path, &ctx, None)?;
        Ok(Reloading {
            path: path.to_path_buf(),
            ctx,
            tx: watch::Sender::new(Arc::new(loaded)),
            seen: Mutex::new((st, None)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn current(&self) -> Arc<T> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<T>> {
        self.tx.subscribe()
    }

    /// Reloads if the file's mtime or length changed. Returns `Ok(true)` if new contents were
    /// installed. On error the old contents stay in force; the error is logged once per
    /// distinct problem.
    pub fn reload_if_changed(&self) -> Result<bool, AuthError> {
        let now_stamp = stamp(&self.path).ok();
        {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if now_stamp.is_some() && seen.0 == now_stamp {
                return Ok(false);
            }
        }
        let result = T::load(&self.path, &self.ctx, Some(&self.current()));
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.0 = now_stamp;
        match result {
            Ok(loaded) => {
                tracing::info!(file = %self.path.display(), what = T::WHAT, entries = loaded.entries(), "reloaded");
                seen.1 = None;
                self.tx.send_replace(Arc::new(loaded));
                Ok(true)
            }
            Err(e) => {
                let msg = e.to_string();
                if seen.1.as_deref() != Some(msg.as_str()) {
                    tracing::error!(
                        what = T::WHAT,
                        "not reloaded, keeping the previous contents: {msg}"
                    );
                    seen.1 = Some(msg);
                }
                Err(e)
            }
        }
    }

    /// Polls the file every `every` until `cancel` fires.
    pub async fn watch(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => { let _ = self.reload_if_changed(); }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// One `[[token]]` table, as `sallyport-gateway token new` writes it.
#[derive(Debug, Clone, Serialize)]
pub struct TokenEntry {
    pub id: String,
    pub name: String,
    pub groups: Vec<String>,
    /// Protocol v1: the SHA-256 of the secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Protocol v2: the agent's public key (`x25519/…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    #[serde(
        serialize_with = "ser_expires",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires: Option<SystemTime>,
    pub routes: Vec<String>,
}

fn ser_expires<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.collect_str(&humantime::format_rfc3339_seconds(*t)),
        None => s.serialize_none(),
    }
}

/// Appends a `[[token]]` table to the token file, creating it (mode 0600 on unix) if missing.
/// Refuses an id that is already present, and an existing file that does not parse.
pub fn append_token(path: &Path, entry: &TokenEntry) -> Result<(), AuthError> {
    if !valid_id(&entry.id) {
        return Err(AuthError::BadId {
            id: entry.id.clone(),
        });
    }
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => {
            let store = TokenStore::parse(&text, &path.display().to_string())?;
            if store.contains_id(&entry.id) {
                return Err(AuthError::DuplicateId {
                    path: path.to_path_buf(),
                    id: entry.id.clone(),
                });
            }
            Some(text)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(AuthError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };

    #[derive(Serialize)]
    struct One<'a> {
        token: [&'a TokenEntry; 1],
    }
    let table = toml::to_string(&One { token: [entry] })
        .map_err(|e| AuthError::Serialize(e.to_string()))?;
    // The result must still parse (e.g. a bad route would make the whole file unloadable).
    TokenStore::parse(&table, "new token entry")?;
    let mut chunk = String::new();
    match &existing {
        Some(t) if !t.is_empty() => {
            chunk.push_str(if t.ends_with('\n') { "\n" } else { "\n\n" });
        }
        _ => {}
    }
    chunk.push_str(&table);

    let mut opts = std::fs::OpenOptions::new();
    opts.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let io = |source| AuthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(chunk.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Version 2
// ---------------------------------------------------------------------------------------------

/// Reads the issuer key from `path`, or creates it (mode 0600) when the file does not exist.
/// Returns the key and whether it was created.
pub fn load_or_create_issuer(path: &Path) -> Result<(tunnel::token::Issuer, bool), String> {
    use tunnel::token::Issuer;
    let (key, created) = match std::fs::read_to_string(path) {
        Ok(text) => Issuer::from_file_text(&text)
            .map(|k| (k, false))
            .map_err(|e| format!("issuer key file {}: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Issuer::generate();
            crate::dmz::inner::write_private(path, &key.to_file_text())
                .map_err(|e| format!("cannot create issuer key file {}: {e}", path.display()))?;
            (key, true)
        }
        Err(e) => {
            return Err(format!(
                "cannot read issuer key file {}: {e}",
                path.display()
            ))
        }
    };
    // The public half beside it: all a gateway needs (this file, or `v2.issuer_keys`).
    let public = path.with_extension("pub");
    if created || !public.exists() {
        let text = format!(
            "# sallyport token issuer, public key: gateways accept the tokens it signs\n{}\n",
            key.public()
        );
        std::fs::write(&public, text)
            .map_err(|e| format!("cannot write {}: {e}", public.display()))?;
    }
    Ok((key, created))
}

/// What a version 2 token is minted with.
pub struct MintV2<'a> {
    pub kind: tunnel::token::Kind,
    pub id: String,
    pub name: Option<String>,
    pub groups: Vec<String>,
    pub routes: Vec<String>,
    pub expires: Option<SystemTime>,
    pub issuer: &'a tunnel::token::Issuer,
    /// The gateway static keys the token trusts (current, then next).
    pub gateway_keys: Vec<[u8; 32]>,
    pub deployment: Option<String>,
    /// Claim 12: the key the agent accepts renewals from [default: the issuer's].
    pub renewer: Option<tunnel::token::IssuerKey>,
}

/// Mints a version 2 token and appends its public key to the token file at `tokens`: the file
/// never holds anything that lets its reader connect.
pub fn mint_v2(tokens: &Path, m: MintV2<'_>) -> Result<tunnel::token::Token, AuthError> {
    use tunnel::token::{Claims, Token};
    if !valid_id(&m.id) {
        return Err(AuthError::BadId { id: m.id });
    }
    let secs = |t: SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let claims = Claims {
        kind: m.kind,
        id: m.id.clone(),
        name: m.name.clone(),
        groups: m.groups.clone(),
        routes: m.routes.clone(),
        issued_at: secs(SystemTime::now()),
        not_before: None,
        expires: m.expires.map(secs),
        agent_key: [0; 32],
        gateway_keys: m.gateway_keys,
        deployment: m.deployment,
        issuer: m.renewer.map(|k| k.0).unwrap_or([0; 32]),
    };
    let token = Token::mint(m.issuer, claims).map_err(|e| AuthError::Serialize(e.to_string()))?;
    let entry = TokenEntry {
        id: m.id.clone(),
        name: m.name.unwrap_or(m.id),
        groups: m.groups,
        sha256: None,
        public_key: Some(tunnel::inner::PublicKey(token.claims().agent_key).to_string()),
        expires: m.expires,
        routes: m.routes,
    };
    append_token(tokens, &entry)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sallyport-auth-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entry(id: &str, hash: &str, expires: Option<SystemTime>) -> TokenEntry {
        TokenEntry {
            id: id.into(),
            name: "alice".into(),
            groups: vec!["dev".into(), "dba".into()],
            sha256: Some(hash.into()),
            public_key: None,
            expires,
            routes: vec!["db.internal:5432".into(), "*.internal:22".into()],
        }
    }

    #[test]
    fn generate_append_load_verify_round_trip() {
        let dir = temp_dir("roundtrip");
        let path = dir.join("tokens.toml");
        let (tok, hash) = generate("alice-laptop").unwrap();
        let in_a_year = SystemTime::now() + Duration::from_secs(365 * 86400);
        append_token(&path, &entry("alice-laptop", &hash, Some(in_a_year))).unwrap();
        let (tok2, hash2) = generate("ci").unwrap();
        append_token(&path, &entry("ci", &hash2, None)).unwrap();

        let store = TokenStore::load(&path).unwrap();
        assert_eq!(store.len(), 2);
        let id = store
            .verify(&format!("  {}\n", tok.expose()), SystemTime::now())
            .unwrap();
        assert_eq!(id.token_id, "alice-laptop");
        assert_eq!(id.name, "alice");
        assert_eq!(id.groups, ["dev", "dba"]);
        assert_eq!(id.routes[1].to_string(), "*.internal:22");
        assert!(id.expires.is_some());
        assert!(store.is_valid(&id, SystemTime::now()));
        assert_eq!(
            store
                .verify(tok2.expose(), SystemTime::now())
                .unwrap()
                .token_id,
            "ci"
        );

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let dup = append_token(&path, &entry("ci", &hash2, None)).unwrap_err();
        assert!(matches!(dup, AuthError::DuplicateId { .. }), "{dup}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn wrong_secret_unknown_id_and_expired_are_refused_without_leaking() {
        let (tok, hash) = generate("a").unwrap();
        let text = format!(
            "[[token]]\nid = \"a\"\nsha256 = \"{hash}\"\nexpires = \"2020-01-01T00:00:00Z\"\n"
        );
        let store = TokenStore::parse(&text, "t.toml").unwrap();
        let e = store.verify(tok.expose(), SystemTime::now()).unwrap_err();
        assert_eq!(e.client_message(), "token expired");
        let before = humantime::parse_rfc3339("2019-01-01T00:00:00Z").unwrap();
        let id = store.verify(tok.expose(), before).unwrap();
        assert!(!store.is_valid(&id, SystemTime::now()));

        let (other, _) = generate("a").unwrap();
        let e = store.verify(other.expose(), before).unwrap_err();
        assert!(matches!(e, AuthError::WrongSecret { .. }));
        assert_eq!(e.client_message(), "invalid token");
        let secret = other.expose().rsplit('_').next().unwrap();
        assert!(!e.to_string().contains(secret) && !format!("{e:?}").contains(secret));

        let (unknown, _) = generate("b").unwrap();
        let e = store.verify(unknown.expose(), before).unwrap_err();
        assert!(matches!(e, AuthError::UnknownId { .. }));
        assert_eq!(e.client_message(), "invalid token");
    }

    #[test]
    fn malformed_token_strings_are_errors_not_panics() {
        let store = TokenStore::empty("none");
        let good_secret = "a".repeat(64);
        for bad in [
            String::new(),
            "sp_".into(),
            "sp__".into(),
            "token".into(),
            format!("sp_{good_secret}"),
            format!("sp_UPPER_{good_secret}"),
            format!("sp_a_{}", "A".repeat(64)),
            format!("sp_a_{}", "a".repeat(63)),
            format!("sp_a_b_{good_secret}"),
            format!("sp_{}_{good_secret}", "x".repeat(65)),
            "sp_é_ü".into(),
            "Bearer sp_a_b".into(),
        ] {
            let e = store.verify(&bad, SystemTime::now()).unwrap_err();
            assert!(matches!(e, AuthError::Malformed { .. }), "{bad:?}: {e}");
            assert_eq!(e.client_message(), "invalid token");
        }
        assert!(generate("Bad_Id").is_err());
        assert!(generate("").is_err());
    }

    #[test]
    fn debug_and_display_never_show_the_secret() {
        let (tok, hash) = generate("alice-laptop").unwrap();
        let secret = tok.expose().rsplit('_').next().unwrap().to_string();
        assert_eq!(format!("{tok}"), "sp_alice-laptop_****");
        assert_eq!(format!("{tok:?}"), "sp_alice-laptop_****");
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Config {
            token: TokenSecret,
        }
        assert!(!format!("{:?}", Config { token: tok.clone() }).contains(&secret));
        let store = TokenStore::parse(
            &format!("[[token]]\nid = \"alice-laptop\"\nsha256 = \"{hash}\"\n"),
            "t",
        )
        .unwrap();
        let id = store.verify(tok.expose(), SystemTime::now()).unwrap();
        let shown = format!("{id:?} {store:?}");
        assert!(
            !shown.contains(&secret) && !shown.contains(&hash),
            "{shown}"
        );
    }

    #[test]
    fn toml_errors_name_file_line_and_key() {
        let text = "[[token]]\nid = \"a\"\ngroups = 5\nsha256 = \"00\"\n";
        let e = TokenStore::parse(text, "/etc/sallyport/tokens.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/sallyport/tokens.toml line 3, key `groups`:"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");

        let text = format!(
            "[[token]]\nid = \"a\"\nsha256 = \"{}\"\n\n[[token]]\nid = \"b\"\nsha256 = \"xyz\"\n",
            "0".repeat(64)
        );
        let e = TokenStore::parse(&text, "tokens.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("tokens.toml line 7, key `sha256`:"), "{e}");

        let dup = format!(
            "[[token]]\nid = \"a\"\nsha256 = \"{0}\"\n[[token]]\nid = \"a\"\nsha256 = \"{0}\"\n",
            "0".repeat(64)
        );
        let e = TokenStore::parse(&dup, "tokens.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 5") && e.contains("twice"), "{e}");

        let bad_route = format!(
            "[[token]]\nid = \"c\"\nsha256 = \"{}\"\nroutes = [\"db.internal\"]\n",
            "0".repeat(64)
        );
        let e = TokenStore::parse(&bad_route, "tokens.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 4, key `routes`") && e.contains("missing :port"),
            "{e}"
        );

        let bad_exp = format!(
            "[[token]]\nid = \"c\"\nsha256 = \"{}\"\nexpires = \"soon\"\n",
            "0".repeat(64)
        );
        let e = TokenStore::parse(&bad_exp, "tokens.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 4, key `expires`"), "{e}");

        let typo = "[[tokens]]\nid = \"a\"\n";
        let e = TokenStore::parse(typo, "tokens.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("tokens"), "{e}");

        let e = TokenStore::load(Path::new("/nonexistent/tokens.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/tokens.toml") && e.contains("token new"),
            "{e}"
        );
    }

    #[test]
    fn unquoted_toml_datetime_is_accepted_for_expires() {
        let text = format!(
            "[[token]]\nid = \"a\"\nsha256 = \"{}\"\nexpires = 2027-05-01T00:00:00Z\n",
            "0".repeat(64)
        );
        let store = TokenStore::parse(&text, "t").unwrap();
        assert!(store.tokens["a"].expires.is_some());
    }

    #[tokio::test]
    async fn reload_picks_up_a_removed_token_and_keeps_old_store_on_bad_file() {
        let dir = temp_dir("reload");
        let path = dir.join("tokens.toml");
        let (tok_a, hash_a) = generate("a").unwrap();
        let (_, hash_b) = generate("b").unwrap();
        append_token(&path, &entry("a", &hash_a, None)).unwrap();
        append_token(&path, &entry("b", &hash_b, None)).unwrap();

        let store = Arc::new(ReloadingStore::open(&path).unwrap());
        let mut rx = store.subscribe();
        let id_a = store
            .current()
            .verify(tok_a.expose(), SystemTime::now())
            .unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(
            store
                .clone()
                .watch(Duration::from_millis(20), cancel.clone()),
        );

        // A broken file keeps the old tokens.
        std::fs::write(&path, "[[token]\n").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(store.current().is_valid(&id_a, SystemTime::now()));
        assert!(!rx.has_changed().unwrap());

        // Revoke "a" by rewriting the file with only "b".
        std::fs::remove_file(&path).unwrap();
        append_token(&path, &entry("b", &hash_b, None)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let now = rx.borrow_and_update().clone();
        assert!(!now.is_valid(&id_a, SystemTime::now()));
        assert!(now.contains_id("b"));

        cancel.cancel();
        task.await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
