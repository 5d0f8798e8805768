//! `gateway::http::read_head`: the first bytes any client on the internet sends to the gateway's
//! one port.
//!
//! Input layout: byte 0 picks how the rest is cut into reads (the capacity of an in-memory
//! `tokio::io::duplex` pipe, so the head arrives split at fuzzer-chosen points, as over TCP);
//! bytes 1.. are what the client sends before closing its side.
//!
//! Properties checked:
//! * `read_head` returns `Ok` or `Err`, never panics and never hangs (the writer gets `BrokenPipe`
//!   once the reader is done, so an early answer cannot dead-lock);
//! * `Err(TooLarge)` only when more than `MAX_HEAD` bytes were sent;
//! * on `Ok`, `leftover` is exactly what followed the head (a prefix of it: only what was read);
//! * for inputs no larger than `MAX_HEAD`, the outcome does not depend on how the bytes were split
//!   (same method, path and headers, or the same kind of error) — compared with a single write.
#![no_main]

use std::sync::OnceLock;

use gateway::http::{read_head, HeadError, RequestHead, MAX_HEAD};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    })
}

/// Sends `data` through a duplex pipe of capacity `pipe` and reads one head from the other end.
fn run(data: &[u8], pipe: usize) -> Result<RequestHead, HeadError> {
    runtime().block_on(async {
        let (mut client, mut server) = tokio::io::duplex(pipe);
        let reader = async move {
            // Dropping `server` when done makes a blocked writer fail with BrokenPipe.
            read_head(&mut server).await
        };
        let writer = async move {
            let _ = client.write_all(data).await;
            // Dropping `client` is the client closing: the reader sees EOF after the buffer.
        };
        let (res, ()) = tokio::join!(reader, writer);
        res
    })
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Head {
        method: String,
        path: String,
        headers: Vec<(String, String)>,
    },
    Eof,
    TooLarge,
    Malformed,
    Io,
}

fn outcome(r: &Result<RequestHead, HeadError>) -> Outcome {
    match r {
        Ok(h) => Outcome::Head {
            method: h.method.clone(),
            path: h.path.clone(),
            headers: h.headers.clone(),
        },
        Err(HeadError::Eof) => Outcome::Eof,
        Err(HeadError::TooLarge) => Outcome::TooLarge,
        Err(HeadError::Malformed(_)) => Outcome::Malformed,
        Err(HeadError::Io(_)) => Outcome::Io,
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, data)) = input.split_first() else {
        return;
    };
    // Pipe capacity 1..=4096 bytes, but never so small that a long input costs more than ~64
    // reads (read_head re-parses the whole buffer after every read: quadratic in the read count).
    let pipe = (1 + sel as usize * 16).max(data.len() / 64).max(1);
    let res = run(data, pipe);

    match &res {
        Ok(head) => {
            // The head ends where httparse says it does on the whole input; leftover follows it.
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(data) {
                Ok(httparse::Status::Complete(len)) => {
                    assert!(
                        data[len..].starts_with(&head.leftover),
                        "leftover is not what followed the head"
                    );
                }
                other => panic!("read_head accepted a head that httparse reads as {other:?}"),
            }
            let _ = head.header("upgrade");
            let _ = head.header_has("connection", "upgrade");
            let _ = head.header_has("sec-websocket-protocol", "sallyport");
        }
        Err(HeadError::TooLarge) => {
            assert!(data.len() > MAX_HEAD, "TooLarge for {} bytes", data.len());
        }
        Err(HeadError::Io(e)) => panic!("unexpected I/O error from an in-memory pipe: {e}"),
        Err(e) => {
            let _ = e.to_string();
        }
    }

    if data.len() <= MAX_HEAD {
        let whole = run(data, data.len().max(1));
        assert_eq!(
            outcome(&res),
            outcome(&whole),
            "result depends on how the bytes were split (pipe {pipe})"
        );
    }
});
