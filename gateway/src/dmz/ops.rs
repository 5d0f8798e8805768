//! What the DMZ tells its operators: the counters ([`crate::metrics`]), the sessions up now
//! (a registry each session enters for its lifetime), and the admin page's view of both
//! ([`crate::admin::View`]): sessions, users, connectors, routes and recent refusals.

use super::Shared;
use crate::admin::{page::since, Table, View};
use crate::auth::Identity;
use crate::logsafe::Clean;
use crate::metrics::{Gauge, Metrics, Role};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

/// A session up now, as the admin page lists it.
#[derive(Clone)]
struct Live {
    role: Role,
    token_id: String,
    name: String,
    groups: String,
    client: SocketAddr,
    /// The peer's instance name (untrusted: cleaned, and escaped on the page).
    instance: String,
    since: SystemTime,
}

/// Counters and the live sessions, shared by every connection task.
pub(crate) struct Ops {
    pub(crate) metrics: Arc<Metrics>,
    live: Mutex<BTreeMap<u64, Live>>,
    next: AtomicU64,
}

impl Ops {
    pub(crate) fn new() -> Ops {
        Ops {
            metrics: Arc::new(Metrics::dmz()),
            live: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
        }
    }

    /// A session of `role` came up; it stays listed and counted until the guard drops. The
    /// handshake took `timeout` less what was left of the connection's `deadline`.
    pub(crate) fn up(
        &self,
        role: Role,
        id: &Identity,
        client: SocketAddr,
        instance: &str,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Up<'_> {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let gauge = self.metrics.session_up(role, timeout.saturating_sub(left));
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let live = Live {
            role,
            token_id: id.token_id.clone(),
            name: id.name.clone(),
            groups: id.groups.join(","),
            client,
            instance: Clean(instance).to_string().chars().take(80).collect(),
            since: SystemTime::now(),
        };
        self.lock().insert(key, live);
        Up {
            ops: self,
            key,
            _gauge: gauge,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A session's place in [`Ops`]; removed on drop.
pub(crate) struct Up<'a> {
    ops: &'a Ops,
    key: u64,
    _gauge: Gauge<'a>,
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        self.ops.lock().remove(&self.key);
    }
}

/// The DMZ's admin page. Holds the shared state weakly: the page never keeps a stopped
/// gateway alive.
pub(crate) struct DmzView {
    pub(crate) shared: Weak<Shared>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) instance: String,
}

impl View for DmzView {
    fn title(&self) -> String {
        format!("DMZ gateway {}", self.instance)
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn summary(&self) -> String {
        let (open, total) = self.metrics.streams();
        format!(
            "{} agent sessions, {} connector sessions; {open} streams open, {total} since start",
            self.metrics.sessions(Role::Agent),
            self.metrics.sessions(Role::Connector)
        )
    }

    fn tables(&self) -> Vec<Table> {
        let Some(shared) = self.shared.upgrade() else {
            return Vec::new();
        };
        let live: Vec<Live> = shared.ops.lock().values().cloned().collect();
        let role = |r: Role| match r {
            Role::Agent => "agent",
            Role::Connector => "connector",
        };
        let sessions = live
            .iter()
            .map(|l| {
                vec![
                    role(l.role).to_string(),
                    l.token_id.clone(),
                    l.name.clone(),
                    l.client.ip().to_string(),
                    l.instance.clone(),
                    since(l.since),
                ]
            })
            .collect();
        // Users: agent tokens with sessions up, and how many.
        let mut users: BTreeMap<&str, (&Live, usize)> = BTreeMap::new();
        for l in live.iter().filter(|l| l.role == Role::Agent) {
            users.entry(&l.token_id).or_insert((l, 0)).1 += 1;
        }
        let users = users
            .values()
            .map(|(l, n)| {
                vec![
                    l.name.clone(),
                    l.token_id.clone(),
                    l.groups.clone(),
                    n.to_string(),
                ]
            })
            .collect();
        let mut connectors: BTreeMap<String, (usize, Vec<String>)> = BTreeMap::new();
        for (c, routes) in shared.router.by_connector() {
            let e = connectors.entry(c).or_default();
            e.0 += 1;
            for r in routes {
                let r = r.to_string();
                if !e.1.contains(&r) {
                    e.1.push(r);
                }
            }
        }
        let connectors = connectors
            .into_iter()
            .map(|(c, (n, routes))| vec![c, n.to_string(), routes.join(" ")])
            .collect();
        let routes = shared
            .router
            .routes()
            .into_iter()
            .map(|r| vec![r.to_string()])
            .collect();
        vec![
            Table {
                title: "Sessions",
                columns: &["role", "token", "name", "client", "instance", "up for"],
                rows: sessions,
                empty: "no session",
            },
            Table {
                title: "Users",
                columns: &["name", "token", "groups", "sessions"],
                rows: users,
                empty: "no agent connected",
            },
            Table {
                title: "Connectors",
                columns: &["credential", "sessions", "routes"],
                rows: connectors,
                empty: "no connector connected: nothing can be reached",
            },
            Table {
                title: "Routes",
                columns: &["route"],
                rows: routes,
                empty: "no route",
            },
            crate::admin::page::refusals(
                &self.metrics,
                &["ago", "token", "destination", "code", "reason"],
            ),
        ]
    }
}
