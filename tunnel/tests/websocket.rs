//! Sessions over the real WebSocket transport on an in-memory byte pipe: the message size limit
//! matches the frame limit, oversize or non-binary messages end the session with a reason
//! instead of being buffered, and our framing speaks with tungstenite's both ways (fragmented
//! messages and pings included).

use futures_util::SinkExt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tunnel::ws::WsTransport;
use tunnel::{Config, Dest, Meta, Role, Session, SessionError};

#[tokio::test]
async fn a_session_runs_over_websocket_and_carries_a_stream() {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let server = tokio::spawn(async move {
        let t = WsTransport::server(b, Vec::new(), 65536).await;
        let (s, mut inc) = Session::start(t, Config::new(Role::Dmz, false))
            .await
            .unwrap();
        let mut st = inc.accept().await.unwrap();
        st.accept();
        let mut buf = Vec::new();
        st.read_to_end(&mut buf).await.unwrap();
        st.write_all(&buf).await.unwrap();
        st.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s);
    });
    let t = WsTransport::client_upgraded(a, &[], 65536);
    let (c, _) = Session::start(t, Config::new(Role::Agent, true))
        .await
        .unwrap();
    let mut st = c.open(Dest::new("x", 1), Meta::default()).unwrap();
    let payload = vec![3u8; 300 * 1024];
    st.write_all(&payload).await.unwrap();
    st.shutdown().await.unwrap();
    let mut back = Vec::new();
    st.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, payload);
    server.await.unwrap();
}

async fn server_session_against_raw_client(msg: Message) -> SessionError {
    server_session_against_raw_messages(vec![msg]).await
}

async fn server_session_against_raw_messages(msgs: Vec<Message>) -> SessionError {
    let (a, b) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let t = WsTransport::server(b, Vec::new(), 65536).await;
        let (s, _inc) = Session::start(t, Config::new(Role::Dmz, false))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), s.closed())
            .await
            .expect("session closed")
    });
    let mut raw = WebSocketStream::from_raw_socket(a, WsRole::Client, None).await;
    let hello = tunnel::Frame::Hello(tunnel::Hello {
        version: tunnel::PROTOCOL_VERSION,
        role: Role::Agent,
        stream_window: 65536,
        session_window: 1 << 20,
        max_frame: 65536,
        instance_id: "raw".into(),
        features: 0,
        resume_id: String::new(),
    });
    raw.send(Message::Binary(hello.encode())).await.unwrap();
    for msg in msgs {
        if raw.send(msg).await.is_err() {
            break;
        }
    }
    let err = server.await.unwrap();
    drop(raw);
    err
}

#[tokio::test]
async fn an_oversize_message_ends_the_session_with_a_reason() {
    let err = server_session_against_raw_client(Message::Binary(vec![4u8; 1 << 20].into())).await;
    assert!(
        matches!(&err, SessionError::Transport(r) if r.contains("too large") || r.contains("too long")),
        "{err}"
    );
}

/// A client that sends one message as an endless run of fragments, each small, cannot make the
/// DMZ buffer more than one message's limit: the fragments are counted as they arrive, and the
/// session ends with a reason once they pass the limit (64 KiB frames here; 200 fragments of 1
/// KiB would be 200 KiB).
#[tokio::test]
async fn a_fragment_flood_cannot_grow_a_message_past_the_limit() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
    let piece = || bytes::Bytes::from(vec![1u8; 1024]);
    let mut msgs = vec![Message::Frame(WsFrame::message(
        piece(),
        OpCode::Data(Data::Binary),
        false,
    ))];
    for _ in 0..200 {
        msgs.push(Message::Frame(WsFrame::message(
            piece(),
            OpCode::Data(Data::Continue),
            false,
        )));
    }
    let err = server_session_against_raw_messages(msgs).await;
    assert!(
        matches!(&err, SessionError::Transport(r) if r.contains("too large")),
        "{err}"
    );
}

/// A gateway (or a box in front of it) that answers the upgrade with a head that never ends:
/// the client reads at most 16 KiB of it, then gives up with a reason, instead of buffering
/// until the handshake deadline.
#[tokio::test]
async fn an_endless_upgrade_answer_is_refused_after_16_kib() {
    let (a, mut b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut req = [0u8; 4096];
        let _ = b.read(&mut req).await;
        let _ = b
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nX-Pad: ")
            .await;
        let line = vec![b'a'; 4096];
        let mut sent = 0usize;
        while b.write_all(&line).await.is_ok() {
            sent += line.len();
            if sent > 1 << 20 {
                break;
            }
        }
        sent
    });
    let err = tunnel::ws::client(a, "ws://gw/", None, 65536, Duration::from_secs(10))
        .await
        .err()
        .expect("an endless answer is refused");
    assert!(err.to_string().contains("over 16384 bytes"), "{err}");
    let sent = server.await.unwrap();
    assert!(
        sent < 1 << 20,
        "the client stopped reading: {sent} bytes sent"
    );
}

#[tokio::test]
async fn a_text_message_ends_the_session_with_a_reason() {
    let err = server_session_against_raw_client(Message::Text("hello".into())).await;
    assert!(
        matches!(&err, SessionError::Transport(r) if r.contains("non-binary")),
        "{err}"
    );
}

/// Our client framing against tungstenite as the server: whole messages, a message tungstenite
/// sends in fragments, and its `PING` (answered with our next write).
#[tokio::test]
async fn our_client_framing_speaks_with_tungstenite_as_the_server() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
    use tunnel::{TransportRx, TransportTx};
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut server = WebSocketStream::from_raw_socket(b, WsRole::Server, None).await;
    let (mut tx, mut rx) = tunnel::Transport::split(WsTransport::client_upgraded(a, &[], 65536));
    tx.send(bytes::Bytes::from(vec![5u8; 70_000]))
        .await
        .unwrap();
    tx.send(bytes::Bytes::from_static(b"small")).await.unwrap();
    tx.flush().await.unwrap();
    let m = server.next().await.unwrap().unwrap();
    assert_eq!(m, Message::Binary(vec![5u8; 70_000].into()));
    let m = server.next().await.unwrap().unwrap();
    assert_eq!(m, Message::Binary(bytes::Bytes::from_static(b"small")));
    // A message in two fragments, with a ping between them.
    let first = WsFrame::message(
        bytes::Bytes::from_static(b"frag"),
        OpCode::Data(Data::Binary),
        false,
    );
    let last = WsFrame::message(
        bytes::Bytes::from_static(b"ment"),
        OpCode::Data(Data::Continue),
        true,
    );
    server.send(Message::Frame(first)).await.unwrap();
    server
        .send(Message::Ping(bytes::Bytes::from_static(b"p1")))
        .await
        .unwrap();
    server.send(Message::Frame(last)).await.unwrap();
    assert_eq!(&rx.recv().await.unwrap().unwrap()[..], b"fragment");
    tx.flush().await.unwrap();
    let m = server.next().await.unwrap().unwrap();
    assert_eq!(m, Message::Pong(bytes::Bytes::from_static(b"p1")));
    tx.close().await;
    assert!(matches!(
        server.next().await,
        Some(Ok(Message::Close(_))) | None
    ));
}

/// A peer that floods WebSocket `PING`s (10,000 before one message) cannot make us queue
/// answers: one pong slot, overwritten by each ping, so one `PONG` (the latest) goes out with
/// our next write, and the message behind the flood still arrives.
#[tokio::test]
async fn a_ping_flood_queues_one_pong_not_ten_thousand() {
    use futures_util::StreamExt;
    use tunnel::{TransportRx, TransportTx};
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut server = WebSocketStream::from_raw_socket(b, WsRole::Server, None).await;
    let (mut tx, mut rx) = tunnel::Transport::split(WsTransport::client_upgraded(a, &[], 65536));
    let flood = tokio::spawn(async move {
        for i in 0..10_000u32 {
            server
                .feed(Message::Ping(bytes::Bytes::from(i.to_be_bytes().to_vec())))
                .await
                .unwrap();
        }
        server
            .send(Message::Binary(bytes::Bytes::from_static(b"after")))
            .await
            .unwrap();
        server
    });
    assert_eq!(&rx.recv().await.unwrap().unwrap()[..], b"after");
    let mut server = flood.await.unwrap();
    tx.send(bytes::Bytes::from_static(b"x")).await.unwrap();
    tx.flush().await.unwrap();
    let last = bytes::Bytes::from(9_999u32.to_be_bytes().to_vec());
    assert_eq!(server.next().await.unwrap().unwrap(), Message::Pong(last));
    assert_eq!(
        server.next().await.unwrap().unwrap(),
        Message::Binary(bytes::Bytes::from_static(b"x"))
    );
}
