//! The signed revocation list (`[v2] revoked`): token ids no instance accepts any more, signed by
//! the issuer on the admin host (`sallyport-gateway token revoke`), with a serial that only
//! grows and a signing time after which the list is stale (docs/protocol.md, "the signed
//! revocation list").
//!
//! ```text
//! # sallyport revocation list (signed: edit it only with `sallyport-gateway token revoke`)
//! serial 42
//! signed-at 2026-12-05T10:00:00Z
//! revoke alice-laptop
//! revoke bob-desktop before 2026-12-01T00:00:00Z
//! signature ed25519/<base64 of 64 bytes>
//! ```
//!
//! The signature covers `"sallyport revocation v2\0"` and every byte before the `signature` line.

use crate::auth::{AuthError, Loaded};
use base64::Engine as _;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tunnel::token::{valid_id, Issuer, IssuerKey};

/// The signature context: a list signature never passes for a token's, and back.
pub const CONTEXT: &[u8] = b"sallyport revocation v2\0";

const HEADER: &str =
    "# sallyport revocation list (signed: edit it only with `sallyport-gateway token revoke`)\n";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What the list says of one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// Every token of the id.
    All,
    /// Tokens issued (claim 6) before this time, in Unix seconds (a renewal supersedes them).
    Before(u64),
}

/// A verified list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RevocationList {
    pub serial: u64,
    /// Unix seconds.
    pub signed_at: u64,
    pub entries: BTreeMap<String, Revocation>,
}

/// Why a list was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("no `signature ed25519/…` line: the list is unsigned; write it with `sallyport-gateway token revoke --list FILE --issuer-key issuer.key` (with no --id to sign the ids it has)")]
    Unsigned,
    #[error("the signature is not from an accepted issuer key (v2.issuer_keys / issuer.pub), or the list was changed after signing")]
    BadSignature,
    #[error("serial {new} is lower than serial {current} in force (a rolled-back list): keeping serial {current}")]
    Rollback { new: u64, current: u64 },
    #[error("signed-at {signed_at} lies in the future (a list that would never go stale): check the admin host's clock and re-sign")]
    Future { signed_at: String },
    #[error("serial {serial} is in force with other contents: a new list needs a higher serial (sign it with `token revoke`)")]
    SameSerial { serial: u64 },
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn time_text(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn parse_time(s: &str) -> Option<u64> {
    humantime::parse_rfc3339(s).ok().map(unix)
}

impl RevocationList {
    /// Whether a token of `id` issued at `issued_at` (claim 6; 0 when unknown) is revoked.
    pub fn revokes(&self, id: &str, issued_at: u64) -> bool {
        match self.entries.get(id) {
            Some(Revocation::All) => true,
            Some(Revocation::Before(t)) => issued_at < *t,
            None => false,
        }
    }

    /// How long ago it was signed (zero for a date in the future).
    pub fn age(&self, now: SystemTime) -> Duration {
        Duration::from_secs(unix(now).saturating_sub(self.signed_at))
    }

    /// The signed text of this list (serial and time as they are).
    pub fn sign(&self, issuer: &Issuer) -> String {
        let mut body = String::from(HEADER);
        body.push_str(&format!("serial {}\n", self.serial));
        body.push_str(&format!("signed-at {}\n", time_text(self.signed_at)));
        for (id, r) in &self.entries {
            match r {
                Revocation::All => body.push_str(&format!("revoke {id}\n")),
                Revocation::Before(t) => {
                    body.push_str(&format!("revoke {id} before {}\n", time_text(*t)))
                }
            }
        }
        let sig = issuer.sign_in(CONTEXT, body.as_bytes());
        body.push_str(&format!("signature ed25519/{}\n", B64.encode(sig)));
        body
    }

    /// Adds (or widens) an entry: `All` wins over `Before`, and a later `Before` over an
    /// earlier one.
    pub fn add(&mut self, id: &str, r: Revocation) {
        let merged = match (self.entries.get(id), r) {
            (Some(Revocation::All), _) | (_, Revocation::All) => Revocation::All,
            (Some(Revocation::Before(a)), Revocation::Before(b)) => Revocation::Before((*a).max(b)),
            (None, b) => b,
        };
        self.entries.insert(id.to_string(), merged);
    }

    /// Drops `before` entries that no token can be under any more: those issued before `t` have
    /// all expired when `t` lies more than `max_lifetime` in the past.
    pub fn prune(&mut self, now: SystemTime, max_lifetime: Duration) {
        let horizon = unix(now).saturating_sub(max_lifetime.as_secs());
        self.entries
            .retain(|_, r| !matches!(r, Revocation::Before(t) if *t <= horizon));
    }

    /// Parses and verifies `text` against the accepted `issuers`.
    pub fn parse(text: &str, issuers: &[IssuerKey]) -> Result<RevocationList, ListError> {
        let Some(at) = text
            .match_indices("signature ")
            .map(|(i, _)| i)
            .find(|i| *i == 0 || text.as_bytes()[i - 1] == b'\n')
        else {
            return Err(ListError::Unsigned);
        };
        let (body, sig_line) = text.split_at(at);
        let sig_line_no = body.lines().count() + 1;
        let sig_text = sig_line.lines().next().unwrap_or("").trim_end();
        if sig_line.lines().skip(1).any(|l| !l.trim().is_empty()) {
            return Err(ListError::Line {
                line: sig_line_no + 1,
                why: "nothing may follow the signature line".into(),
            });
        }
        let sig: [u8; 64] = sig_text
            .strip_prefix("signature ed25519/")
            .and_then(|b| B64.decode(b.trim()).ok())
            .and_then(|v| v.try_into().ok())
            .ok_or(ListError::Line {
                line: sig_line_no,
                why: "write the signature as `signature ed25519/<base64 of 64 bytes>`".into(),
            })?;
        if !tunnel::token::signed_by(issuers, CONTEXT, body.as_bytes(), &sig) {
            return Err(ListError::BadSignature);
        }
        // Signed: now read what it says (strictly; the issuer's own tool wrote it).
        let mut list = RevocationList::default();
        let (mut serial, mut signed_at) = (None, None);
        for (n, raw) in body.lines().enumerate() {
            let line = raw.trim();
            let bad = |why: &str| ListError::Line {
                line: n + 1,
                why: why.to_string(),
            };
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["serial", s] => {
                    serial = Some(s.parse().map_err(|_| bad("serial: a whole number"))?)
                }
                ["signed-at", t] => {
                    signed_at =
                        Some(parse_time(t).ok_or_else(|| bad("signed-at: an RFC 3339 time"))?)
                }
                ["revoke", id, rest @ ..] => {
                    if !valid_id(id) {
                        return Err(bad("not a token id (1-64 of a-z, 0-9, '-')"));
                    }
                    let r = match rest {
                        [] => Revocation::All,
                        ["before", t] => Revocation::Before(
                            parse_time(t).ok_or_else(|| bad("before: an RFC 3339 time"))?,
                        ),
                        _ => return Err(bad("write `revoke ID` or `revoke ID before TIME`")),
                    };
                    if list.entries.contains_key(*id) {
                        return Err(bad("the id is listed twice"));
                    }
                    list.entries.insert(id.to_string(), r);
                }
                _ => return Err(bad("expected `serial`, `signed-at` or `revoke`")),
            }
        }
        list.serial = serial.ok_or(ListError::Line {
            line: 1,
            why: "no `serial` line".into(),
        })?;
        list.signed_at = signed_at.ok_or(ListError::Line {
            line: 1,
            why: "no `signed-at` line".into(),
        })?;
        Ok(list)
    }

    /// Whether `self` may replace `current`: a higher serial, or the same list again.
    pub fn may_replace(&self, current: &RevocationList) -> Result<(), ListError> {
        if self.serial < current.serial {
            return Err(ListError::Rollback {
                new: self.serial,
                current: current.serial,
            });
        }
        if self.serial == current.serial && self != current {
            return Err(ListError::SameSerial {
                serial: self.serial,
            });
        }
        Ok(())
    }

    /// Changes the list in `path` (created when missing) with `change`, then signs it with the
    /// next serial and the time `now`. Under an exclusive lock on `PATH.lock`, re-reading the
    /// file first, so two writers (two admins, or cron and an admin) never lose each other's
    /// entries; the file is replaced atomically, so a reloading instance never reads half a list.
    pub fn update(
        path: &Path,
        issuer: &Issuer,
        now: SystemTime,
        change: impl FnOnce(&mut RevocationList),
    ) -> Result<RevocationList, String> {
        let lock_path = path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        lock.lock()
            .map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
        let mut list = match std::fs::read_to_string(path) {
            Ok(text) => RevocationList::parse(&text, &[issuer.public()])
                .map_err(|e| format!("revocation list {}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RevocationList::default(),
            Err(e) => return Err(format!("revocation list {}: {e}", path.display())),
        };
        change(&mut list);
        list.serial += 1;
        list.signed_at = unix(now);
        let text = list.sign(issuer);
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(list)
    }
}

/// How far in the future a list's `signed-at` may lie (clocks differ a little): a list dated
/// later would never go stale.
const SKEW: u64 = 300;

impl Loaded for RevocationList {
    const WHAT: &'static str = "revocation list";
    type Ctx = Vec<IssuerKey>;
    fn load(
        path: &Path,
        issuers: &Vec<IssuerKey>,
        current: Option<&Self>,
    ) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::RevocationList {
            path: path.to_path_buf(),
            source,
        })?;
        let now = unix(SystemTime::now());
        let list = RevocationList::parse(&text, issuers).and_then(|l| {
            if l.signed_at > now + SKEW {
                return Err(ListError::Future {
                    signed_at: time_text(l.signed_at),
                });
            }
            if let Some(c) = current {
                l.may_replace(c)?;
            }
            Ok(l)
        });
        list.map_err(|e| AuthError::SignedList {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
    }
    fn entries(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> RevocationList {
        let mut l = RevocationList {
            serial: 7,
            signed_at: 1_800_000_000,
            ..Default::default()
        };
        l.add("alice-laptop", Revocation::All);
        l.add("bob-desktop", Revocation::Before(1_790_000_000));
        l
    }

    #[test]
    fn a_signed_list_round_trips_and_says_what_it_revokes() {
        let issuer = Issuer::generate();
        let text = list().sign(&issuer);
        let back = RevocationList::parse(&text, &[issuer.public()]).unwrap();
        assert_eq!(back, list());
        assert!(back.revokes("alice-laptop", u64::MAX));
        assert!(back.revokes("bob-desktop", 1_789_999_999));
        assert!(!back.revokes("bob-desktop", 1_790_000_000));
        assert!(!back.revokes("carol", 0));
    }

    #[test]
    fn an_edited_list_fails_its_signature_even_in_a_comment() {
        let issuer = Issuer::generate();
        let text = list().sign(&issuer);
        for edited in [
            text.replace("revoke alice-laptop\n", ""),
            text.replace("serial 7", "serial 8"),
            text.replace("# sallyport", "#  sallyport"),
        ] {
            assert!(matches!(
                RevocationList::parse(&edited, &[issuer.public()]),
                Err(ListError::BadSignature)
            ));
        }
        let other = Issuer::generate();
        assert!(matches!(
            RevocationList::parse(&text, &[other.public()]),
            Err(ListError::BadSignature)
        ));
    }

    #[test]
    fn a_token_signature_never_passes_for_a_list() {
        let issuer = Issuer::generate();
        let body = format!("{HEADER}serial 9\nsigned-at 2027-01-01T00:00:00Z\n");
        let sig = issuer.sign(body.as_bytes()); // the token context
        let text = format!("{body}signature ed25519/{}\n", B64.encode(sig));
        assert!(matches!(
            RevocationList::parse(&text, &[issuer.public()]),
            Err(ListError::BadSignature)
        ));
    }

    #[test]
    fn an_unsigned_plain_list_is_refused_with_how_to_sign_it() {
        let e = RevocationList::parse("alice-laptop\n", &[]).unwrap_err();
        assert!(e.to_string().contains("token revoke"), "{e}");
    }

    #[test]
    fn a_rolled_back_list_is_refused() {
        let old = list();
        let mut new = list();
        new.serial = 8;
        new.add("carol", Revocation::All);
        assert!(new.may_replace(&old).is_ok());
        assert!(matches!(
            old.may_replace(&new),
            Err(ListError::Rollback { new: 7, current: 8 })
        ));
        let mut same_serial = list();
        same_serial.entries.clear();
        assert!(matches!(
            same_serial.may_replace(&old),
            Err(ListError::SameSerial { .. })
        ));
        assert!(list().may_replace(&old).is_ok());
    }

    #[test]
    fn garbage_never_panics() {
        let issuer = Issuer::generate();
        let text = list().sign(&issuer);
        for cut in 0..text.len() {
            let _ = RevocationList::parse(&text[..cut], &[issuer.public()]);
        }
        let _ = RevocationList::parse("signature ", &[issuer.public()]);
        let _ = RevocationList::parse("\nsignature ed25519/!!", &[issuer.public()]);
    }

    #[test]
    fn add_widens_and_prune_drops_only_what_cannot_matter() {
        let mut l = list();
        l.add("bob-desktop", Revocation::Before(1_795_000_000));
        assert_eq!(l.entries["bob-desktop"], Revocation::Before(1_795_000_000));
        l.add("bob-desktop", Revocation::Before(1_700_000_000));
        assert_eq!(l.entries["bob-desktop"], Revocation::Before(1_795_000_000));
        let now = UNIX_EPOCH + Duration::from_secs(1_795_000_000 + 91 * 86_400);
        l.prune(now, Duration::from_secs(90 * 86_400));
        assert!(!l.entries.contains_key("bob-desktop"));
        assert!(l.entries.contains_key("alice-laptop"));
    }
}
