//! SOCKS5 front end, driven byte by byte over an in-memory duplex pipe.

mod common;

use std::sync::Arc;

use common::{
    echo_server, expect_reset, refused_after_answer, serve_one_tcp, shout_server, Behaviour,
    FakeDialer,
};
use socks::{serve_socks5, DialErrorKind, FrontError, LocalAuth, OpenMode, RelayStats, Target};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

type Served = JoinHandle<Result<RelayStats, FrontError>>;

fn start(dialer: Arc<FakeDialer>, auth: Option<LocalAuth>) -> (DuplexStream, Served) {
    let (client, server) = duplex(64 * 1024);
    let task = tokio::spawn(serve_socks5(server, dialer, auth.map(Arc::new)));
    (client, task)
}

/// `VER CMD RSV` + address bytes (ATYP ADDR PORT).
fn request(cmd: u8, addr: &[u8]) -> Vec<u8> {
    [&[5, cmd, 0][..], addr].concat()
}

fn domain(name: &str, port: u16) -> Vec<u8> {
    [
        &[3, name.len() as u8][..],
        name.as_bytes(),
        &port.to_be_bytes(),
    ]
    .concat()
}

/// No-auth greeting, then the request; returns the 10-byte reply.
async fn no_auth_request(client: &mut DuplexStream, req: &[u8]) -> [u8; 10] {
    client.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    client.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 0]);
    client.write_all(req).await.unwrap();
    let mut reply = [0u8; 10];
    client.read_exact(&mut reply).await.unwrap();
    reply
}

/// A CONNECT to `db.sallyport.invalid:5432` (vouched for by the dialer when `known`), a ping
/// through it; the dialer's calls.
async fn ping_through(known: bool) -> Vec<(Target, OpenMode)> {
    let echo = echo_server().await;
    let mut dialer = FakeDialer::new().route("db.sallyport.invalid", Behaviour::Connect(echo));
    if known {
        dialer = dialer.know("db.sallyport.invalid");
    }
    let (mut client, task) = start(dialer.clone(), None);
    let reply = no_auth_request(
        &mut client,
        &request(1, &domain("db.sallyport.invalid", 5432)),
    )
    .await;
    assert_eq!(reply[1], 0x00, "success");
    client.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    client.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
    drop(client);
    task.await.unwrap().unwrap();
    dialer.calls()
}

#[tokio::test]
async fn domain_name_reaches_dialer_unresolved_and_confirmed() {
    assert_eq!(
        ping_through(false).await,
        vec![(
            Target::new("db.sallyport.invalid", 5432),
            OpenMode::Confirmed
        )]
    );
}

#[tokio::test]
async fn a_destination_known_to_open_is_answered_before_the_far_end_confirms() {
    assert_eq!(
        ping_through(true).await,
        vec![(Target::new("db.sallyport.invalid", 5432), OpenMode::Early)]
    );
}

#[tokio::test]
async fn ipv4_literal_becomes_dotted_text() {
    let echo = echo_server().await;
    let dialer = FakeDialer::new().route("10.1.2.3", Behaviour::Connect(echo));
    let (mut client, _task) = start(dialer.clone(), None);
    let reply = no_auth_request(&mut client, &request(1, &[1, 10, 1, 2, 3, 0x1f, 0x90])).await;
    assert_eq!(reply[1], 0x00);
    assert_eq!(dialer.calls()[0].0, Target::new("10.1.2.3", 8080));
}

#[tokio::test]
async fn ipv6_literal_becomes_text_without_brackets() {
    let echo = echo_server().await;
    let dialer = FakeDialer::new().route("fd00::1", Behaviour::Connect(echo));
    let (mut client, _task) = start(dialer.clone(), None);
    let ip: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
    let addr = [&[4][..], &ip.octets(), &443u16.to_be_bytes()].concat();
    let reply = no_auth_request(&mut client, &request(1, &addr)).await;
    assert_eq!(reply[1], 0x00);
    let target = &dialer.calls()[0].0;
    assert_eq!(target.host, "fd00::1");
    assert_eq!(target.to_string(), "[fd00::1]:443");
}

#[tokio::test]
async fn relays_both_ways_with_half_close_and_counts_bytes() {
    let shout = shout_server().await;
    let dialer = FakeDialer::new().route("shout.internal", Behaviour::Connect(shout));
    let (mut client, task) = start(dialer, None);
    let reply = no_auth_request(&mut client, &request(1, &domain("shout.internal", 7))).await;
    assert_eq!(reply[1], 0x00);

    // The server answers only after it sees EOF: our shutdown must travel up,
    // and its close must travel back down for read_to_end to finish.
    client.write_all(b"hello world").await.unwrap();
    client.shutdown().await.unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"HELLO WORLD");

    let stats = task.await.unwrap().unwrap();
    assert_eq!(stats.target, Some(Target::new("shout.internal", 7)));
    assert_eq!((stats.up, stats.down), (11, 11));
}

async fn password_exchange(user: &str, pass: &str) -> (u8, DuplexStream, Served) {
    let echo = echo_server().await;
    let dialer = FakeDialer::new().route("app.internal", Behaviour::Connect(echo));
    let (mut client, task) = start(dialer, Some(LocalAuth::new("alice", "s3cret")));
    client.write_all(&[5, 2, 0, 2]).await.unwrap();
    let mut choice = [0u8; 2];
    client.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 2], "username/password chosen over no-auth");
    let msg = [
        &[1, user.len() as u8][..],
        user.as_bytes(),
        &[pass.len() as u8],
        pass.as_bytes(),
    ]
    .concat();
    client.write_all(&msg).await.unwrap();
    let mut status = [0u8; 2];
    client.read_exact(&mut status).await.unwrap();
    assert_eq!(status[0], 1);
    (status[1], client, task)
}

#[tokio::test]
async fn password_auth_with_right_credentials_connects() {
    let (status, mut client, _task) = password_exchange("alice", "s3cret").await;
    assert_eq!(status, 0);
    client
        .write_all(&request(1, &domain("app.internal", 80)))
        .await
        .unwrap();
    let mut reply = [0u8; 10];
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[1], 0x00);
}

#[tokio::test]
async fn password_auth_with_wrong_password_is_rejected() {
    let (status, _client, task) = password_exchange("alice", "guess").await;
    assert_ne!(status, 0);
    assert!(matches!(task.await.unwrap(), Err(FrontError::AuthFailed)));
}

#[tokio::test]
async fn client_offering_only_no_auth_is_refused_when_auth_is_required() {
    let (mut client, task) = start(FakeDialer::new(), Some(LocalAuth::new("alice", "s3cret")));
    client.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    client.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 0xff]);
    assert!(matches!(
        task.await.unwrap(),
        Err(FrontError::NoAcceptableAuth)
    ));
}

#[tokio::test]
async fn each_dial_error_kind_becomes_its_reply_code() {
    use DialErrorKind::*;
    for (kind, code) in [
        (NotAllowed, 0x02),
        (NoRoute, 0x04),
        (Refused, 0x05),
        (Unreachable, 0x03),
        (HostNotFound, 0x04),
        (TimedOut, 0x06),
        (Unavailable, 0x01),
        (Other, 0x01),
    ] {
        let dialer = FakeDialer::new().route("x.internal", Behaviour::Fail(kind));
        let (mut client, task) = start(dialer, None);
        let reply = no_auth_request(&mut client, &request(1, &domain("x.internal", 1))).await;
        assert_eq!(reply[..4], [5, code, 0, 1], "{kind:?}");
        match task.await.unwrap() {
            Err(FrontError::Dial { source, .. }) => assert_eq!(source.kind, kind),
            other => panic!("{kind:?}: unexpected {other:?}"),
        }
    }
}

/// An app answered early whose open is refused after all must see its connection fail: a
/// plain close (EOF) right after a success reply reads as a service that had nothing to say.
#[tokio::test]
async fn an_early_answered_open_that_is_refused_resets_the_app_connection_instead_of_closing_it() {
    let (mut client, task) =
        serve_one_tcp(|tcp| serve_socks5(tcp, refused_after_answer(), None)).await;
    client.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    client.read_exact(&mut choice).await.unwrap();
    client
        .write_all(&request(1, &domain("gone.internal", 443)))
        .await
        .unwrap();
    let mut reply = [0u8; 10];
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[1], 0x00, "answered early");
    assert!(task.await.unwrap().is_err());
    expect_reset(&mut client).await;
}

#[tokio::test]
async fn bind_and_udp_associate_get_command_not_supported() {
    for cmd in [2u8, 3] {
        let dialer = FakeDialer::new();
        let (mut client, task) = start(dialer.clone(), None);
        let reply = no_auth_request(&mut client, &request(cmd, &[1, 127, 0, 0, 1, 0, 80])).await;
        assert_eq!(reply[1], 0x07, "command {cmd}");
        assert!(matches!(task.await.unwrap(), Err(FrontError::Socks5(_))));
        assert!(
            dialer.calls().is_empty(),
            "nothing dialed for command {cmd}"
        );
    }
}

#[tokio::test]
async fn malformed_greetings_are_errors_not_panics() {
    let cases: [&[u8]; 4] = [
        &[4, 1, 0, 0, 80, 127, 0, 0, 1, 0], // a SOCKS4 request
        &[5],                               // truncated greeting
        &[5, 3, 0],                         // fewer methods than announced
        b"GET / HTTP/1.1\r\n\r\n",          // garbage
    ];
    for bytes in cases {
        let (mut client, task) = start(FakeDialer::new(), None);
        client.write_all(bytes).await.unwrap();
        client.shutdown().await.unwrap();
        let result = task.await.expect("no panic");
        assert!(result.is_err(), "{bytes:?} gave {result:?}");
    }
}

#[tokio::test]
async fn unknown_address_type_is_an_error_not_a_panic() {
    let (mut client, task) = start(FakeDialer::new(), None);
    let reply = no_auth_request(&mut client, &request(1, &[9, 1, 2, 3, 4, 0, 80])).await;
    assert_eq!(reply[1], 0x08, "address type not supported");
    assert!(task.await.unwrap().is_err());
}

#[tokio::test]
async fn empty_or_odd_domain_names_are_refused_without_dialing() {
    for name in ["", "bad name", "a/b"] {
        let dialer = FakeDialer::new();
        let (mut client, task) = start(dialer.clone(), None);
        let reply = no_auth_request(&mut client, &request(1, &domain(name, 80))).await;
        assert_ne!(reply[1], 0x00, "{name:?}");
        assert!(task.await.unwrap().is_err());
        assert!(dialer.calls().is_empty());
    }
}
