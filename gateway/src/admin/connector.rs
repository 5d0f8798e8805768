//! A connector's admin listener: its counters, its sessions to the DMZ (with the way out each
//! took), its allow-list, the routes it advertises and its recent refusals.

use super::page::since;
use super::{AdminConfig, AdminError, Table, View};
use crate::metrics::{EgressPath, Gauge, Metrics, Role};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// A session to the DMZ, as the page lists it.
#[derive(Clone)]
struct Live {
    dmz: String,
    carried: String,
    way: String,
    since: SystemTime,
}

/// A connector's counters and its sessions up now.
pub struct ConnectorOps {
    pub metrics: Metrics,
    live: Mutex<BTreeMap<u64, Live>>,
    next: AtomicU64,
}

impl Default for ConnectorOps {
    fn default() -> Self {
        ConnectorOps {
            metrics: Metrics::connector(),
            live: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
        }
    }
}

impl ConnectorOps {
    /// A session to the DMZ came up after `took`, over `way`; listed and counted until the
    /// guard drops.
    pub fn up(&self, c: &uplink::Connected, way: &egress::Candidate, took: Duration) -> Up<'_> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let live = Live {
            dmz: crate::logsafe::Clean(&c.session.peer().instance_id)
                .to_string()
                .chars()
                .take(80)
                .collect(),
            carried: c.carried.to_string(),
            way: way.to_string(),
            since: SystemTime::now(),
        };
        self.lock().insert(key, live);
        Up {
            ops: self,
            key,
            _session: self.metrics.session_up(Role::Connector, took),
            _path: self.metrics.egress_path(EgressPath::of(way)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A session's place in [`ConnectorOps`]; removed on drop.
pub struct Up<'a> {
    ops: &'a ConnectorOps,
    key: u64,
    _session: Gauge<'a>,
    _path: Gauge<'a>,
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        self.ops.lock().remove(&self.key);
    }
}

struct ConnectorView {
    ops: Arc<ConnectorOps>,
    instance: String,
    gateway: String,
    rules: Vec<String>,
    routes: Vec<String>,
}

impl View for ConnectorView {
    fn title(&self) -> String {
        format!("connector {}", self.instance)
    }
    fn metrics(&self) -> &Metrics {
        &self.ops.metrics
    }
    fn summary(&self) -> String {
        let (open, total) = self.ops.metrics.streams();
        format!(
            "{} sessions to {}; {open} streams open, {total} since start",
            self.ops.metrics.sessions(Role::Connector),
            self.gateway
        )
    }
    fn tables(&self) -> Vec<Table> {
        let sessions = self
            .ops
            .lock()
            .values()
            .map(|l| {
                vec![
                    l.dmz.clone(),
                    l.carried.clone(),
                    l.way.clone(),
                    since(l.since),
                ]
            })
            .collect();
        vec![
            Table {
                title: "Sessions to the DMZ",
                columns: &["DMZ instance", "carried", "way out", "up for"],
                rows: sessions,
                empty: "no session: the gateway is not reached",
            },
            Table {
                title: "Allow-list",
                columns: &["rule"],
                rows: self.rules.iter().map(|r| vec![r.clone()]).collect(),
                empty: "no rule",
            },
            Table {
                title: "Routes advertised",
                columns: &["route"],
                rows: self.routes.iter().map(|r| vec![r.clone()]).collect(),
                empty: "no route",
            },
            crate::admin::page::refusals(
                &self.ops.metrics,
                &["ago", "user", "destination", "code", "reason"],
            ),
        ]
    }
}

/// Binds the connector's admin listener (when configured) and serves it until `shutdown`.
pub async fn start(
    cfg: &crate::connector::ConnectorConfig,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    let Some(admin): Option<&AdminConfig> = cfg.admin.as_ref() else {
        return Ok(());
    };
    let listener = super::bind(admin).await?;
    let view = ConnectorView {
        ops: cfg.ops.clone(),
        instance: cfg.instance_id.clone(),
        gateway: cfg
            .gateways
            .iter()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        rules: cfg.policy.rules().iter().map(|r| r.to_string()).collect(),
        routes: cfg.routes.iter().map(|r| r.to_string()).collect(),
    };
    tokio::spawn(super::serve(
        listener,
        admin.clone(),
        Arc::new(view),
        shutdown,
    ));
    Ok(())
}
