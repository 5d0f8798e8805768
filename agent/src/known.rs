//! Destinations that opened lately, so that a SOCKS5 or HTTP `CONNECT` client asking for one of
//! them again is answered at once instead of after the far end's confirmation.
//!
//! A confirmed open costs the app a round trip through the DMZ to the connector, and the
//! connector's own connect to the service, before it may send its first byte (a TLS
//! `ClientHello`, an SSH banner). Forwards never paid it: their bytes leave with the `OPEN`. A
//! destination that opened within [`KNOWN_FOR`] is very likely to open again, so its next
//! SOCKS5 or `CONNECT` client gets its success reply at once and its first bytes travel with the
//! `OPEN` too (`OpenMode::Early`). What that costs: should the destination refuse after all, the
//! app sees its connection reset instead of the reply code that names why, and the destination
//! is forgotten, so the next client gets the code. A destination never seen, refused, or not
//! confirmed for [`KNOWN_FOR`] is confirmed first, as before.
//!
//! No sockets and no clock here: `now` is passed in. The set is bounded ([`KNOWN_MAX`]): a
//! client cannot grow the agent's memory with names.

use socks::Target;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a confirmed open vouches for its destination.
pub const KNOWN_FOR: Duration = Duration::from_secs(300);

/// Most destinations remembered (a few hundred KiB with the longest names).
pub const KNOWN_MAX: usize = 1024;

/// The destinations that opened within [`KNOWN_FOR`] and were not refused since.
#[derive(Debug, Default)]
pub struct KnownTargets {
    /// Host (lower case) and port → when the far end last confirmed an open.
    opened: Mutex<HashMap<(String, u16), Instant>>,
}

fn key(t: &Target) -> (String, u16) {
    (t.host.to_ascii_lowercase(), t.port)
}

impl KnownTargets {
    /// Whether `t` opened within [`KNOWN_FOR`] of `now`, with no refusal since.
    pub fn is_known(&self, t: &Target, now: Instant) -> bool {
        let map = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&key(t))
            .is_some_and(|at| now.saturating_duration_since(*at) < KNOWN_FOR)
    }

    /// The far end confirmed an open to `t` at `now`. When the set is full, expired entries go,
    /// and if none has, the oldest.
    pub fn opened(&self, t: &Target, now: Instant) {
        let mut map = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        let k = key(t);
        if !map.contains_key(&k) && map.len() >= KNOWN_MAX {
            map.retain(|_, at| now.saturating_duration_since(*at) < KNOWN_FOR);
            if map.len() >= KNOWN_MAX {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    map.remove(&oldest);
                }
            }
        }
        map.insert(k, now);
    }

    /// An open to `t` failed (the dial itself, or its `OPEN` was refused afterwards): the next
    /// client to `t` is confirmed first, and gets the reply code.
    pub fn failed(&self, t: &Target) {
        let mut map = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&key(t));
    }

    /// How many destinations are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.opened.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(host: &str, port: u16) -> Target {
        Target::new(host.to_string(), port)
    }

    #[test]
    fn a_destination_is_known_only_after_a_confirmed_open_and_until_it_fails() {
        let k = KnownTargets::default();
        let now = Instant::now();
        assert!(!k.is_known(&t("db.internal", 5432), now));
        k.opened(&t("db.internal", 5432), now);
        assert!(
            k.is_known(&t("DB.Internal", 5432), now),
            "names are not case sensitive"
        );
        assert!(
            !k.is_known(&t("db.internal", 5433), now),
            "another port is another destination"
        );
        k.failed(&t("db.internal", 5432));
        assert!(!k.is_known(&t("db.internal", 5432), now));
    }

    #[test]
    fn a_confirmation_vouches_for_its_destination_no_longer_than_known_for() {
        let k = KnownTargets::default();
        let then = Instant::now();
        k.opened(&t("git.internal", 22), then);
        assert!(k.is_known(
            &t("git.internal", 22),
            then + KNOWN_FOR - Duration::from_secs(1)
        ));
        assert!(!k.is_known(&t("git.internal", 22), then + KNOWN_FOR));
    }

    #[test]
    fn a_client_that_opens_ever_new_names_cannot_grow_the_set_beyond_its_bound() {
        let k = KnownTargets::default();
        let start = Instant::now();
        for i in 0..(KNOWN_MAX * 3) {
            k.opened(
                &t(&format!("h{i}.internal"), 443),
                start + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(k.len(), KNOWN_MAX);
        // The newest stay; the oldest went first.
        let last = start + Duration::from_millis((KNOWN_MAX * 3) as u64);
        assert!(k.is_known(&t(&format!("h{}.internal", KNOWN_MAX * 3 - 1), 443), last));
        assert!(!k.is_known(&t("h0.internal", 443), last));
    }

    #[test]
    fn expired_entries_make_room_before_a_live_one_is_dropped() {
        let k = KnownTargets::default();
        let start = Instant::now();
        for i in 0..KNOWN_MAX {
            k.opened(&t(&format!("old{i}.internal"), 80), start);
        }
        let later = start + KNOWN_FOR + Duration::from_secs(1);
        k.opened(&t("fresh.internal", 80), later);
        assert_eq!(k.len(), 1, "every expired entry went");
        assert!(k.is_known(&t("fresh.internal", 80), later));
    }
}
