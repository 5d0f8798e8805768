//! The DMZ's table of connector sessions and the routes each may serve.
//!
//! A connector advertises routes in-band (`ROUTES`); the DMZ keeps only those its credential was
//! issued for ([`crate::policy::Route::covers`]), so a stolen connector token cannot attract
//! traffic for other destinations. A new stream goes to the least loaded live session whose
//! routes match its destination, which spreads streams over connectors and their sessions.

use crate::policy::{Host, Route};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tunnel::Session;

struct Entry {
    id: u64,
    connector: String,
    session: Session,
    routes: Vec<Route>,
    /// The connector has advertised its routes (a `ROUTES` frame, even one whose routes were
    /// all refused): until then, its credential's destinations are still to come.
    heard: bool,
}

/// A chosen connector session.
pub struct Chosen {
    pub connector: String,
    pub session: Session,
}

pub struct Router {
    entries: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
    /// Bumped whenever the routes change, so agents learn them without polling.
    version: tokio::sync::watch::Sender<u64>,
}

impl Default for Router {
    fn default() -> Router {
        Router {
            entries: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            version: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Router {
    /// Registers a connector session (with no routes until it advertises); returns its key.
    pub fn add(&self, connector: &str, session: Session) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().push(Entry {
            id,
            connector: connector.to_string(),
            session,
            routes: Vec::new(),
            heard: false,
        });
        id
    }

    /// The routes kept of what session `id` advertised; `heard`: it has advertised (an empty
    /// list before its first `ROUTES` is not yet its answer). Wakes the watchers only when
    /// something changed (a connector may repeat its `ROUTES` at will).
    pub fn set_routes(&self, id: u64, routes: Vec<Route>, heard: bool) {
        let changed = match self.lock().iter_mut().find(|e| e.id == id) {
            Some(e) if e.routes != routes || (heard && !e.heard) => {
                e.routes = routes;
                e.heard |= heard;
                true
            }
            _ => false,
        };
        if changed {
            self.version.send_modify(|v| *v += 1);
        }
    }

    pub fn remove(&self, id: u64) {
        self.lock().retain(|e| e.id != id);
        self.version.send_modify(|v| *v += 1);
    }

    /// Wakes when the routes change (see [`Router::routes`]).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The least loaded live session that serves `host:port`.
    pub fn pick(&self, host: &Host, port: u16) -> Option<Chosen> {
        self.pick_by(host, port, false)
    }

    /// [`Router::pick`] among the sessions that carry datagrams (SOCKS5 UDP).
    pub fn pick_datagrams(&self, host: &Host, port: u16) -> Option<Chosen> {
        self.pick_by(host, port, true)
    }

    fn pick_by(&self, host: &Host, port: u16, datagrams: bool) -> Option<Chosen> {
        let entries = self.lock();
        entries
            .iter()
            .filter(|e| !e.session.is_going_away())
            .filter(|e| !datagrams || e.session.datagrams())
            .filter(|e| e.routes.iter().any(|r| r.matches(host, port)))
            .min_by_key(|e| e.session.stream_count())
            .map(|e| Chosen {
                connector: e.connector.clone(),
                session: e.session.clone(),
            })
    }

    /// [`Router::pick`], preferring sessions that hold resumable streams (new resumable streams
    /// go there; an older connector serves them as plain ones when it is the only one).
    pub fn pick_resumable(&self, host: &Host, port: u16) -> Option<Chosen> {
        let entries = self.lock();
        let live = || {
            entries
                .iter()
                .filter(|e| !e.session.is_going_away())
                .filter(|e| e.routes.iter().any(|r| r.matches(host, port)))
        };
        live()
            .filter(|e| e.session.resume_negotiated())
            .min_by_key(|e| e.session.stream_count())
            .or_else(|| live().min_by_key(|e| e.session.stream_count()))
            .map(|e| Chosen {
                connector: e.connector.clone(),
                session: e.session.clone(),
            })
    }

    /// The session of the connector that holds a resumable stream: authenticated with token
    /// `connector` *and* announcing `resume_id` (a copied resume id under another credential
    /// attracts nothing). The newest such session that is not closed, preferring those not
    /// going away.
    pub fn holder(&self, connector: &str, resume_id: &str) -> Option<Chosen> {
        let entries = self.lock();
        let matching = || {
            entries.iter().rev().filter(|e| {
                e.connector == connector
                    && !e.session.is_closed()
                    && e.session.resume_negotiated()
                    && e.session.peer().resume_id == resume_id
            })
        };
        matching()
            .find(|e| !e.session.is_going_away())
            .or_else(|| matching().next())
            .map(|e| Chosen {
                connector: e.connector.clone(),
                session: e.session.clone(),
            })
    }

    /// Whether one of `credentials` (connector credential ids, those that may serve a
    /// destination) has no session here that advertised its routes yet: a stream to that
    /// destination may be served soon (see `Limits::route_wait_at_start`).
    pub fn awaits(&self, credentials: &[String]) -> bool {
        let entries = self.lock();
        credentials.iter().any(|id| {
            !entries
                .iter()
                .any(|e| &e.connector == id && e.heard && !e.session.is_going_away())
        })
    }

    /// Every route some live connector session serves (for telling agents what they can reach).
    pub fn routes(&self) -> Vec<Route> {
        // Cloned out first: de-duplicating thousands of routes does not hold the router's lock.
        let all: Vec<Route> = {
            let entries = self.lock();
            entries
                .iter()
                .filter(|e| !e.session.is_going_away())
                .flat_map(|e| e.routes.iter().cloned())
                .collect()
        };
        let mut seen = std::collections::HashSet::with_capacity(all.len());
        all.into_iter().filter(|r| seen.insert(r.clone())).collect()
    }

    /// Each connector session's credential id and routes (for the admin page).
    pub fn by_connector(&self) -> Vec<(String, Vec<Route>)> {
        let entries = self.lock();
        entries
            .iter()
            .map(|e| (e.connector.clone(), e.routes.clone()))
            .collect()
    }

    /// Number of registered connector sessions (for `/healthz` and logs).
    pub fn sessions(&self) -> usize {
        self.lock().len()
    }
}
