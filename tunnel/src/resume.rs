//! The rules of one end of a resumable stream, with no I/O and no clock: what the app wrote and
//! the peer has not acknowledged (the retained bytes, which are also the send queue), what we
//! received, the end-to-end `ACK` offsets, the attachment number, and the offset exchange of a
//! resume. `resumable.rs` drives it over tunnel streams; docs/protocol.md ("Streams that survive
//! their session") has the protocol.
//!
//! Offsets count `DATA` bytes since the stream began, across every attachment; a `FIN` counts as
//! one more (so an `ACK` of `written + 1` says the peer has our `FIN` too).

use bytes::Bytes;
use std::collections::VecDeque;

/// A peer's offset that no correct peer sends: the stream is reset (`protocol`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Broken(pub String);

/// One end of a resumable stream.
#[derive(Debug)]
pub struct End {
    /// Bytes `[acked, written)`, oldest first: what the peer may still need.
    retained: VecDeque<Bytes>,
    retained_len: usize,
    /// The peer holds every data byte below this.
    acked: u64,
    /// Data bytes the app handed us.
    written: u64,
    /// Data bytes handed to the current attachment (`acked ≤ sent ≤ written`).
    sent: u64,
    /// The app's input ended: our `FIN` sits at offset `written`.
    fin_written: bool,
    /// Our `FIN` was handed to the current attachment.
    fin_sent: bool,
    /// The peer acknowledged our `FIN`.
    fin_acked: bool,
    /// Data bytes received in order (read out of an attachment: ours from then on).
    recv: u64,
    /// The peer's `FIN` arrived.
    recv_fin: bool,
    /// The last acknowledgement we sent (or told in a resume).
    ack_told: u64,
    /// The current attachment (0: the `OPEN`).
    attach: u32,
    /// Most bytes retained at once.
    cap: usize,
    /// Not resumable after all (the far end did not agree): bytes are dropped once sent.
    plain: bool,
}

impl End {
    pub fn new(cap: usize) -> End {
        End {
            retained: VecDeque::new(),
            retained_len: 0,
            acked: 0,
            written: 0,
            sent: 0,
            fin_written: false,
            fin_sent: false,
            fin_acked: false,
            recv: 0,
            recv_fin: false,
            ack_told: 0,
            attach: 0,
            cap: cap.max(1),
            plain: false,
        }
    }

    // --- sending -------------------------------------------------------------------------

    /// How many more bytes the app may write now.
    pub fn writable(&self) -> usize {
        if self.fin_written {
            return 0;
        }
        self.cap.saturating_sub(self.retained_len)
    }

    /// Takes up to [`End::writable`] bytes of `data` (a copy); returns how many.
    pub fn write(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.writable());
        self.write_bytes(Bytes::copy_from_slice(&data[..n]))
    }

    /// [`End::write`] of bytes already in a `Bytes`: up to [`End::writable`] of them are kept
    /// as they are (no copy); returns how many.
    pub fn write_bytes(&mut self, data: Bytes) -> usize {
        let n = data.len().min(self.writable());
        if n > 0 {
            self.retained.push_back(data.slice(..n));
            self.retained_len += n;
            self.written += n as u64;
        }
        n
    }

    /// The app's input ended.
    pub fn write_fin(&mut self) {
        self.fin_written = true;
    }

    /// The next bytes to hand to the current attachment (`None`: all sent). At most one
    /// retained chunk, from `sent` on: a view of it, so the frame shares the retained bytes
    /// (no copy).
    pub fn unsent(&self) -> Option<Bytes> {
        if self.sent >= self.written {
            return None;
        }
        let mut at = self.acked;
        for chunk in &self.retained {
            let end = at + chunk.len() as u64;
            if self.sent < end {
                return Some(chunk.slice((self.sent - at) as usize..));
            }
            at = end;
        }
        None
    }

    /// Whether bytes the app wrote still wait to be handed to the attachment.
    pub fn has_unsent(&self) -> bool {
        self.sent < self.written
    }

    /// `n` bytes of [`End::unsent`] were handed to the attachment.
    pub fn on_sent(&mut self, n: usize) {
        self.sent = (self.sent + n as u64).min(self.written);
        if self.plain {
            self.trim(self.sent);
        }
    }

    /// Our `FIN` is due: the app's input ended and every byte is handed over.
    pub fn fin_due(&self) -> bool {
        self.fin_written && !self.fin_sent && !self.fin_acked && self.sent == self.written
    }

    pub fn on_fin_sent(&mut self) {
        self.fin_sent = true;
    }

    /// The peer's `ACK`: frees what it covers. A value below ours is stale (from a superseded
    /// path) and ignored; one beyond what we sent is a broken peer.
    pub fn on_ack(&mut self, offset: u64) -> Result<(), Broken> {
        let top = self.sent + u64::from(self.fin_sent);
        if offset > top {
            return Err(Broken(format!(
                "peer acknowledged offset {offset}, beyond the {top} sent"
            )));
        }
        self.apply_ack(offset);
        Ok(())
    }

    fn apply_ack(&mut self, offset: u64) {
        let data = offset.min(self.written);
        if data > self.acked {
            self.trim(data);
        }
        if self.fin_written && offset > self.written {
            self.fin_acked = true;
        }
    }

    /// Drops retained bytes below `to`.
    fn trim(&mut self, to: u64) {
        while let Some(front) = self.retained.front_mut() {
            if self.acked >= to {
                break;
            }
            let take = ((to - self.acked) as usize).min(front.len());
            if take == front.len() {
                self.retained.pop_front();
            } else {
                let _ = front.split_to(take);
            }
            self.retained_len -= take;
            self.acked += take as u64;
        }
    }

    /// Bytes retained now (what a memory budget counts).
    pub fn retained(&self) -> usize {
        self.retained_len
    }

    /// The far end did not agree to resume: behave as a plain stream (nothing retained once
    /// sent, no acknowledgements expected).
    pub fn set_plain(&mut self) {
        self.plain = true;
        self.trim(self.sent);
    }

    pub fn is_plain(&self) -> bool {
        self.plain
    }

    // --- receiving -----------------------------------------------------------------------

    /// `n` data bytes were read out of the current attachment.
    pub fn on_recv(&mut self, n: usize) {
        self.recv += n as u64;
    }

    /// The peer's `FIN` was read.
    pub fn on_recv_fin(&mut self) {
        self.recv_fin = true;
    }

    /// Data bytes received in order.
    pub fn received(&self) -> u64 {
        self.recv
    }

    pub fn recv_fin(&self) -> bool {
        self.recv_fin
    }

    /// What we acknowledge: data bytes received, plus one for the peer's `FIN`.
    pub fn ack_value(&self) -> u64 {
        self.recv + u64::from(self.recv_fin)
    }

    /// Received and not yet acknowledged.
    pub fn unacked(&self) -> u64 {
        self.ack_value() - self.ack_told
    }

    /// We sent (or told in a resume) an acknowledgement of everything so far.
    pub fn acked_now(&mut self) -> u64 {
        self.ack_told = self.ack_value();
        self.ack_told
    }

    // --- attachments and resume -----------------------------------------------------------

    pub fn attach(&self) -> u32 {
        self.attach
    }

    /// The opener's next attempt gets the next number.
    pub fn next_attach(&mut self) -> u32 {
        self.attach = self.attach.saturating_add(1);
        self.attach
    }

    /// The holder accepts attachment `n` only above its current one (an overtaken attempt is
    /// stale).
    pub fn accept_attach(&mut self, n: u32) -> Result<(), Broken> {
        if n <= self.attach {
            return Err(Broken(format!(
                "attachment {n} is not newer than the current {}",
                self.attach
            )));
        }
        self.attach = n;
        Ok(())
    }

    /// A new attachment: the peer says it holds `peer_recv` (data, plus one for our `FIN`).
    /// Retransmission starts at exactly the first byte it lacks.
    pub fn resume(&mut self, peer_recv: u64) -> Result<(), Broken> {
        let top = self.written + u64::from(self.fin_written);
        if peer_recv < self.acked || peer_recv > top {
            return Err(Broken(format!(
                "peer resumes at offset {peer_recv}, outside the {}..={top} this end can resend",
                self.acked
            )));
        }
        self.apply_ack(peer_recv);
        self.sent = self.acked;
        self.fin_sent = self.fin_acked;
        Ok(())
    }

    /// Both directions ended and each end knows the other has everything: nothing is left to
    /// resume.
    pub fn done(&self) -> bool {
        self.fin_acked && self.recv_fin
    }

    pub fn fin_acked(&self) -> bool {
        self.fin_acked
    }

    pub fn written(&self) -> u64 {
        self.written
    }
}

/// Parses an offset from `OPEN`/`OPEN_OK` metadata: strict decimal `u64`.
pub fn parse_offset(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends everything unsent of `a` into a vector (one attachment's worth of DATA).
    fn drain(a: &mut End) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(s) = a.unsent() {
            let s = s.to_vec();
            a.on_sent(s.len());
            out.extend(s);
        }
        out
    }

    #[test]
    fn writes_stop_at_the_cap_and_acks_make_room() {
        let mut e = End::new(10);
        assert_eq!(e.write(b"0123456789abc"), 10);
        assert_eq!(e.writable(), 0);
        assert_eq!(drain(&mut e), b"0123456789");
        e.on_ack(4).unwrap();
        assert_eq!(e.retained(), 6);
        assert_eq!(e.write(b"xyzw"), 4);
        assert!(e.on_ack(15).is_err(), "beyond what was sent");
        e.on_ack(2).unwrap(); // stale: ignored
        assert_eq!(e.retained(), 10);
    }

    #[test]
    fn a_resume_resends_exactly_what_the_peer_lacks() {
        let mut e = End::new(100);
        e.write(b"hello ");
        e.write(b"world");
        assert_eq!(drain(&mut e), b"hello world");
        e.on_ack(3).unwrap();
        // The peer got 8 bytes before the path broke.
        e.resume(8).unwrap();
        assert_eq!(drain(&mut e), b"rld");
        assert!(e.resume(2).is_err(), "below what it acknowledged");
        assert!(e.resume(12).is_err(), "beyond what was written");
    }

    #[test]
    fn a_fin_lost_with_its_session_is_sent_again() {
        let mut e = End::new(100);
        e.write(b"bye");
        e.write_fin();
        drain(&mut e);
        assert!(e.fin_due());
        e.on_fin_sent();
        assert!(!e.fin_due());
        e.resume(3).unwrap(); // data arrived, the FIN did not
        assert!(e.fin_due());
        e.on_fin_sent();
        e.on_ack(4).unwrap();
        assert!(e.fin_acked());
        e.on_recv_fin();
        assert!(e.done());
    }

    #[test]
    fn an_overtaken_resume_is_stale() {
        let mut e = End::new(1);
        e.accept_attach(2).unwrap();
        assert!(e.accept_attach(1).is_err());
        assert!(e.accept_attach(2).is_err());
        e.accept_attach(3).unwrap();
    }

    #[test]
    fn offsets_are_strict_decimal() {
        assert_eq!(parse_offset("0"), Some(0));
        assert_eq!(parse_offset("18446744073709551615"), Some(u64::MAX));
        for bad in ["", "+1", "-1", " 1", "1e3", "18446744073709551616", "0x10"] {
            assert_eq!(parse_offset(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_plain_stream_keeps_nothing_once_sent() {
        let mut e = End::new(8);
        e.write(b"abcdefgh");
        e.set_plain();
        drain(&mut e);
        assert_eq!(e.retained(), 0);
        assert_eq!(e.writable(), 8);
    }

    /// Property: whatever point the path breaks at (mid-data, mid-ack, during a resume, with
    /// part of what was in flight delivered), no byte is lost or duplicated and both `FIN`s
    /// arrive.
    mod never_loses_or_duplicates {
        use super::super::*;
        use proptest::prelude::*;
        use std::collections::VecDeque;

        #[derive(Clone, Debug)]
        enum Msg {
            Data(Vec<u8>),
            Fin,
            Ack(u64),
        }

        #[derive(Clone, Debug)]
        enum Step {
            Write(bool, u8),
            Fin(bool),
            Pump(bool, u8),
            Deliver(bool, u8),
            Ack(bool),
            /// The session drops: `u8` messages each way still arrive, the rest are lost; then
            /// a resume (which may itself break before it completes: `bool`).
            Drop(u8, bool),
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                (any::<bool>(), 1u8..40).prop_map(|(s, n)| Step::Write(s, n)),
                any::<bool>().prop_map(Step::Fin),
                (any::<bool>(), 1u8..9).prop_map(|(s, n)| Step::Pump(s, n)),
                (any::<bool>(), 1u8..9).prop_map(|(s, n)| Step::Deliver(s, n)),
                any::<bool>().prop_map(Step::Ack),
                (0u8..4, any::<bool>()).prop_map(|(k, b)| Step::Drop(k, b)),
            ]
        }

        struct Side {
            end: End,
            wrote: Vec<u8>,
            got: Vec<u8>,
            out: VecDeque<Msg>,
        }

        impl Side {
            fn new() -> Side {
                Side {
                    end: End::new(64),
                    wrote: Vec::new(),
                    got: Vec::new(),
                    out: VecDeque::new(),
                }
            }
            fn pump(&mut self, frames: usize) {
                for _ in 0..frames {
                    if let Some(s) = self.end.unsent() {
                        let n = s.len().min(7);
                        let d = s[..n].to_vec();
                        self.end.on_sent(n);
                        self.out.push_back(Msg::Data(d));
                    } else if self.end.fin_due() {
                        self.end.on_fin_sent();
                        self.out.push_back(Msg::Fin);
                    }
                }
            }
        }

        /// `to` reads one message that `from` sent.
        fn deliver(msg: Msg, to: &mut Side, from_wrote: &[u8]) {
            match msg {
                Msg::Data(d) => {
                    assert!(!to.end.recv_fin(), "data after FIN");
                    let at = to.got.len();
                    assert_eq!(
                        &from_wrote[at..at + d.len()],
                        &d[..],
                        "gap or duplicate at {at}"
                    );
                    to.got.extend(&d);
                    to.end.on_recv(d.len());
                }
                Msg::Fin => {
                    assert_eq!(to.got.len(), from_wrote.len(), "FIN before all data");
                    to.end.on_recv_fin();
                }
                Msg::Ack(v) => to.end.on_ack(v).expect("a correct peer's ack"),
            }
        }

        fn run(steps: Vec<Step>) {
            let mut a = Side::new();
            let mut c = Side::new();
            let mut counter = 0u8;
            // False between a resume attempt that was lost and the next one: nothing flows.
            let mut linked = true;
            for st in steps {
                if !linked && matches!(st, Step::Pump(..) | Step::Deliver(..) | Step::Ack(_)) {
                    continue;
                }
                match st {
                    Step::Write(s, n) => {
                        let me = if s { &mut a } else { &mut c };
                        let data: Vec<u8> = (0..n).map(|i| counter.wrapping_add(i)).collect();
                        counter = counter.wrapping_add(n);
                        let k = me.end.write(&data);
                        me.wrote.extend(&data[..k]);
                    }
                    Step::Fin(s) => (if s { &mut a } else { &mut c }).end.write_fin(),
                    Step::Pump(s, n) => (if s { &mut a } else { &mut c }).pump(n as usize),
                    Step::Deliver(s, n) => {
                        for _ in 0..n {
                            if s {
                                let Some(m) = a.out.pop_front() else { break };
                                deliver(m, &mut c, &a.wrote);
                            } else {
                                let Some(m) = c.out.pop_front() else { break };
                                deliver(m, &mut a, &c.wrote);
                            }
                        }
                    }
                    Step::Ack(s) => {
                        let me = if s { &mut a } else { &mut c };
                        let v = me.end.acked_now();
                        me.out.push_back(Msg::Ack(v));
                    }
                    Step::Drop(k, broken_resume) => {
                        for _ in 0..k {
                            if let Some(m) = a.out.pop_front() {
                                deliver(m, &mut c, &a.wrote);
                            }
                            if let Some(m) = c.out.pop_front() {
                                deliver(m, &mut a, &c.wrote);
                            }
                        }
                        a.out.clear();
                        c.out.clear();
                        // The agent asks; the connector accepts a newer attachment and answers.
                        let n = a.end.next_attach();
                        if broken_resume {
                            linked = false; // the attempt was lost on the way: a later one follows
                            continue;
                        }
                        linked = true;
                        c.end.accept_attach(n).unwrap();
                        c.end.resume(a.end.ack_value()).unwrap();
                        a.end.resume(c.end.ack_value()).unwrap();
                        a.end.acked_now();
                        c.end.acked_now();
                    }
                }
            }
            if !linked {
                let n = a.end.next_attach();
                c.end.accept_attach(n).unwrap();
                c.end.resume(a.end.ack_value()).unwrap();
                a.end.resume(c.end.ack_value()).unwrap();
            }
            // Both apps end; the path holds from here on.
            a.end.write_fin();
            c.end.write_fin();
            for _ in 0..10_000 {
                a.pump(4);
                c.pump(4);
                while let Some(m) = a.out.pop_front() {
                    deliver(m, &mut c, &a.wrote);
                }
                while let Some(m) = c.out.pop_front() {
                    deliver(m, &mut a, &c.wrote);
                }
                if a.end.unacked() > 0 {
                    let v = a.end.acked_now();
                    a.out.push_back(Msg::Ack(v));
                }
                if c.end.unacked() > 0 {
                    let v = c.end.acked_now();
                    c.out.push_back(Msg::Ack(v));
                }
                if a.end.done() && c.end.done() {
                    break;
                }
            }
            assert!(a.end.done() && c.end.done(), "both ends finish");
            assert_eq!(c.got, a.wrote);
            assert_eq!(a.got, c.wrote);
            assert_eq!(a.end.retained() + c.end.retained(), 0);
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn drops_at_random_points(steps in proptest::collection::vec(step(), 0..120)) {
                run(steps);
            }
        }
    }
}
