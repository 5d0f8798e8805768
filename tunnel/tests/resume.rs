//! Resumable streams over in-memory sessions (no DMZ, no sockets): an opener and a holder end
//! keep an echo going while the session under them is dropped and replaced.

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tunnel::resumable::{
    keys, Reattached, Reopen, ReopenError, ReopenFuture, Resumable, ResumeRequest, Settings,
};
use tunnel::{memory_pair, Config, Dest, Incoming, Meta, Role, Session};

fn config(role: Role, initiator: bool) -> Config {
    let mut c = Config::new(role, initiator);
    c.resume = true;
    c.stream_window = 64 * 1024;
    c
}

async fn pair() -> ((Session, Incoming), (Session, Incoming)) {
    let (a, b) = memory_pair(64);
    let (c, s) = tokio::join!(
        Session::start(a, config(Role::Agent, true)),
        Session::start(b, config(Role::Connector, false))
    );
    (c.unwrap(), s.unwrap())
}

struct TestReopen {
    session: watch::Receiver<Option<Session>>,
    /// Gives up on the first attempt once the holder has taken it, and tries again: an agent
    /// that stopped waiting for an answer the connector then gave.
    abandon_first: Option<GiveUp>,
    attempts: Arc<std::sync::atomic::AtomicU32>,
    kept: Arc<std::sync::Mutex<Vec<tunnel::Stream>>>,
}

/// What an opener does with an attempt it gives up on.
#[derive(Clone, Copy, PartialEq, Debug)]
enum GiveUp {
    /// Keeps it open until a later attempt is answered (the agent's way).
    Keep,
    /// Resets it `cancelled`.
    Reset,
}

impl TestReopen {
    fn new(session: watch::Receiver<Option<Session>>) -> TestReopen {
        TestReopen {
            session,
            abandon_first: None,
            attempts: Default::default(),
            kept: Default::default(),
        }
    }
}

impl Reopen for TestReopen {
    fn reopen(&self, ticket: &str, attach: u32, recv: u64) -> ReopenFuture {
        let mut rx = self.session.clone();
        let ticket = ticket.to_string();
        let n = self
            .attempts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let abandon = self.abandon_first.filter(|_| n == 0);
        let kept = self.kept.clone();
        Box::pin(async move {
            let session = loop {
                if let Some(s) = rx.borrow_and_update().clone() {
                    if !s.is_closed() {
                        break s;
                    }
                }
                rx.changed()
                    .await
                    .map_err(|_| ReopenError::Gone("no more sessions".into()))?;
            };
            let mut m = Meta::default();
            m.set(keys::RESUME, ticket);
            m.set(keys::ATTACH, attach.to_string());
            m.set(keys::RECV, recv.to_string());
            let stream = session
                .open(Dest::new("echo", 7), m)
                .map_err(|e| ReopenError::Retry(e.to_string()))?;
            stream
                .opened()
                .await
                .map_err(|e| ReopenError::Retry(e.to_string()))?;
            match abandon {
                Some(GiveUp::Keep) => {
                    kept.lock().unwrap().push(stream);
                    return Err(ReopenError::Retry("given up".into()));
                }
                Some(GiveUp::Reset) => {
                    stream.reset(tunnel::ErrorCode::Cancel, "given up");
                    return Err(ReopenError::Retry("given up".into()));
                }
                None => {}
            }
            kept.lock().unwrap().clear();
            let peer_recv = stream
                .open_meta()
                .get(keys::RECV)
                .and_then(tunnel::resume::parse_offset)
                .ok_or_else(|| ReopenError::Gone("no offset".into()))?;
            Ok(Reattached { stream, peer_recv })
        })
    }
}

fn settings(grace: Duration) -> Settings {
    Settings {
        buffer: 256 * 1024,
        grace,
        charge: None,
    }
}

/// Accepts `s` as a new resumable stream (ticket `ticket-1`) and echoes through its holder end,
/// which takes its resumes from `requests`.
fn echo_holder(s: tunnel::Stream, requests: tunnel::resumable::RequestRx, grace: Duration) {
    let mut m = Meta::default();
    m.set(keys::RESUME, "ticket-1");
    s.accept_with(m);
    let mut end = Resumable::holder(s, requests, settings(grace));
    // One task polls a resumable end (as `splice` does): here an echo.
    let (mut near, far) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let _ = tunnel::splice(&mut end, &mut near).await;
    });
    tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(far);
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    });
}

/// The connector's side: new streams become echoing holders; resumes go to their holder.
fn serve(
    mut incoming: Incoming,
    holders: Arc<std::sync::Mutex<Vec<tunnel::resumable::RequestTx>>>,
    grace: Duration,
) {
    tokio::spawn(async move {
        while let Some(s) = incoming.accept().await {
            let meta = s.request().unwrap().meta.clone();
            match meta.get(keys::RESUME) {
                Some("new") => {
                    let (tx, rx) = tunnel::resumable::requests();
                    holders.lock().unwrap().push(tx);
                    echo_holder(s, rx, grace);
                }
                Some(_) => {
                    let attach = meta.get(keys::ATTACH).unwrap().parse().unwrap();
                    let peer_recv = meta.get(keys::RECV).unwrap().parse().unwrap();
                    let tx = holders.lock().unwrap()[0].clone();
                    let _ = tx.try_send(ResumeRequest {
                        stream: s,
                        attach,
                        peer_recv,
                    });
                }
                None => panic!("not resumable"),
            }
        }
    });
}

/// A session pair whose far side serves echoing holders ([`serve`]), and the first stream
/// opened on it as resumable.
struct EchoSite {
    client: Session,
    _server: Session,
    holders: Arc<std::sync::Mutex<Vec<tunnel::resumable::RequestTx>>>,
    /// The session a resume attempt should use (the test replaces it).
    sessions: watch::Sender<Option<Session>>,
    rx: watch::Receiver<Option<Session>>,
}

impl EchoSite {
    async fn start(grace: Duration) -> (EchoSite, tunnel::Stream) {
        let holders = Arc::new(std::sync::Mutex::new(Vec::new()));
        let ((client, _ci), (server, si)) = pair().await;
        serve(si, holders.clone(), grace);
        let (sessions, rx) = watch::channel(Some(client.clone()));
        let mut m = Meta::default();
        m.set(keys::RESUME, "new");
        let stream = client.open(Dest::new("echo", 7), m).unwrap();
        let site = EchoSite {
            client,
            _server: server,
            holders,
            sessions,
            rx,
        };
        (site, stream)
    }
}

#[tokio::test]
async fn an_echo_survives_two_dropped_sessions_byte_for_byte() {
    let grace = Duration::from_secs(10);
    let (echo, stream) = EchoSite::start(grace).await;
    let (client, holders, tx, rx) = (echo.client, echo.holders, echo.sessions, echo.rx);
    let mut end = Resumable::opener(stream, Box::new(TestReopen::new(rx)), settings(grace));
    let (mut near, app) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move { tunnel::splice(&mut near, &mut end).await });
    let (mut r, mut w) = tokio::io::split(app);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(10_000) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    let mut buf = vec![0u8; 50_000];
    let mut drops = 0;
    let mut current = client;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), r.read(&mut buf))
            .await
            .expect("echo stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if (got.len() > 700_000 && drops == 0) || (got.len() > 1_900_000 && drops == 1) {
            drops += 1;
            current.close(tunnel::ErrorCode::Shutdown, "test drops the session");
            let ((c, _ci), (_s, si)) = pair().await;
            serve(si, holders.clone(), grace);
            current = c.clone();
            tx.send(Some(c)).unwrap();
        }
    }
    writer.await.unwrap();
    assert_eq!(drops, 2);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the echo differs");
    assert!(tunnel::resumable::stats().resumed >= 2);
}

/// The agent gives each resume attempt 3 s; one slow under a reconnect storm can still reach
/// the connector and be taken there after the agent stopped waiting. The agent reset it
/// (`cancelled`, as dropping a stream does), which ended the connector's stream (its current
/// attachment reset by the far end), so the next attempt found it gone. Kept open instead, it
/// is superseded by the next attempt, and the stream goes on.
#[tokio::test]
async fn an_attempt_the_agent_gave_up_on_after_the_connector_took_it_does_not_end_the_stream() {
    assert!(echo_survives_a_given_up_attempt(GiveUp::Keep).await);
    // The control: reset, it ends the stream.
    assert!(!echo_survives_a_given_up_attempt(GiveUp::Reset).await);
}

/// An echo through a resumable stream whose session is dropped; the first resume attempt is
/// taken by the holder, then given up on by the opener (`how`), which tries again. Whether the
/// echo works after it.
async fn echo_survives_a_given_up_attempt(how: GiveUp) -> bool {
    let grace = Duration::from_secs(6);
    let (echo, stream) = EchoSite::start(grace).await;
    let (client, holders, tx, rx) = (echo.client, echo.holders, echo.sessions, echo.rx);
    stream.opened().await.unwrap();
    let mut reopen = TestReopen::new(rx);
    reopen.abandon_first = Some(how);
    let mut end = Resumable::opener(stream, Box::new(reopen), settings(grace));
    end.write_all(b"before").await.unwrap();
    let mut got = [0u8; 6];
    end.read_exact(&mut got).await.unwrap();
    client.close(tunnel::ErrorCode::Shutdown, "test drops the session");
    let ((c, _ci), (_s, si)) = pair().await;
    serve(si, holders.clone(), grace);
    tx.send(Some(c)).unwrap();
    let echoed = async {
        end.write_all(b"after!").await?;
        end.read_exact(&mut got).await?;
        Ok::<_, std::io::Error>(got == *b"after!")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), echoed).await,
        Ok(Ok(true))
    )
}

/// A resume whose agent reset it before the holder took it (an app that gave up while the
/// attempt was on its way) was still attached: it superseded the live attachment, which the
/// holder reset, and the stream ended for an attempt nobody wanted.
#[tokio::test]
async fn a_resume_reset_before_the_holder_takes_it_leaves_the_live_attachment_alone() {
    let grace = Duration::from_secs(10);
    let ((client, _ci), (_server, mut si)) = pair().await;
    let (_tx, rx) = watch::channel(Some(client.clone()));
    let (req_tx, req_rx) = tunnel::resumable::requests();
    let (taken_tx, taken) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        echo_holder(si.accept().await.unwrap(), req_rx, grace);
        // The stale attempt, on the same session, handed over once its reset is in.
        let stale = si.accept().await.unwrap();
        while !stale.has_failed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = req_tx.try_send(ResumeRequest {
            stream: stale,
            attach: 1,
            peer_recv: 0,
        });
        let _ = taken_tx.send(());
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    let mut end = opened_resumable(&client, rx, grace).await;
    let mut m = Meta::default();
    m.set(keys::RESUME, "ticket-1");
    m.set(keys::ATTACH, "1");
    m.set(keys::RECV, "0");
    let stale = client.open(Dest::new("echo", 7), m).unwrap();
    stale.reset(tunnel::ErrorCode::Cancel, "the app gave up");
    taken.await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    end.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), end.read_exact(&mut got))
        .await
        .expect("the echo stalled")
        .expect("the live attachment was superseded by the stale attempt");
    assert_eq!(&got, b"ping");
}

/// A new resumable stream to the echo, opened and answered: the opener knows its ticket
/// before it writes.
async fn opened_resumable(
    client: &Session,
    session: watch::Receiver<Option<Session>>,
    grace: Duration,
) -> Resumable {
    let mut m = Meta::default();
    m.set(keys::RESUME, "new");
    let stream = client.open(Dest::new("echo", 7), m).unwrap();
    stream.opened().await.unwrap();
    Resumable::opener(stream, Box::new(TestReopen::new(session)), settings(grace))
}

/// The connector's side of one new resumable stream, accepted with a ticket.
async fn accepted_holder(incoming: &mut Incoming, grace: Duration) -> Resumable {
    let s = incoming.accept().await.unwrap();
    let (_req_tx, req_rx) = tunnel::resumable::requests();
    let mut m = Meta::default();
    m.set(keys::RESUME, "ticket-1");
    s.accept_with(m);
    Resumable::holder(s, req_rx, settings(grace))
}

#[tokio::test]
async fn a_fin_whose_peer_never_closes_is_still_acknowledged() {
    // The acknowledgement of a peer's `FIN` waits to ride with our own `FIN`; a holder whose
    // service half-closes nothing must still send it alone (after a short delay), or the
    // opener's shutdown would never complete.
    let grace = Duration::from_secs(10);
    let ((client, _ci), (_server, mut si)) = pair().await;
    let (tx, rx) = watch::channel(Some(client.clone()));
    tokio::spawn(async move {
        let mut end = accepted_holder(&mut si, grace).await;
        let mut got = Vec::new();
        end.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // Holds its end open (no reply, no FIN), as a service that has not answered yet.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(end);
    });
    let mut end = opened_resumable(&client, rx, grace).await;
    end.write_all(b"request").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), end.shutdown())
        .await
        .expect("the opener's FIN was never acknowledged")
        .unwrap();
    drop(tx);
}

#[tokio::test]
async fn a_closed_resumable_echo_leaves_no_stream_state_behind() {
    // The end that reads the last FIN drops its stream while the ACK of that FIN still waits
    // to be sent; its state stayed for the session's life (and, in the connector, counted
    // against the session's incoming streams until the DMZ refused new ones).
    let grace = Duration::from_secs(10);
    let holders = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ((client, _ci), (server, si)) = pair().await;
    serve(si, holders, grace);
    let (_tx, rx) = watch::channel(Some(client.clone()));
    for _ in 0..20 {
        let mut end = opened_resumable(&client, rx.clone(), grace).await;
        end.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        end.read_exact(&mut got).await.unwrap();
        end.shutdown().await.unwrap();
        let mut rest = Vec::new();
        end.read_to_end(&mut rest).await.unwrap();
        drop(end);
    }
    let t = std::time::Instant::now();
    while client.stats().streams + server.stats().streams > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "stream states left: agent side {}, connector side {}",
            client.stats().streams,
            server.stats().streams
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_sender_waits_for_its_stream_instead_of_queueing_ahead_in_its_retained_bytes() {
    // The room for retained bytes is for bytes sent and not yet acknowledged. The sending end
    // used to take app bytes into it while the stream under it took none (its credit spent),
    // a second send queue as large as the retention limit: a bulk sender then read about 1 MiB
    // from its app before the session wrote any of it, every byte cold in the CPU's caches by
    // then (18 % more CPU per byte at the sending end). Now it waits as a plain stream does.
    let grace = Duration::from_secs(10);
    let ((client, _ci), (_server, mut si)) = pair().await;
    let (_tx, rx) = watch::channel(Some(client.clone()));
    let (start_reading, reading) = tokio::sync::oneshot::channel::<usize>();
    let reader = tokio::spawn(async move {
        // Reads nothing at first: the opener's credit runs out. Then reads all it is told.
        let mut end = accepted_holder(&mut si, grace).await;
        let mut got = vec![0u8; reading.await.unwrap()];
        end.read_exact(&mut got).await.unwrap();
        got.iter().all(|b| *b == 7)
    });
    let mut end = opened_resumable(&client, rx, grace).await;
    let chunk = vec![7u8; 16 * 1024];
    let mut taken = 0;
    while let Ok(n) = tokio::time::timeout(Duration::from_millis(200), end.write(&chunk)).await {
        taken += n.unwrap();
        assert!(taken <= 256 * 1024, "took all of its retained-bytes room");
    }
    // The stream's window (64 KiB) and what its session queues ahead of the wire; not the
    // 256 KiB of retained-bytes room.
    assert!(
        taken <= 128 * 1024,
        "took {taken} bytes ahead of the stream"
    );
    assert!(taken >= 64 * 1024, "took only {taken} bytes");
    // The waiting writer is woken by the credit the reader gives back, and its last bytes
    // leave with the flush (not only when it writes again).
    let more = 1024 * 1024;
    start_reading.send(taken + more).unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        for _ in 0..more / chunk.len() {
            end.write_all(&chunk).await.unwrap();
        }
        end.flush().await.unwrap();
    })
    .await
    .expect("the waiting writer was never woken");
    let all_there = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the last bytes waited for another write")
        .unwrap();
    assert!(all_there);
}
