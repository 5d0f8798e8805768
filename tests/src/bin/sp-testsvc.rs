//! A test service to run inside a network namespace (`ip netns exec NS sp-testsvc …`), where the
//! test process itself cannot bind: `sp-testsvc http ADDR` serves the e2e HTTP service
//! (`GET /` → hello, `/bytes/N`, `POST /sha256`), `sp-testsvc echo ADDR` echoes. Prints
//! `listening ADDR` on stderr once bound (port 0 picks one), then serves until killed.

use std::net::TcpListener;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(kind), Some(addr)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: sp-testsvc http|echo ADDR");
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
