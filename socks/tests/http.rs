//! HTTP proxy front end, driven with raw HTTP/1.1 bytes over a duplex pipe
//! so the tests see exactly what an application would see on the wire.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::Engine as _;
use common::{
    echo_server, expect_reset, origin_server, refused_after_answer, serve_one_tcp, Behaviour,
    FakeDialer,
};
use socks::{serve_http, DialErrorKind, FrontError, LocalAuth, OpenMode, Target};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

type Served = JoinHandle<Result<(), FrontError>>;

fn start(dialer: Arc<FakeDialer>, auth: Option<LocalAuth>) -> (RawClient, Served) {
    let (client, server) = duplex(64 * 1024);
    let task = tokio::spawn(serve_http(server, dialer, auth.map(Arc::new)));
    (
        RawClient {
            io: client,
            buf: Vec::new(),
        },
        task,
    )
}

/// A minimal HTTP/1.1 client: writes raw requests, parses replies with
/// httparse, reads `Content-Length` bodies, keeps leftovers for keep-alive.
struct RawClient {
    io: DuplexStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl RawClient {
    async fn send(&mut self, raw: &str) -> Reply {
        self.io.write_all(raw.as_bytes()).await.unwrap();
        self.read_reply().await
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = self.io.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "proxy closed the connection; have {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.buf.extend_from_slice(&chunk[..n]);
    }

    async fn read_reply(&mut self) -> Reply {
        let (head_len, status, headers) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut slots);
            if let httparse::Status::Complete(len) = response.parse(&self.buf).unwrap() {
                let headers: Vec<(String, String)> = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                break (len, response.code.unwrap(), headers);
            }
            self.fill().await;
        };
        self.buf.drain(..head_len);
        let mut reply = Reply {
            status,
            headers,
            body: String::new(),
        };
        let length: usize = reply
            .header("content-length")
            .map_or(0, |v| v.parse().unwrap());
        while self.buf.len() < length {
            self.fill().await;
        }
        reply.body = String::from_utf8(self.buf.drain(..length).collect()).unwrap();
        reply
    }
}

fn get(url: &str, host: &str, extra: &str) -> String {
    format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n")
}

fn basic(user: &str, pass: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

/// A CONNECT to `echo.internal:443` (vouched for by the dialer when `known`), bytes both ways
/// through it; the dialer's calls.
async fn relay_through(known: bool) -> Vec<(Target, OpenMode)> {
    let echo = echo_server().await;
    let mut dialer = FakeDialer::new().route("echo.internal", Behaviour::Connect(echo));
    if known {
        dialer = dialer.know("echo.internal");
    }
    let (mut client, task) = start(dialer.clone(), None);
    let reply = client
        .send("CONNECT echo.internal:443 HTTP/1.1\r\nHost: echo.internal:443\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200);
    assert!(client.buf.is_empty());
    client.io.write_all(b"through the tunnel").await.unwrap();
    let mut back = [0u8; 18];
    client.io.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"through the tunnel");
    client.io.shutdown().await.unwrap();
    drop(client);
    task.await.unwrap().unwrap();
    dialer.calls()
}

#[tokio::test]
async fn connect_answers_200_then_relays_bytes_both_ways() {
    assert_eq!(
        relay_through(false).await,
        vec![(Target::new("echo.internal", 443), OpenMode::Confirmed)]
    );
}

#[tokio::test]
async fn a_connect_to_a_destination_known_to_open_is_answered_before_the_far_end_confirms() {
    assert_eq!(
        relay_through(true).await,
        vec![(Target::new("echo.internal", 443), OpenMode::Early)]
    );
}

/// As for SOCKS5: an app answered `200` before the far end confirmed, whose open is refused
/// after all, must see its connection fail, not end cleanly.
#[tokio::test]
async fn an_early_answered_connect_that_is_refused_resets_the_app_connection_instead_of_closing_it()
{
    let (mut client, task) =
        serve_one_tcp(|tcp| serve_http(tcp, refused_after_answer(), None)).await;
    client
        .write_all(b"CONNECT gone.internal:443 HTTP/1.1\r\nHost: gone.internal:443\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(
            client.read(&mut b).await.unwrap(),
            1,
            "closed before the answer"
        );
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    assert!(task.await.unwrap().is_err());
    expect_reset(&mut client).await;
}

#[tokio::test]
async fn connect_dial_errors_become_mapped_status_with_reason_body() {
    use DialErrorKind::*;
    let cases = [
        (NotAllowed, 403),
        (Refused, 502),
        (HostNotFound, 502),
        (TimedOut, 504),
        (Unavailable, 503),
    ];
    for (kind, status) in cases {
        let dialer = FakeDialer::new().route("x.internal", Behaviour::Fail(kind));
        let (mut client, _task) = start(dialer, None);
        let reply = client
            .send("CONNECT x.internal:443 HTTP/1.1\r\nHost: x.internal:443\r\n\r\n")
            .await;
        assert_eq!(reply.status, status, "{kind:?}");
        assert_eq!(reply.header("x-sallyport-error"), Some(kind.as_str()));
        assert!(reply
            .header("content-type")
            .unwrap()
            .starts_with("text/plain"));
        assert!(
            reply
                .body
                .starts_with("sallyport: x.internal:443: scripted"),
            "{}",
            reply.body
        );
        assert!(reply.body.ends_with('\n'));
    }
}

#[tokio::test]
async fn absolute_form_requests_to_two_different_hosts_share_one_client_connection() {
    let (alpha, _) = origin_server("alpha").await;
    let (beta, _) = origin_server("beta").await;
    let dialer = FakeDialer::new()
        .route("alpha.internal", Behaviour::Connect(alpha))
        .route("beta.internal", Behaviour::Connect(beta));
    let (mut client, _task) = start(dialer.clone(), None);

    let one = client
        .send(&get("http://alpha.internal/one?x=1", "alpha.internal", ""))
        .await;
    assert_eq!(one.status, 200);
    assert_eq!(one.body, "alpha GET /one?x=1 host=alpha.internal body=");

    let two = client
        .send(&get(
            "http://beta.internal:8080/two",
            "beta.internal:8080",
            "",
        ))
        .await;
    assert_eq!(two.status, 200);
    assert_eq!(two.body, "beta GET /two host=beta.internal:8080 body=");

    let three = client
        .send(&get("http://alpha.internal", "alpha.internal", ""))
        .await;
    assert_eq!(three.body, "alpha GET / host=alpha.internal body=");

    let calls = dialer.calls();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|(_, mode)| *mode == OpenMode::Early));
    assert_eq!(calls[1].0, Target::new("beta.internal", 8080));
}

/// A client that closed its sending side right after its request got no answer (1 time in
/// 20 an answer, from a Linux client against the Linux agent): the proxy treated the half-close
/// as the end of the connection.
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    let (alpha, _log) = origin_server("alpha").await;
    let dialer = FakeDialer::new().route("alpha.internal", Behaviour::Connect(alpha));
    let (mut client, _task) = start(dialer, None);
    client
        .io
        .write_all(get("http://alpha.internal/x", "alpha.internal", "").as_bytes())
        .await
        .unwrap();
    client.io.shutdown().await.unwrap();
    let reply = tokio::time::timeout(std::time::Duration::from_secs(5), client.read_reply())
        .await
        .expect("an answer in time");
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn keep_alive_reuses_the_upstream_connection_for_the_same_host() {
    let (alpha, log) = origin_server("alpha").await;
    let dialer = FakeDialer::new().route("alpha.internal", Behaviour::Connect(alpha));
    let (mut client, _task) = start(dialer.clone(), None);
    for i in 0..3 {
        let reply = client
            .send(&get(
                &format!("http://alpha.internal/{i}"),
                "alpha.internal",
                "",
            ))
            .await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(log.requests.load(Ordering::SeqCst), 3);
    assert_eq!(log.connections.load(Ordering::SeqCst), 1);
    assert_eq!(dialer.calls().len(), 1);
}

#[tokio::test]
async fn post_bodies_are_forwarded_with_content_length_or_chunked() {
    let (alpha, _) = origin_server("alpha").await;
    let dialer = FakeDialer::new().route("alpha.internal", Behaviour::Connect(alpha));
    let (mut client, _task) = start(dialer, None);

    let sized = client
        .send("POST http://alpha.internal/form HTTP/1.1\r\nHost: alpha.internal\r\nContent-Length: 11\r\n\r\nhello=world")
        .await;
    assert_eq!(
        sized.body,
        "alpha POST /form host=alpha.internal body=hello=world"
    );

    let chunked = client
        .send(concat!(
            "PUT http://alpha.internal/up HTTP/1.1\r\nHost: alpha.internal\r\nTransfer-Encoding: chunked\r\n\r\n",
            "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        ))
        .await;
    assert_eq!(
        chunked.body,
        "alpha PUT /up host=alpha.internal body=hello world"
    );
}

#[tokio::test]
async fn host_header_comes_from_the_url_not_the_client() {
    let (alpha, _) = origin_server("alpha").await;
    let dialer = FakeDialer::new().route("alpha.internal", Behaviour::Connect(alpha));
    let (mut client, _task) = start(dialer, None);
    let reply = client
        .send(&get("http://alpha.internal:81/", "spoofed.example", ""))
        .await;
    assert_eq!(reply.body, "alpha GET / host=alpha.internal:81 body=");
}

#[tokio::test]
async fn proxy_credentials_and_hop_by_hop_headers_are_never_forwarded() {
    let (alpha, log) = origin_server("alpha").await;
    let dialer = FakeDialer::new().route("alpha.internal", Behaviour::Connect(alpha));
    let (mut client, _task) = start(dialer, Some(LocalAuth::new("alice", "s3cret")));
    let extra = format!(
        "Proxy-Authorization: Basic {}\r\nProxy-Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n",
        basic("alice", "s3cret")
    );
    let reply = client
        .send(&get("http://alpha.internal/", "alpha.internal", &extra))
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(log.requests.load(Ordering::SeqCst), 1);
    assert!(!log.saw_forbidden_header.load(Ordering::SeqCst));
}

#[tokio::test]
async fn missing_or_wrong_proxy_credentials_get_407_and_nothing_is_dialed() {
    let dialer = FakeDialer::new();
    let (mut client, _task) = start(dialer.clone(), Some(LocalAuth::new("alice", "s3cret")));
    let wrong = format!("Proxy-Authorization: Basic {}\r\n", basic("alice", "guess"));
    for request in [
        get("http://alpha.internal/", "alpha.internal", ""),
        get("http://alpha.internal/", "alpha.internal", &wrong),
        get(
            "http://alpha.internal/",
            "alpha.internal",
            "Proxy-Authorization: Bearer abc\r\n",
        ),
        "CONNECT alpha.internal:443 HTTP/1.1\r\nHost: alpha.internal:443\r\n\r\n".to_string(),
    ] {
        let reply = client.send(&request).await;
        assert_eq!(reply.status, 407, "{request}");
        assert_eq!(
            reply.header("proxy-authenticate"),
            Some("Basic realm=\"sallyport\"")
        );
    }
    assert!(dialer.calls().is_empty());
}

#[tokio::test]
async fn malformed_request_line_gets_400_without_panic() {
    let (mut client, task) = start(FakeDialer::new(), None);
    let reply = client.send("THIS IS NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(reply.status, 400);
    assert!(matches!(
        task.await.expect("no panic"),
        Err(FrontError::Http(_))
    ));
}

#[tokio::test]
async fn origin_form_request_to_the_proxy_itself_gets_400_with_hint() {
    let (mut client, _task) = start(FakeDialer::new(), None);
    let reply = client.send(&get("/", "127.0.0.1:3128", "")).await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.body,
        "sallyport: this is a proxy port; point your client at it as an HTTP proxy\n"
    );
}

#[tokio::test]
async fn https_absolute_uri_gets_400_pointing_at_connect() {
    let dialer = FakeDialer::new();
    let (mut client, _task) = start(dialer.clone(), None);
    let reply = client
        .send(&get("https://alpha.internal/", "alpha.internal", ""))
        .await;
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("CONNECT"), "{}", reply.body);
    assert!(dialer.calls().is_empty());
}

#[tokio::test]
async fn plain_request_dial_errors_become_mapped_status() {
    let dialer = FakeDialer::new().route(
        "denied.internal",
        Behaviour::Fail(DialErrorKind::NotAllowed),
    );
    let (mut client, _task) = start(dialer, None);
    let reply = client
        .send(&get("http://denied.internal/", "denied.internal", ""))
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.header("x-sallyport-error"), Some("not-allowed"));
    // An unknown host goes through the same path (the fake dialer says 502).
    let reply = client
        .send(&get("http://nowhere.internal/", "nowhere.internal", ""))
        .await;
    assert_eq!(reply.status, 502);
    assert!(
        reply.body.contains("no such host nowhere.internal"),
        "{}",
        reply.body
    );
}

#[tokio::test]
async fn early_open_failing_later_still_maps_the_dial_error() {
    let dialer = FakeDialer::new().route(
        "slow.internal",
        Behaviour::FailLater(DialErrorKind::TimedOut),
    );
    let (mut client, _task) = start(dialer, None);
    let reply = client
        .send(&get("http://slow.internal/", "slow.internal", ""))
        .await;
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert_eq!(reply.header("x-sallyport-error"), Some("timed-out"));
    assert!(
        reply.body.contains("far end said timed-out"),
        "{}",
        reply.body
    );
}
