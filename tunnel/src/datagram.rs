//! Datagram associations (SOCKS5 UDP) as rules with no I/O: who may open one, where received
//! datagrams wait, what is queued for the writer, and what is dropped.
//!
//! Datagrams spend no credit and never send `WINDOW`: every queue here is bounded instead, and a
//! datagram that does not fit is **dropped and counted**, never buffered beyond the bound (see
//! `docs/protocol.md`, "Datagrams"). `Datagrams` is one field of the session's `State`
//! (`machine.rs`), which checks ids (shared with streams) and calls in here; the application
//! handle is `association.rs`.

use crate::frame::{encode_dgram, Dest, ErrorCode, Meta, MAX_DATAGRAM};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::task::Waker;

/// Most bytes of datagrams queued for the writer per session.
pub const MAX_OUT_BYTES: usize = 1024 * 1024;
/// Most datagrams queued for the writer per session.
pub const MAX_OUT_DATAGRAMS: usize = 1024;
/// Most bytes of received datagrams an association holds until the application takes them.
pub const MAX_INBOX_BYTES: usize = 256 * 1024;
/// Most received datagrams an association holds until the application takes them.
pub const MAX_INBOX_DATAGRAMS: usize = 256;
/// Most associations the peer may have open towards us per session (waiting ones included).
pub const MAX_INCOMING_ASSOCIATIONS: usize = 1024;

/// Why a datagram was not sent (or not kept): each is counted by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    /// Larger than [`MAX_DATAGRAM`].
    #[error("datagram larger than {MAX_DATAGRAM} bytes")]
    TooLarge,
    /// The session's datagram queue (or the association's inbox) is full.
    #[error("datagram queue full")]
    Queue,
    /// The association is closed (or the session is gone).
    #[error("association closed")]
    Closed,
}

/// One association's state.
pub(crate) struct Assoc {
    /// The peer opened it (counts against [`MAX_INCOMING_ASSOCIATIONS`]).
    incoming: bool,
    inbox: VecDeque<(Dest, Bytes)>,
    inbox_bytes: usize,
    waker: Option<Waker>,
    /// Why it ended (the peer's `DGRAM_CLOSE`, ours, or the session's end).
    pub(crate) closed: Option<(ErrorCode, String)>,
    /// Received datagrams dropped because the inbox was full.
    pub(crate) dropped_in: u64,
    pub(crate) datagrams_in: u64,
    pub(crate) datagrams_out: u64,
}

impl Assoc {
    fn new(incoming: bool) -> Assoc {
        Assoc {
            incoming,
            inbox: VecDeque::new(),
            inbox_bytes: 0,
            waker: None,
            closed: None,
            dropped_in: 0,
            datagrams_in: 0,
            datagrams_out: 0,
        }
    }

    fn end(&mut self, code: ErrorCode, reason: String) {
        if self.closed.is_none() {
            self.closed = Some((code, reason));
        }
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// What the peer's `DGRAM_OPEN` asks of the session.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OpenAnswer {
    /// Kept, waiting to be accepted.
    Queued,
    /// Refused: answer `DGRAM_CLOSE(code, reason)`.
    Refuse(ErrorCode, String),
}

/// Every association of one session, and the datagrams queued for the writer.
#[derive(Default)]
pub(crate) struct Datagrams {
    pub(crate) assocs: HashMap<u32, Assoc>,
    incoming_live: usize,
    accept_queue: VecDeque<(u32, Meta)>,
    accept_waker: Option<Waker>,
    /// Encoded `DGRAM` frames, first in, first out.
    out: VecDeque<Bytes>,
    out_bytes: usize,
    /// Datagrams dropped on the way out because the queue was full (all associations).
    pub(crate) dropped_out: u64,
}

impl Datagrams {
    /// The peer opened association `id` (its id already checked by the caller).
    pub(crate) fn on_open(&mut self, id: u32, meta: Meta, accept: bool) -> OpenAnswer {
        if !accept {
            return OpenAnswer::Refuse(
                ErrorCode::NotAllowed,
                "this side does not accept datagram associations".into(),
            );
        }
        if self.incoming_live >= MAX_INCOMING_ASSOCIATIONS {
            return OpenAnswer::Refuse(
                ErrorCode::Limit,
                format!("too many datagram associations on this session (limit {MAX_INCOMING_ASSOCIATIONS})"),
            );
        }
        self.incoming_live += 1;
        self.assocs.insert(id, Assoc::new(true));
        self.accept_queue.push_back((id, meta));
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        OpenAnswer::Queued
    }

    /// We opened association `id`.
    pub(crate) fn opened(&mut self, id: u32) {
        self.assocs.insert(id, Assoc::new(false));
    }

    /// A datagram from the peer: kept in the association's inbox, or dropped (unknown or closed
    /// association: silently, it was in flight; full inbox: counted on the association).
    pub(crate) fn on_dgram(&mut self, id: u32, addr: Dest, payload: Bytes) {
        let Some(a) = self.assocs.get_mut(&id) else {
            return;
        };
        if a.closed.is_some() {
            return;
        }
        let cost = payload.len() + addr.host.len();
        if a.inbox.len() >= MAX_INBOX_DATAGRAMS || a.inbox_bytes + cost > MAX_INBOX_BYTES {
            a.dropped_in += 1;
            return;
        }
        // A small datagram is a view into a large read buffer: copied out, so a slow reader
        // does not pin whole transport buffers with a few bytes each.
        let payload = if payload.len() < 16 * 1024 {
            Bytes::copy_from_slice(&payload)
        } else {
            payload
        };
        a.inbox_bytes += cost;
        a.datagrams_in += 1;
        a.inbox.push_back((addr, payload));
        if let Some(w) = a.waker.take() {
            w.wake();
        }
    }

    /// The peer closed association `id`.
    pub(crate) fn on_close(&mut self, id: u32, code: ErrorCode, reason: String) {
        if let Some(a) = self.assocs.get_mut(&id) {
            a.end(code, reason);
        }
    }

    /// Queues a datagram for the writer, or says why it is dropped.
    pub(crate) fn send(&mut self, id: u32, addr: &Dest, payload: &[u8]) -> Result<(), Dropped> {
        let Some(a) = self.assocs.get_mut(&id) else {
            return Err(Dropped::Closed);
        };
        if a.closed.is_some() {
            return Err(Dropped::Closed);
        }
        if payload.len() > MAX_DATAGRAM {
            return Err(Dropped::TooLarge);
        }
        let frame = encode_dgram(id, addr, payload);
        if self.out.len() >= MAX_OUT_DATAGRAMS || self.out_bytes + frame.len() > MAX_OUT_BYTES {
            self.dropped_out += 1;
            return Err(Dropped::Queue);
        }
        a.datagrams_out += 1;
        self.out_bytes += frame.len();
        self.out.push_back(frame);
        Ok(())
    }

    /// The next received datagram of `id`; `Err` once it is closed and empty; else `waker` is
    /// woken when one arrives.
    pub(crate) fn recv(
        &mut self,
        id: u32,
        waker: &Waker,
    ) -> Result<Option<(Dest, Bytes)>, (ErrorCode, String)> {
        let Some(a) = self.assocs.get_mut(&id) else {
            return Err((ErrorCode::Internal, "association state gone".into()));
        };
        if let Some((addr, payload)) = a.inbox.pop_front() {
            a.inbox_bytes -= payload.len() + addr.host.len();
            return Ok(Some((addr, payload)));
        }
        if let Some(c) = &a.closed {
            return Err(c.clone());
        }
        a.waker = Some(waker.clone());
        Ok(None)
    }

    /// The application closed (or dropped) `id`: its state goes. `Some(incoming)` when the peer
    /// must be told (`DGRAM_CLOSE`), i.e. it had not ended already; `incoming`: the peer opened
    /// it, so the close answers the peer's frame (counted as such).
    pub(crate) fn close(&mut self, id: u32) -> Option<bool> {
        let a = self.assocs.remove(&id)?;
        if a.incoming {
            self.incoming_live -= 1;
        }
        a.closed.is_none().then_some(a.incoming)
    }

    /// The next association the peer opened, if one waits.
    pub(crate) fn next_incoming(&mut self, waker: &Waker) -> Option<(u32, Meta)> {
        let next = self.accept_queue.pop_front();
        if next.is_none() {
            self.accept_waker = Some(waker.clone());
        }
        next
    }

    /// Moves queued datagrams into `batch` while `*bytes < limit`.
    pub(crate) fn take(
        &mut self,
        limit: usize,
        bytes: &mut usize,
        batch: &mut Vec<crate::transport::Outgoing>,
    ) {
        while *bytes < limit {
            let Some(b) = self.out.pop_front() else {
                break;
            };
            self.out_bytes -= b.len();
            *bytes += b.len();
            batch.push(crate::transport::Outgoing::Frame(b));
        }
    }

    /// The session ended: every association ends with `reason`, nothing more is sent.
    pub(crate) fn end_all(&mut self, code: ErrorCode, reason: &str) {
        for a in self.assocs.values_mut() {
            a.end(code, reason.to_string());
        }
        self.out.clear();
        self.out_bytes = 0;
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    //! The datagram rules through the session's `State`, without a runtime.
    use crate::frame::{Dest, ErrorCode, Frame, Meta, Role, MAX_DATAGRAM};
    use crate::machine::{Rules, State};
    use bytes::Bytes;
    use tokio::time::Instant;

    fn rules(datagrams: bool) -> Rules {
        Rules {
            role: Role::Connector,
            initiator: true,
            accept_streams: true,
            max_incoming_streams: 4,
            accept_backlog: 2,
            stream_window: 100_000,
            session_window: 1_000_000,
            send_queue: 1_000_000,
            peer_stream_window: 100_000,
            peer_session_window: 1_000_000,
            max_frame: 16 * 1024,
            max_send: 16 * 1024,
            datagrams,
            resume: false,
            window_max: 0,
            session_growth: 0,
        }
    }

    fn state(datagrams: bool) -> State {
        State::new(rules(datagrams), Instant::now())
    }

    fn sent(st: &mut State, max: usize) -> Vec<Frame> {
        let mut batch = Vec::new();
        st.next_batch(max, &mut batch);
        batch
            .into_iter()
            .map(|b| Frame::decode(b.into_bytes(), 1 << 20).expect("our own frame decodes"))
            .collect()
    }

    fn to() -> Dest {
        Dest::new("dns.internal", 53)
    }

    fn dgram(assoc: u32, n: usize) -> Frame {
        Frame::Dgram {
            assoc,
            addr: to(),
            payload: Bytes::from(vec![1u8; n]),
        }
    }

    fn waker() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }

    /// The peer's DGRAM_OPEN of `id` (even: we are the initiator), accepted.
    fn peer_assoc(st: &mut State, id: u32) -> u32 {
        let f = Frame::DgramOpen {
            assoc: id,
            meta: Meta::default(),
        };
        st.on_frame(Instant::now(), f, 10).unwrap();
        st.dgrams.next_incoming(&waker()).unwrap().0
    }

    #[test]
    fn a_datagram_frame_on_a_session_that_did_not_negotiate_them_ends_it() {
        let mut st = state(false);
        let e = st.on_frame(Instant::now(), dgram(2, 10), 20).unwrap_err();
        assert_eq!(e.0, ErrorCode::Protocol);
        // And we never open one there: the caller answers 0x07 as before.
        assert!(st.open_association(Meta::default()).is_err());
    }

    #[test]
    fn an_association_id_shares_the_stream_id_rules() {
        let mut st = state(true);
        peer_assoc(&mut st, 4);
        // A stream OPEN with an id at or below the association's is not new: protocol error.
        let open = Frame::Open {
            stream: 4,
            dest: to(),
            meta: Meta::default(),
        };
        assert!(st.on_frame(Instant::now(), open, 10).is_err());
        let mut st = state(true);
        let odd = Frame::DgramOpen {
            assoc: 3,
            meta: Meta::default(),
        };
        assert!(st.on_frame(Instant::now(), odd, 10).is_err());
        // Ours and streams' come from one counter.
        let a = st.open_association(Meta::default()).unwrap();
        let s = st.open(to(), Meta::default()).unwrap();
        assert_eq!((a, s), (1, 3));
    }

    #[test]
    fn a_flood_of_received_datagrams_is_dropped_beyond_the_inbox_not_buffered() {
        let mut st = state(true);
        let id = peer_assoc(&mut st, 2);
        for _ in 0..10_000 {
            st.on_frame(Instant::now(), dgram(id, 1000), 1020).unwrap();
        }
        let a = &st.dgrams.assocs[&id];
        assert!(a.inbox_bytes <= super::MAX_INBOX_BYTES);
        assert!(a.inbox.len() <= super::MAX_INBOX_DATAGRAMS);
        assert_eq!(a.dropped_in + a.datagrams_in, 10_000);
        assert!(a.dropped_in >= 10_000 - super::MAX_INBOX_DATAGRAMS as u64);
        // No WINDOW, no RST, nothing induced: datagrams cost the peer no answers.
        assert!(sent(&mut st, usize::MAX).is_empty());
    }

    #[test]
    fn a_flood_of_sent_datagrams_is_dropped_beyond_the_queue_and_counted() {
        let mut st = state(true);
        let id = st.open_association(Meta::default()).unwrap();
        let mut dropped = 0;
        for _ in 0..5_000 {
            if st.send_datagram(id, &to(), &[0u8; 1200]) == Err(super::Dropped::Queue) {
                dropped += 1;
            }
        }
        assert!(dropped >= 5_000 - super::MAX_OUT_DATAGRAMS);
        assert_eq!(st.dgrams.dropped_out, dropped as u64);
        assert!(st.dgrams.out_bytes <= super::MAX_OUT_BYTES);
        assert_eq!(
            st.send_datagram(id, &to(), &vec![0u8; MAX_DATAGRAM + 1]),
            Err(super::Dropped::TooLarge)
        );
    }

    #[test]
    fn busy_streams_and_datagrams_share_each_batch_neither_starves() {
        let mut st = state(true);
        let id = st.open_association(Meta::default()).unwrap();
        let s = st.open(to(), Meta::default()).unwrap();
        sent(&mut st, usize::MAX); // the opens
        st.on_frame(
            Instant::now(),
            Frame::OpenOk {
                stream: s,
                meta: Default::default(),
            },
            5,
        )
        .unwrap();
        for _ in 0..200 {
            let _ = st.send_datagram(id, &to(), &[0u8; 1000]);
        }
        while let crate::machine::Sent::Queued(_) = st.send(s, &[0u8; 16 * 1024]) {}
        let batch = sent(&mut st, 16 * 1024);
        let dgram_bytes: usize = batch
            .iter()
            .map(|f| match f {
                Frame::Dgram { payload, .. } => payload.len(),
                _ => 0,
            })
            .sum();
        let data_bytes: usize = batch
            .iter()
            .map(|f| match f {
                Frame::Data { payload, .. } => payload.len(),
                _ => 0,
            })
            .sum();
        // About a quarter for datagrams, the rest for the stream.
        assert!((4_000..=6_000).contains(&dgram_bytes), "{dgram_bytes}");
        assert!(data_bytes >= 8 * 1024, "{data_bytes}");
    }

    #[test]
    fn too_many_associations_from_the_peer_are_refused_with_dgram_close() {
        let mut st = state(true);
        for i in 0..super::MAX_INCOMING_ASSOCIATIONS as u32 + 1 {
            let f = Frame::DgramOpen {
                assoc: 2 + 2 * i,
                meta: Meta::default(),
            };
            st.on_frame(Instant::now(), f, 10).unwrap();
        }
        let out = sent(&mut st, usize::MAX);
        assert!(matches!(
            out.as_slice(),
            [Frame::DgramClose {
                code: ErrorCode::Limit,
                ..
            }]
        ));
    }

    #[test]
    fn the_session_ending_ends_every_association_and_drops_late_datagrams() {
        let mut st = state(true);
        let id = peer_assoc(&mut st, 2);
        st.close(crate::SessionError::PeerClosed, None);
        assert_eq!(
            st.dgrams.recv(id, &waker()).unwrap_err().0,
            ErrorCode::SessionLost
        );
        assert_eq!(
            st.send_datagram(id, &to(), b"x"),
            Err(super::Dropped::Closed)
        );
        // Closing it then sends nothing (the session is gone).
        st.close_association(id, ErrorCode::Cancel, "x");
        assert!(st.dgrams.assocs.is_empty());
    }

    #[test]
    fn the_peers_close_ends_the_association_and_our_close_tells_the_peer() {
        let mut st = state(true);
        let id = st.open_association(Meta::default()).unwrap();
        let id2 = st.open_association(Meta::default()).unwrap();
        sent(&mut st, usize::MAX);
        let close = Frame::DgramClose {
            assoc: id,
            code: ErrorCode::NotAllowed,
            reason: "no UDP rule".into(),
        };
        st.on_frame(Instant::now(), close, 10).unwrap();
        assert_eq!(
            st.dgrams.recv(id, &waker()).unwrap_err(),
            (ErrorCode::NotAllowed, "no UDP rule".to_string())
        );
        st.close_association(id, ErrorCode::Cancel, "bye");
        assert!(sent(&mut st, usize::MAX).is_empty());
        st.close_association(id2, ErrorCode::Cancel, "bye");
        assert!(matches!(
            sent(&mut st, usize::MAX).as_slice(),
            [Frame::DgramClose { .. }]
        ));
        // Datagrams for a closed id are dropped silently.
        st.on_frame(Instant::now(), dgram(id2, 10), 20).unwrap();
    }

    #[test]
    fn a_peer_that_opens_associations_we_refuse_and_never_reads_is_cut_off() {
        let mut st = state(true);
        let mut cut = false;
        for i in 0..40_000u32 {
            let f = Frame::DgramOpen {
                assoc: 2 + 2 * i,
                meta: Meta::default(),
            };
            if st.on_frame(Instant::now(), f, 10).is_err() {
                cut = true;
                break;
            }
            let (id, _) = st.dgrams.next_incoming(&waker()).unwrap();
            // What the DMZ does over a token's limit: refuse by closing.
            st.close_association(id, ErrorCode::Limit, "too many associations for this token");
        }
        assert!(cut, "the refusals queued without bound");
    }
}
