//! The issuer: a connector started with `--renewal-key` answers token renewals (docs/protocol.md,
//! "Renewal") on the reserved destination `issuer.sallyport.invalid:1`, and nothing else: it
//! dials no service. The messages and their checks are `tunnel::renew`; this file adds the
//! stream, the deadline, the admin's "stop renewal" list and the ledger.
//!
//! The ledger (`--ledger`, one line per id: `id current-key previous-key`) holds the last key
//! signed for each id. A request from a key that is neither the current one nor the retry of
//! the last renewal (its answer lost) comes from a superseded token: a copy. It is refused and
//! raises an alarm.

use base64::Engine as _;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};
use tunnel::renew::{self, Answer, Challenge, Request};
use tunnel::token::{Issuer, IssuerKey, Kind};
use tunnel::{ErrorCode, Stream};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The whole exchange, at both ends.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// What the issuer needs.
pub struct IssuerConfig {
    /// The renewal key (`renew.key`): signs renewed tokens; agent tokens name its public half
    /// in claim 12. Gateways accept it for agent tokens only.
    pub key: Issuer,
    /// Keys whose signatures on a presented token are accepted: the admin's issuer
    /// (`issuer.pub`) and the renewal key itself.
    pub accept: Vec<IssuerKey>,
    pub ledger: PathBuf,
    /// Ids whose renewal the admin stopped, one a line; re-read on every request.
    pub no_renew: Option<PathBuf>,
    pub max_lifetime: Duration,
    /// One renewal at a time (the ledger is read, decided and written whole).
    pub(super) lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for IssuerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerConfig")
            .field("key", &self.key)
            .field("ledger", &self.ledger)
            .finish_non_exhaustive()
    }
}

impl IssuerConfig {
    pub fn new(
        key: Issuer,
        accept: Vec<IssuerKey>,
        ledger: PathBuf,
        no_renew: Option<PathBuf>,
        max_lifetime: Duration,
    ) -> IssuerConfig {
        IssuerConfig {
            key,
            accept,
            ledger,
            no_renew,
            max_lifetime,
            lock: tokio::sync::Mutex::new(()),
        }
    }
}

/// One ledger line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub current: [u8; 32],
    pub previous: Option<[u8; 32]>,
}

/// What the ledger says of a request from key `old` for key `new`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The id's current key (or an id not seen yet): renew, and record `new`.
    Renew,
    /// The same request again (its answer was lost): answer again, the ledger stays.
    Retry,
    /// A key the id moved away from: a copied token.
    Copied,
}

pub fn decide(row: Option<&Row>, old: &[u8; 32], new: &[u8; 32]) -> Verdict {
    match row {
        None => Verdict::Renew,
        Some(r) if &r.current == old => Verdict::Renew,
        Some(r) if r.previous.as_ref() == Some(old) && &r.current == new => Verdict::Retry,
        Some(_) => Verdict::Copied,
    }
}

fn key_b64(k: &[u8; 32]) -> String {
    B64.encode(k)
}

fn key_from(s: &str) -> Option<[u8; 32]> {
    B64.decode(s).ok()?.try_into().ok()
}

/// Reads the ledger (missing: empty).
pub fn read_ledger(path: &Path) -> Result<BTreeMap<String, Row>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("ledger {}: {e}", path.display())),
    };
    let mut rows = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        let bad = || {
            format!(
                "ledger {} line {}: expected `ID KEY [PREVIOUS]`",
                path.display(),
                n + 1
            )
        };
        let (id, cur, prev) = match w.as_slice() {
            [id, cur] => (*id, key_from(cur).ok_or_else(bad)?, None),
            [id, cur, prev] => (
                *id,
                key_from(cur).ok_or_else(bad)?,
                Some(key_from(prev).ok_or_else(bad)?),
            ),
            _ => return Err(bad()),
        };
        rows.insert(
            id.to_string(),
            Row {
                current: cur,
                previous: prev,
            },
        );
    }
    Ok(rows)
}

/// Writes the ledger whole, atomically, 0600.
pub fn write_ledger(path: &Path, rows: &BTreeMap<String, Row>) -> std::io::Result<()> {
    let mut text = String::from(
        "# sallyport issuer ledger: the last key signed for each agent id (public keys only)\n",
    );
    for (id, r) in rows {
        text.push_str(id);
        text.push(' ');
        text.push_str(&key_b64(&r.current));
        if let Some(p) = &r.previous {
            text.push(' ');
            text.push_str(&key_b64(p));
        }
        text.push('\n');
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    crate::dmz::inner::write_private(&tmp, &text)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn stopped(list: Option<&Path>, id: &str) -> Result<bool, String> {
    let Some(path) = list else {
        return Ok(false);
    };
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .any(|l| l == id)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        // Fail closed: the admin said "stop" somewhere we cannot read.
        Err(e) => Err(format!("no-renew list {}: {e}", path.display())),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Decides on a verified-proof request: the checks in the order of docs/protocol.md. `Err` is
/// the reason told to the agent (and logged).
fn check(cfg: &IssuerConfig, req: &Request, stamped_id: &str, now: u64) -> Result<(), String> {
    req.signed
        .verify(&cfg.accept)
        .map_err(|_| "the token is not signed by this deployment's issuer".to_string())?;
    let c = req.signed.claims();
    if c.kind != Kind::Agent {
        return Err("only agent tokens are renewed".into());
    }
    if c.issuer != cfg.key.public().0 {
        return Err("the token names another renewal key".into());
    }
    if c.id != stamped_id {
        return Err("the token is not the one this session was authenticated with".into());
    }
    let Some(exp) = c.expires else {
        return Err("the token does not expire".into());
    };
    if exp <= now {
        return Err("the token has expired".into());
    }
    if exp.saturating_sub(now) > exp.saturating_sub(c.issued_at) / 2 {
        return Err("too early: renewal starts when a third of the lifetime is left".into());
    }
    if stopped(cfg.no_renew.as_deref(), &c.id)? {
        return Err("renewal was stopped for this token by the admin".into());
    }
    Ok(())
}

/// Answers one renewal stream.
pub(super) async fn serve(cfg: &IssuerConfig, mut stream: Stream, stamped_id: &str) {
    stream.accept();
    let outcome = tokio::time::timeout(DEADLINE, exchange(cfg, &mut stream, stamped_id)).await;
    match outcome {
        Ok(Ok(what)) => {
            info!(target: "audit", event = "renewal", token = %stamped_id, %what, "renewal")
        }
        Ok(Err(why)) => {
            warn!(target: "audit", event = "renewal", token = %stamped_id, %why, "renewal refused");
        }
        Err(_) => {
            warn!(target: "audit", event = "renewal", token = %stamped_id, "renewal timed out");
            stream.reset(ErrorCode::Cancel, "renewal timed out");
        }
    }
}

async fn exchange(
    cfg: &IssuerConfig,
    stream: &mut Stream,
    stamped_id: &str,
) -> Result<String, String> {
    let e = tunnel::inner::KeyPair::generate();
    let io = |e: std::io::Error| format!("stream: {e}");
    stream
        .write_all(&renew::frame(&Challenge::new(&cfg.key, &e).encode()))
        .await
        .map_err(io)?;
    let body = renew::read_message(stream).await?;
    let req = Request::decode(&body).map_err(|e| e.to_string())?;
    let answer = match decide_and_sign(cfg, &e, &req, stamped_id).await {
        Ok((answer, what)) => {
            stream
                .write_all(&renew::frame(&answer.encode()))
                .await
                .map_err(io)?;
            Ok(what)
        }
        Err(why) => {
            let _ = stream
                .write_all(&renew::frame(&Answer::Refused(why.clone()).encode()))
                .await;
            Err(why)
        }
    };
    // Wait for the agent to have read it (it ends the stream): dropping ours first would
    // reset the stream, and a reset may overtake the answer.
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 64];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
    answer
}

async fn decide_and_sign(
    cfg: &IssuerConfig,
    e: &tunnel::inner::KeyPair,
    req: &Request,
    stamped_id: &str,
) -> Result<(Answer, String), String> {
    // The proof first: without the secret, nothing else is looked at.
    req.verify_proof(e).map_err(|e| e.to_string())?;
    let now = now_secs();
    check(cfg, req, stamped_id, now)?;
    let c = req.signed.claims();
    let _one = cfg.lock.lock().await;
    let mut rows = read_ledger(&cfg.ledger)?;
    let verdict = decide(rows.get(&c.id), &c.agent_key, &req.new_pub);
    if verdict == Verdict::Copied {
        warn!(target: "audit", event = "alarm", token = %c.id, "copied token: a renewal from a key this id has moved away from (revoke the id and re-issue it)");
        return Err("this token was already renewed elsewhere (a copy?); ask your admin".into());
    }
    let claims = renew::renewed_claims(c, req.new_pub, now, cfg.max_lifetime.as_secs());
    let signed = renew::sign(&cfg.key, &claims).map_err(|e| e.to_string())?;
    if verdict == Verdict::Renew {
        rows.insert(
            c.id.clone(),
            Row {
                current: req.new_pub,
                previous: Some(c.agent_key),
            },
        );
        // Before the answer leaves: a renewal the ledger does not know would look like a copy.
        write_ledger(&cfg.ledger, &rows)
            .map_err(|e| format!("ledger {}: {e}", cfg.ledger.display()))?;
    }
    let what = format!(
        "{} until {}",
        if verdict == Verdict::Retry {
            "renewed again (retry)"
        } else {
            "renewed"
        },
        humantime::format_rfc3339_seconds(
            UNIX_EPOCH + Duration::from_secs(claims.expires.unwrap_or(0))
        )
    );
    Ok((Answer::Renewed(Box::new(signed)), what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_tells_a_renewal_a_retry_and_a_copy_apart() {
        let (a, b, c) = ([1; 32], [2; 32], [3; 32]);
        assert_eq!(decide(None, &a, &b), Verdict::Renew);
        let row = Row {
            current: b,
            previous: Some(a),
        };
        assert_eq!(decide(Some(&row), &b, &c), Verdict::Renew);
        assert_eq!(decide(Some(&row), &a, &b), Verdict::Retry);
        // The superseded token asks for another key: whoever holds it is not the owner.
        assert_eq!(decide(Some(&row), &a, &c), Verdict::Copied);
        assert_eq!(decide(Some(&row), &c, &b), Verdict::Copied);
    }

    #[test]
    fn the_ledger_round_trips_and_refuses_garbage() {
        let dir = std::env::temp_dir().join(format!("sp-ledger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ledger");
        let mut rows = BTreeMap::new();
        rows.insert(
            "alice".to_string(),
            Row {
                current: [9; 32],
                previous: Some([8; 32]),
            },
        );
        rows.insert(
            "bob".to_string(),
            Row {
                current: [7; 32],
                previous: None,
            },
        );
        write_ledger(&p, &rows).unwrap();
        assert_eq!(read_ledger(&p).unwrap(), rows);
        std::fs::write(&p, "alice not-base64\n").unwrap();
        assert!(read_ledger(&p).unwrap_err().contains("line 1"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
