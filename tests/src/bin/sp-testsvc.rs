//! A test service to run inside a network namespace (`ip netns exec NS sp-testsvc …`), where the
//! test process itself cannot bind: `sp-testsvc http ADDR` serves the e2e HTTP service
//! (`GET /` → hello, `/bytes/N`, `POST /sha256`), `sp-testsvc echo ADDR` echoes. Prints
//! `listening ADDR` on stderr once bound (port 0 picks one), then serves until killed.
//!
//! `sp-testsvc hold ADDR COUNT` is the client side, for many agents' forwards in a namespace:
//! it opens one connection to each of COUNT consecutive ports from ADDR's, holds them, and
//! answers commands on stdin with one line on stdout each (`held`, after connecting, too):
//! `echo` sends a numbered line on every held connection and reads it back; `fresh` opens a new
//! connection to each port and does the same. Each answer reads `WHAT ok=N failed=M` and, when
//! some failed, ` first=PORT: ERROR`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// How long one echoed line may take.
const ECHO_WITHIN: Duration = Duration::from_secs(15);

fn echo_once(s: &mut TcpStream, line: &str) -> std::io::Result<()> {
    s.set_read_timeout(Some(ECHO_WITHIN))?;
    s.write_all(line.as_bytes())?;
    let mut got = vec![0u8; line.len()];
    std::io::Read::read_exact(s, &mut got)?;
    if got != line.as_bytes() {
        return Err(std::io::Error::other(format!(
            "echoed {:?}, sent {line:?}",
            String::from_utf8_lossy(&got)
        )));
    }
    Ok(())
}

/// `WHAT ok=N failed=M[ first=PORT: ERROR]` for the results of one round, in port order.
fn say(what: &str, results: &[(u16, std::io::Result<()>)]) {
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    let mut line = format!(
        "{what} ok={} failed={}",
        results.len() - failed.len(),
        failed.len()
    );
    if let Some((port, Err(e))) = failed.first() {
        line.push_str(&format!(" first={port}: {e}"));
    }
    println!("{line}");
}

/// Runs `f` on every port at once (one thread each: the rounds are about the forwards, not us).
type Round<U> = (Vec<(u16, std::io::Result<()>)>, Vec<(u16, U)>);

fn each<T: Send, U: Send>(
    items: Vec<(u16, T)>,
    f: impl Fn(u16, T) -> (std::io::Result<()>, U) + Sync,
) -> Round<U> {
    let out = std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .into_iter()
            .map(|(port, t)| {
                let f = &f;
                scope.spawn(move || (port, f(port, t)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a round thread"))
            .collect::<Vec<_>>()
    });
    out.into_iter()
        .map(|(port, (r, t))| ((port, r), (port, t)))
        .unzip()
}

fn hold(first: SocketAddr, count: u16) {
    let connect =
        |port: u16| TcpStream::connect_timeout(&SocketAddr::new(first.ip(), port), ECHO_WITHIN);
    let ports: Vec<(u16, ())> = (0..count).map(|i| (first.port() + i, ())).collect();
    let (results, mut held) = each(ports.clone(), |port, ()| {
        match connect(port).and_then(|mut s| echo_once(&mut s, "hello\n").map(|()| s)) {
            Ok(s) => (Ok(()), Some(s)),
            Err(e) => (Err(e), None),
        }
    });
    say("held", &results);
    for (round, cmd) in BufReader::new(std::io::stdin())
        .lines()
        .map_while(Result::ok)
        .enumerate()
    {
        let round = round + 1;
        match cmd.trim() {
            "echo" => {
                let (results, back) = each(std::mem::take(&mut held), |port, s| match s {
                    Some(mut s) => (echo_once(&mut s, &format!("{round} {port}\n")), Some(s)),
                    None => (Err(std::io::Error::other("not held")), None),
                });
                held = back;
                say("echo", &results);
            }
            "fresh" => {
                let (results, _) = each(ports.clone(), |port, ()| {
                    let r = connect(port)
                        .and_then(|mut s| echo_once(&mut s, &format!("fresh {round} {port}\n")));
                    (r, ())
                });
                say("fresh", &results);
            }
            other => println!("unknown command {other}"),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("hold") {
        let (Some(Ok(first)), Some(Ok(count))) = (
            args.get(2).map(|a| a.parse::<SocketAddr>()),
            args.get(3).map(|c| c.parse::<u16>()),
        ) else {
            eprintln!("usage: sp-testsvc hold ADDR COUNT");
            std::process::exit(2);
        };
        hold(first, count);
        return;
    }
    let (Some(kind), Some(addr)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: sp-testsvc http|echo ADDR, or sp-testsvc hold ADDR COUNT");
        std::process::exit(2);
    };
    let l = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sp-testsvc: cannot bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    let bound = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    eprintln!("listening addr={bound}");
    match kind.as_str() {
        "http" => sallyport_e2e::serve_http_on(l),
        "echo" => sallyport_e2e::serve_echo_on(l),
        other => {
            eprintln!("sp-testsvc: unknown service {other}");
            std::process::exit(2);
        }
    }
}
