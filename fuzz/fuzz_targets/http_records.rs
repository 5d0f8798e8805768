//! The HTTP fallback transport's body and query parsing: `tunnel::http::take_record` (records
//! split off a streamed body as its pieces arrive), `parse_records` (a whole `POST` body or
//! long-poll answer) and `parse_query` (`seq=N&ack=A&mode=…`), all of which read what anyone who
//! reaches the gateway's `…/agent/http` endpoint (or, on the agent, the gateway) sends.
//!
//! Input: byte 0 is `k`; the next `k % 8` bytes are piece lengths (each `1 + b % 64`, cycled)
//! that cut the rest, the body, into the pieces a streamed response arrives in. Properties:
//! * nothing panics;
//! * `parse_records` accepts a body iff it is a sequence of whole records of at most
//!   `MAX_MESSAGE` bytes, and the records it returns re-encode (`put_record`) to the body;
//! * `take_record` fed the body piece by piece yields the same records as `parse_records` and
//!   fails the same way: `TooLarge(n)` for the same `n`, and for a truncated body it waits for
//!   more (leaving exactly the unfinished record in its buffer) instead of failing;
//! * `parse_query` on the whole input (UTF-8, lossily) never panics, and a parsed query printed
//!   back as `seq=…&ack=…&mode=…` parses to the same query.
#![no_main]

use bytes::{BufMut, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tunnel::http::{parse_query, parse_records, put_record, take_record, RecordError, MAX_MESSAGE};

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(q) = parse_query(&s) {
        let mode = if q.poll { "poll" } else { "stream" };
        let again = parse_query(&format!("seq={}&ack={}&mode={mode}", q.seq, q.ack));
        assert_eq!(again, Ok(q), "{s:?}");
    }

    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let n_cuts = (k % 8) as usize;
    if rest.len() < n_cuts {
        return;
    }
    let (cuts, body) = rest.split_at(n_cuts);
    let body = Bytes::copy_from_slice(body);

    let whole = parse_records(body.clone());
    if let Ok(msgs) = &whole {
        let mut enc = BytesMut::new();
        for m in msgs {
            assert!(m.len() <= MAX_MESSAGE);
            put_record(&mut enc, m);
        }
        assert_eq!(&enc[..], &body[..], "records do not re-encode to the body");
    }

    // The same body, arriving in pieces.
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut failed = None;
    let mut at = 0;
    let mut i = 0;
    'feed: while at < body.len() {
        let len = if cuts.is_empty() {
            body.len()
        } else {
            1 + (cuts[i % cuts.len()] % 64) as usize
        };
        i += 1;
        let end = (at + len).min(body.len());
        buf.put_slice(&body[at..end]);
        at = end;
        loop {
            match take_record(&mut buf) {
                Ok(Some(m)) => got.push(m),
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break 'feed;
                }
            }
        }
    }
    match (whole, failed) {
        (Ok(msgs), None) => {
            assert_eq!(got, msgs, "pieces and whole body disagree");
            assert!(buf.is_empty(), "bytes left after a complete body");
        }
        (Err(RecordError::TooLarge(a)), Some(RecordError::TooLarge(b))) => {
            assert_eq!(a, b);
            assert!(a > MAX_MESSAGE);
        }
        (Err(RecordError::Truncated), None) => {
            // Every complete record came out; what is left is one unfinished record.
            let mut enc = BytesMut::new();
            for m in &got {
                put_record(&mut enc, m);
            }
            assert_eq!(enc.len() + buf.len(), body.len());
            assert_eq!(&enc[..], &body[..enc.len()]);
            assert_eq!(&buf[..], &body[enc.len()..]);
            assert!(!buf.is_empty());
        }
        (w, p) => panic!("whole body: {w:?}, in pieces: {p:?}"),
    }
});
