//! The gateway's side of the inner channel (`tunnel::inner`): the key file, the handshake on a
//! carrier (a WebSocket, or the HTTP transport's create request), and the token check that
//! happens inside the channel, where a TLS-inspecting proxy cannot read it.

use super::limits::CountGuard;
use super::upgrade::{count_session, verify_token};
use super::Shared;
use crate::auth::Identity;
use std::net::SocketAddr;
use std::path::Path;
use tracing::{debug, info};
use tunnel::inner::{self, InnerRx, InnerTransport, InnerTx, Joined, KeyPair};
use tunnel::{Transport, TransportRx, TransportTx};

/// Reads the inner key from `path`, or creates it (mode 0600) when the file does not exist.
/// Returns the key and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(KeyPair, bool), String> {
    match std::fs::read_to_string(path) {
        Ok(text) => KeyPair::from_file_text(&text)
            .map(|k| (k, false))
            .map_err(|e| format!("inner key file {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate();
            write_private(path, &key.to_file_text())
                .map_err(|e| format!("cannot create inner key file {}: {e}", path.display()))?;
            Ok((key, true))
        }
        Err(e) => Err(format!(
            "cannot read inner key file {}: {e}",
            path.display()
        )),
    }
}

pub(crate) fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// What the gateway answers to a hello it cannot complete: its own key, so the agent can show
/// both fingerprints side by side.
pub fn mismatch_text(key: &KeyPair) -> String {
    format!(
        "{} {}; the agent's pinned key differs (compare with `sallyport-gateway inner-key`; re-enroll only if the gateway's key really changed)",
        inner::KEY_MISMATCH,
        key.public()
    )
}

/// Runs the responder's handshake on `carrier` (whose first message is the agent's hello),
/// by `deadline` (the connection's handshake deadline, shared with [`authenticate`]).
/// `None` when it failed; the agent was told why.
pub(crate) async fn handshake<T: Transport>(
    shared: &Shared,
    carrier: T,
    deadline: tokio::time::Instant,
) -> Option<InnerTransport<Joined<T::Tx, T::Rx>>> {
    let (mut tx, mut rx) = carrier.split();
    let first = match tokio::time::timeout_at(deadline, rx.recv()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) | Ok(Err(_)) => {
            debug!("agent left before its inner hello");
            return None;
        }
        Err(_) => {
            debug!("no inner hello within the handshake deadline");
            return None;
        }
    };
    let Some(key) = &shared.config.inner_key else {
        let _ = tx
            .send(inner::refusal(
                "this gateway has no inner key configured (inner_key in its config)",
            ))
            .await;
        let _ = tx.flush().await;
        return None;
    };
    match inner::respond(key, &first) {
        Ok(accepted) => {
            if tx.send(accepted.reply).await.is_err() || tx.flush().await.is_err() {
                return None;
            }
            Some(InnerTransport::new(Joined(tx, rx), accepted.cipher))
        }
        Err(e) => {
            info!(error = %e, "inner handshake refused");
            let _ = tx.send(inner::refusal(&mismatch_text(key))).await;
            let _ = tx.flush().await;
            None
        }
    }
}

/// The sealed transport of an agent session that authenticated inside the channel.
pub(crate) type Authenticated<T> = (
    Joined<InnerTx<<T as Transport>::Tx>, InnerRx<<T as Transport>::Rx>>,
    Identity,
    CountGuard<String>,
);

/// Reads the agent's token inside the channel (by `deadline`), checks it and counts the
/// session; the agent hears `OK` or the reason (the same one-liners as the plain upgrade's
/// 401/429).
pub(crate) async fn authenticate<T: Transport>(
    shared: &Shared,
    t: InnerTransport<T>,
    client: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<Authenticated<T>> {
    let (mut tx, mut rx) = t.split();
    let token = match tokio::time::timeout_at(deadline, inner::read_auth(&mut rx)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            info!(error = %e, "inner channel: no valid AUTH");
            return None;
        }
        Err(_) => {
            debug!("inner channel: no AUTH within the handshake deadline");
            return None;
        }
    };
    if !shared.config.v2.v1_open(std::time::SystemTime::now()) {
        inner::refuse_auth(&mut tx, 426, super::v2::V1_CLOSED).await;
        return None;
    }
    let id = match verify_token(shared, &token, client, true) {
        Ok(id) => id,
        Err(msg) => {
            inner::refuse_auth(&mut tx, 401, msg).await;
            return None;
        }
    };
    let Some(slot) = count_session(shared, &id, true, client) else {
        inner::refuse_auth(&mut tx, 429, "too many sessions for this token").await;
        return None;
    };
    if inner::accept_auth(&mut tx).await.is_err() {
        return None;
    }
    Some((Joined(tx, rx), id, slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_key_file_is_created_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("sp-inner-{}", std::process::id()));
        let path = dir.join("inner.key");
        let _ = std::fs::remove_file(&path);
        let (made, created) = load_or_create(&path).unwrap();
        assert!(created);
        let (again, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(made.public(), again.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "inner key readable by others: {mode:o}");
        }
        std::fs::write(&path, "nonsense").unwrap();
        let err = load_or_create(&path).unwrap_err();
        assert!(err.contains("inner.key"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
