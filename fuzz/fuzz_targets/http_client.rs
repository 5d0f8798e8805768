//! The agent's HTTP fallback transport reading what comes back from "the gateway" (a hostile
//! gateway, or a proxy on the way answering in its place, before anything is authenticated):
//! `tunnel::http::client::connect` — hyper parsing the answer's head, the `sallyport-session`
//! header check, the body limit — then the downstream task reading the first `GET` answer (a
//! streamed or long-polled body of length-prefixed records, `take_record`), with its retries
//! and give-up logic. Runs on a current-thread runtime with paused time, so the transport's
//! timeouts (30 s give-up, keepalive waits) pass instantly once nothing else can happen.
//!
//! Input layout: byte 0: bits 0-1 pick the downstream mode (auto, stream, poll), bits 2-3 the
//! capacity of the in-memory pipes (1, 7, 64 or 4096 bytes: where reads are cut); bytes 1-2 (big
//! endian) the length of the answer to the create `POST` (clipped to what is there); then that
//! answer; the rest is the answer to the first `GET`. Every later connection attempt fails.
//!
//! Properties checked:
//! * no panic, no hang (every task ends or gives up within the transport's own deadlines);
//! * a created session has a session id of 1 to 64 ASCII letters/digits, and a reply of at most
//!   64 KiB; a refusal's text is bounded (300 bytes of the body, lossily decoded);
//! * the messages the transport delivers are non-empty, at most `MAX_MESSAGE` bytes each, and no
//!   more bytes in all than the `GET` answer holds; then the transport reports an error.
#![no_main]

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tunnel::http::client::{connect, GatewayIo, HttpError, Options, Redial};
use tunnel::http::{DownMode, MAX_MESSAGE};
use tunnel::transport::{Transport, TransportRx, TransportTx};

/// Plays the gateway on one connection: waits for the request's head (hyper refuses bytes that
/// come before a request), writes `answer`, closes its sending side and reads on until the client
/// closes.
async fn serve(io: DuplexStream, answer: Vec<u8>) {
    let (mut r, mut w) = tokio::io::split(io);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match r.read(&mut buf).await {
            Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let drain = async move { while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {} };
    let write = async move {
        let _ = w.write_all(&answer).await;
        let _ = w.shutdown().await;
    };
    tokio::join!(drain, write);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let mode = match data[0] & 3 {
        1 => Some(DownMode::Stream),
        2 => Some(DownMode::Poll),
        _ => None,
    };
    let pipe = [1, 7, 64, 4096][((data[0] >> 2) & 3) as usize];
    let n = (u16::from_be_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
    let create = data[3..3 + n].to_vec();
    let get = data[3 + n..].to_vec();
    let get_len = get.len();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(pipe);
        tokio::spawn(serve(server, create));
        let next = Arc::new(Mutex::new(Some(get)));
        let dial: Redial = Arc::new(move || {
            let answer = next.lock().unwrap().take();
            Box::pin(async move {
                let answer = answer.ok_or_else(|| "connection refused".to_string())?;
                let (client, server) = tokio::io::duplex(pipe);
                tokio::spawn(serve(server, answer));
                Ok(Box::new(client) as GatewayIo)
            }) as Pin<Box<dyn Future<Output = Result<GatewayIo, String>> + Send>>
        });
        let opts = Options {
            host: "gw.example.com".into(),
            base: "/sallyport/agent/http".into(),
            bearer: Some("sp_fuzz_0000".into()),
            mac_key: None,
            mode,
            timeout: Duration::from_secs(10),
        };
        let created = match connect(dial, Some(Box::new(client)), opts, Bytes::new()).await {
            Ok(c) => c,
            Err(HttpError::Refused { status, body }) => {
                assert!(body.len() <= 3 * 300 || body.starts_with("the answer has no session id"));
                let _ = status;
                return;
            }
            Err(HttpError::Io(_)) => return,
        };
        assert!(
            (1..=64).contains(&created.sid.len())
                && created.sid.bytes().all(|b| b.is_ascii_alphanumeric()),
            "session id {:?}",
            created.sid
        );
        assert!(created.reply.len() <= 64 * 1024);
        let (mut tx, mut rx) = created.transport.split();
        let mut total = 0usize;
        let mut count = 0usize;
        loop {
            match rx.recv().await {
                Ok(Some(m)) => {
                    assert!(
                        !m.is_empty() && m.len() <= MAX_MESSAGE,
                        "message of {} bytes",
                        m.len()
                    );
                    total += m.len() + 4;
                    count += 1;
                    assert!(
                        total <= get_len,
                        "{count} messages, {total} bytes from {get_len}"
                    );
                }
                Ok(None) | Err(_) => break,
            }
        }
        tx.close().await;
    });
});
