//! Renews the agent's version 2 token before it expires, over its own session, so that a fleet
//! does not break when its tokens reach their expiry (docs/protocol.md, "Renewal").
//!
//! When less than a third of the token's lifetime is left (plus a little jitter, so a fleet
//! minted together does not renew together), the agent opens a stream to the issuer's reserved
//! destination, makes a **new secret on the desktop** (only its public key leaves), proves it
//! holds the current one, and takes the answer only when the renewal key its token names signed
//! it (`tunnel::renew`). The new token is written where the old one came from (the 0600 file,
//! replaced atomically, or the OS keychain entry) and used from the next session on.
//!
//! The new secret is kept in `<token file>.renewing` (0600) before the request leaves: if the
//! answer is lost, the next attempt asks for the same key, which the issuer answers again
//! instead of taking it for a copied token.

use crate::config::{AgentConfig, TokenHome};
use crate::enroll::replace_private;
use crate::pool::Pool;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tunnel::renew::{self, Answer, Challenge, Request};
use tunnel::token::{IssuerKey, Token};

/// The whole exchange.
const DEADLINE: Duration = Duration::from_secs(10);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seconds to wait before the next attempt: until `due_at`, plus up to 10 % of the lifetime (at
/// most 10 minutes) of jitter.
fn wait_for(token: &Token, now: u64, jitter: f64) -> Option<u64> {
    let c = token.claims();
    let at = renew::due_at(c)?;
    let life = c.expires?.saturating_sub(c.issued_at);
    let spread = (life / 10).min(600) as f64;
    Some(at.saturating_sub(now) + (spread * jitter) as u64)
}

/// After a failed attempt: a tenth of the lifetime, between 5 s and an hour.
fn retry_after(token: &Token) -> Duration {
    let c = token.claims();
    let life = c.expires.unwrap_or(0).saturating_sub(c.issued_at);
    Duration::from_secs((life / 10).clamp(5, 3600))
}

/// Keeps renewing until `shutdown`; returns at once for a v1 token or one that cannot be
/// written back.
pub async fn run(pool: Arc<Pool>, config: Arc<AgentConfig>, shutdown: CancellationToken) {
    let Some(cell) = config.v2.clone() else {
        return;
    };
    if config.token_home == TokenHome::Nowhere {
        info!(
            source = %config.token_source,
            "this token cannot be written back, so it is not renewed: use --token-file or `sallyport enroll`"
        );
        return;
    }
    let mut last_error: Option<String> = None;
    loop {
        let token = cell.get();
        let Some(wait) = wait_for(&token, now_secs(), rand::random::<f64>()) else {
            return;
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
        }
        match attempt(&pool, &config, &token).await {
            Ok(new) => {
                let c = new.claims();
                info!(
                    token = %c.id,
                    expires = %humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(c.expires.unwrap_or(0))),
                    "token renewed; the next session uses it"
                );
                cell.set(new);
                last_error = None;
            }
            Err(e) => {
                if last_error.as_deref() != Some(e.as_str()) {
                    warn!(token = %token.claims().id, "token renewal failed (the token works until it expires; trying again later): {e}");
                    last_error = Some(e);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry_after(&token)) => {}
                }
            }
        }
    }
}

/// The pending secret's file, beside the token file.
fn pending_path(file: &Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".renewing");
    PathBuf::from(p)
}

/// The secret of a renewal whose answer may have been lost, or a fresh one, saved (0600) before
/// it is used.
fn pending_secret(home: &TokenHome) -> Result<[u8; 32], String> {
    if let TokenHome::File(f) = home {
        let p = pending_path(f);
        if let Ok(text) = std::fs::read_to_string(&p) {
            if let Some(s) = hex::decode(text.trim())
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
            {
                return Ok(s);
            }
        }
    }
    let mut s = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut s);
    if let TokenHome::File(f) = home {
        // Also proves the token's folder is writable before anything is asked.
        replace_private(&pending_path(f), &hex::encode(s))
            .map_err(|e| format!("cannot write beside the token file {}: {e}", f.display()))?;
    }
    Ok(s)
}

async fn attempt(pool: &Pool, config: &AgentConfig, token: &Token) -> Result<Token, String> {
    let session = pool.session(Duration::from_secs(30)).await?;
    let mut stream = session
        .open(
            tunnel::Dest::new(renew::HOST, renew::PORT),
            tunnel::Meta::default(),
        )
        .map_err(|e| e.to_string())?;
    let secret = pending_secret(&config.token_home)?;
    let new = tokio::time::timeout(DEADLINE, async {
        stream
            .opened()
            .await
            .map_err(|e| format!("the gateway offers no renewal here: {e}"))?;
        let ch = Challenge::decode(&renew::read_message(&mut stream).await?)
            .map_err(|e| e.to_string())?;
        ch.verify(&IssuerKey(token.claims().issuer))
            .map_err(|e| e.to_string())?;
        let req = Request::new(token, &secret, &ch);
        stream
            .write_all(&renew::frame(&req.encode()))
            .await
            .map_err(|e| format!("stream: {e}"))?;
        match Answer::decode(&renew::read_message(&mut stream).await?).map_err(|e| e.to_string())? {
            Answer::Renewed(signed) => {
                renew::accept(token, secret, *signed).map_err(|e| e.to_string())
            }
            Answer::Refused(why) => Err(format!("the issuer refused: {why}")),
        }
    })
    .await
    .map_err(|_| "the issuer did not answer within 10 s".to_string())??;
    save(&config.token_home, &new)?;
    Ok(new)
}

/// Writes the renewed token where the old one came from, then forgets the pending secret.
fn save(home: &TokenHome, token: &Token) -> Result<(), String> {
    match home {
        TokenHome::File(f) => {
            replace_private(f, &format!("{}\n", token.expose()))
                .map_err(|e| format!("cannot write the renewed token to {}: {e}", f.display()))?;
            let _ = std::fs::remove_file(pending_path(f));
            Ok(())
        }
        TokenHome::Keychain(gw) => {
            if crate::enroll::keychain_replace(gw, &token.expose()) {
                Ok(())
            } else {
                Err(format!(
                    "cannot store the renewed token in the OS keychain (entry for {gw})"
                ))
            }
        }
        TokenHome::Nowhere => Err("nowhere to write the renewed token".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel::token::{Claims, Issuer, Kind};

    fn token(issued: u64, life: u64) -> Token {
        Token::mint(
            &Issuer::generate(),
            Claims {
                kind: Kind::Agent,
                id: "a".into(),
                name: None,
                groups: vec![],
                routes: vec![],
                issued_at: issued,
                not_before: None,
                expires: Some(issued + life),
                agent_key: [0; 32],
                gateway_keys: vec![[7; 32]],
                deployment: None,
                issuer: [0; 32],
            },
        )
        .unwrap()
    }

    #[test]
    fn renewal_waits_for_two_thirds_of_the_lifetime_with_bounded_jitter() {
        let t = token(1_000, 90 * 86_400);
        assert_eq!(wait_for(&t, 1_000, 0.0), Some(60 * 86_400));
        assert_eq!(wait_for(&t, 1_000, 1.0), Some(60 * 86_400 + 600));
        // Overdue: at once (plus jitter).
        assert_eq!(wait_for(&t, 1_000 + 80 * 86_400, 0.0), Some(0));
        let short = token(1_000, 30);
        assert_eq!(wait_for(&short, 1_000, 1.0), Some(20 + 3));
        assert_eq!(retry_after(&short), Duration::from_secs(5));
        assert_eq!(retry_after(&t), Duration::from_secs(3600));
    }

    #[test]
    fn a_lost_answer_is_retried_with_the_same_desktop_made_secret() {
        let dir = std::env::temp_dir().join(format!("sp-renew-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let home = TokenHome::File(dir.join("agent.token"));
        let first = pending_secret(&home).unwrap();
        assert_eq!(pending_secret(&home).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("agent.token.renewing"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
