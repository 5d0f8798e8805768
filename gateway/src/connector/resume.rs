//! The connector's resumable streams: this process's resume id (announced in every hello), the
//! table of stream keys it holds, and the checks a resume passes before it reaches its stream:
//! the same agent token that opened it, the same destination, the allow-list again with the
//! identity stamped now, and a newer attachment (checked by the stream itself).
//!
//! Bounded per agent token and in all (streams held, bytes retained): beyond either, a new
//! stream is opened as a plain one (it dies with its session, as before), never refused.

use crate::policy::{self, Policy, Who};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tunnel::resumable::{Budget, Charge, ResumeRequest, Settings};
use tunnel::{Dest, ErrorCode, Stream};

/// Streams one agent token may hold resumable at once, and all tokens together.
pub const HELD_PER_TOKEN: usize = 1024;
pub const HELD: usize = 16_384;
/// Bytes retained for agents, in all and per agent token (a sixteenth: a few tokens cannot
/// take the budget of everyone).
pub const MEMORY: usize = 512 * 1024 * 1024;
pub const MEMORY_PER_TOKEN: usize = MEMORY / 16;

struct Held {
    token: String,
    dest: Dest,
    addr: SocketAddr,
    tx: tunnel::resumable::RequestTx,
}

pub struct Resumes {
    /// 32 hex digits, random per process: resume tickets name this connector by it.
    pub id: String,
    pub grace: Duration,
    pub budget: Arc<Budget>,
    table: Mutex<Tables>,
}

#[derive(Default)]
struct Tables {
    held: HashMap<String, Held>,
    per_token: HashMap<String, usize>,
}

impl Default for Resumes {
    fn default() -> Resumes {
        Resumes::new(tunnel::resumable::DEFAULT_GRACE)
    }
}

/// Removes a stream's key from the table when its end is gone.
pub struct Registration {
    resumes: Arc<Resumes>,
    key: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut t = self.resumes.lock();
        if let Some(h) = t.held.remove(&self.key) {
            if let Some(n) = t.per_token.get_mut(&h.token) {
                *n -= 1;
                if *n == 0 {
                    t.per_token.remove(&h.token);
                }
            }
        }
    }
}

/// Why a resume is refused: the code and reason the agent reads.
pub struct Refusal(pub ErrorCode, pub String);

impl Resumes {
    pub fn new(grace: Duration) -> Resumes {
        Resumes {
            id: hex::encode(rand::random::<[u8; 16]>()),
            grace,
            budget: Budget::new(MEMORY, MEMORY_PER_TOKEN),
            table: Mutex::new(Tables::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new resumable stream of `token`, unless the token or the connector is at
    /// its bound (then `None`: the stream stays plain).
    pub fn register(
        self: &Arc<Self>,
        token: &str,
        dest: &Dest,
        addr: SocketAddr,
        buffer: usize,
    ) -> Option<(String, tunnel::resumable::RequestRx, Registration, Settings)> {
        if !self.budget.has_room() {
            return None;
        }
        let (tx, rx) = tunnel::resumable::requests();
        let key = hex::encode(rand::random::<[u8; 16]>());
        {
            let mut t = self.lock();
            let mine = t.per_token.get(token).copied().unwrap_or(0);
            if mine >= HELD_PER_TOKEN || t.held.len() >= HELD {
                return None;
            }
            *t.per_token.entry(token.to_string()).or_insert(0) += 1;
            t.held.insert(
                key.clone(),
                Held {
                    token: token.to_string(),
                    dest: dest.clone(),
                    addr,
                    tx,
                },
            );
        }
        let settings = Settings {
            buffer,
            grace: self.grace,
            charge: Some(Charge {
                budget: self.budget.clone(),
                key: token.to_string(),
            }),
        };
        let reg = Registration {
            resumes: self.clone(),
            key: key.clone(),
        };
        Some((key, rx, reg, settings))
    }

    /// Checks a resume and hands it to the stream it names.
    pub fn deliver(
        &self,
        policy: &Policy,
        key: &str,
        token: &str,
        who: &Who<'_>,
        dest: &Dest,
        req: ResumeRequest,
    ) -> Result<(), (Refusal, ResumeRequest)> {
        let refuse = |code, reason: &str, req| Err((Refusal(code, reason.to_string()), req));
        let (tx, addr) = {
            let t = self.lock();
            let Some(h) = t.held.get(key) else {
                return refuse(ErrorCode::SessionLost, "stream is gone", req);
            };
            if h.token != token {
                return refuse(ErrorCode::NotAllowed, "resume by another credential", req);
            }
            if &h.dest != dest {
                return refuse(
                    ErrorCode::NotAllowed,
                    "resume names another destination",
                    req,
                );
            }
            (h.tx.clone(), h.addr)
        };
        // The allow-list again, with the identity stamped now.
        let host = match policy::parse_host(&dest.host) {
            Ok(h) => h,
            Err(e) => return refuse(ErrorCode::NotAllowed, &e.to_string(), req),
        };
        if let Err(d) = policy
            .check(&host, dest.port, who)
            .and_then(|()| policy.check_resolved(&host, dest.port, who, addr.ip()))
        {
            return refuse(ErrorCode::NotAllowed, &d.reason, req);
        }
        match tx.try_send(req) {
            Ok(()) => Ok(()),
            Err(tunnel::resumable::SendError::Full(req)) => refuse(
                ErrorCode::Limit,
                "too many resumes of this stream at once",
                req,
            ),
            Err(tunnel::resumable::SendError::Closed(req)) => {
                refuse(ErrorCode::SessionLost, "stream is gone", req)
            }
        }
    }

    /// Streams held now (attached or suspended).
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }
}

/// Answers a refused resume on its stream.
pub fn reject(stream: Stream, r: Refusal) {
    stream.reject(r.0, &r.1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel::{memory_pair, Config, Meta, Role, Session};

    /// An incoming stream on a fresh session pair (what a resume `OPEN` arrives as).
    async fn incoming() -> (Session, ResumeRequest) {
        let (a, b) = memory_pair(16);
        let (dmz, conn) = tokio::join!(
            Session::start(a, Config::new(Role::Dmz, false)),
            Session::start(b, Config::new(Role::Connector, true))
        );
        let (dmz, _) = dmz.unwrap();
        let (_c, mut inc) = conn.unwrap();
        let _s = dmz
            .open(Dest::new("db.internal", 5432), Meta::default())
            .unwrap();
        let stream = inc.accept().await.unwrap();
        std::mem::forget(_s);
        (
            dmz,
            ResumeRequest {
                stream,
                attach: 1,
                peer_recv: 0,
            },
        )
    }

    fn policy(rules: &[&str]) -> Policy {
        Policy::new(rules.iter().map(|r| r.parse().unwrap()).collect(), vec![])
    }

    /// A stream of alice's to db.internal:5432 held by `resumes`: its key, destination, the
    /// resumes it would receive, and its registration.
    fn alice_holds(
        resumes: &Arc<Resumes>,
    ) -> (String, Dest, tunnel::resumable::RequestRx, Registration) {
        let dest = Dest::new("db.internal", 5432);
        let addr: SocketAddr = "10.0.0.5:5432".parse().unwrap();
        let (key, rx, reg, _) = resumes
            .register("alice-laptop", &dest, addr, 1 << 20)
            .unwrap();
        (key, dest, rx, reg)
    }

    const ALICE: Who<'static> = Who {
        user: "alice",
        groups: &[],
    };

    #[tokio::test]
    async fn a_resume_with_another_agents_credential_is_refused() {
        let resumes = Arc::new(Resumes::default());
        let (key, dest, _rx, _reg) = alice_holds(&resumes);
        let p = policy(&["db.internal:5432"]);
        let (_keep, req) = incoming().await;
        let Err((Refusal(code, reason), _)) =
            resumes.deliver(&p, &key, "mallory-laptop", &ALICE, &dest, req)
        else {
            panic!("another credential resumed alice's stream");
        };
        assert_eq!(code, ErrorCode::NotAllowed);
        assert!(reason.contains("another credential"), "{reason}");
        // The owner may; a stream that ended may not be resumed by anyone.
        let (_keep, req) = incoming().await;
        assert!(resumes
            .deliver(&p, &key, "alice-laptop", &ALICE, &dest, req)
            .is_ok());
        drop(_reg);
        let (_keep, req) = incoming().await;
        let Err((Refusal(code, _), _)) =
            resumes.deliver(&p, &key, "alice-laptop", &ALICE, &dest, req)
        else {
            panic!("a stream that ended was resumed");
        };
        assert_eq!(code, ErrorCode::SessionLost);
    }

    #[tokio::test]
    async fn a_rule_removed_since_the_open_refuses_the_resume() {
        let resumes = Arc::new(Resumes::default());
        let (key, dest, _rx, _reg) = alice_holds(&resumes);
        let (_keep, req) = incoming().await;
        let now = policy(&["other.internal:22"]);
        let Err((Refusal(code, _), _)) =
            resumes.deliver(&now, &key, "alice-laptop", &ALICE, &dest, req)
        else {
            panic!("resumed against the allow-list");
        };
        assert_eq!(code, ErrorCode::NotAllowed);
    }

    #[test]
    fn one_token_cannot_hold_more_than_its_share() {
        let resumes = Arc::new(Resumes::default());
        let dest = Dest::new("db.internal", 5432);
        let addr: SocketAddr = "10.0.0.5:5432".parse().unwrap();
        let mut held = Vec::new();
        for _ in 0..HELD_PER_TOKEN {
            held.push(resumes.register("mallory", &dest, addr, 1).unwrap());
        }
        assert!(resumes.register("mallory", &dest, addr, 1).is_none());
        assert!(resumes.register("alice", &dest, addr, 1).is_some());
    }
}
