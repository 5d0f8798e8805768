//! `sallyport doctor`: every way out, tried, timed and explained.
//!
//! Prints what the discovery looked at (environment, PAC, WPAD, OS settings), then each
//! candidate with its source, how long it took and the exact reason when it failed, then the
//! path the agent would use. When TLS to the gateway fails because of an unknown issuer, the
//! error names who signed the certificate seen (`egress::dial_via` looks again without
//! verification): a TLS-inspecting proxy re-signs with the corporate CA. A 426 answer means
//! something on the path stripped the WebSocket upgrade. Exit code 0 when a path works.

use crate::config::AgentConfig;
use std::fmt::Write as _;
use std::time::Duration;

/// Runs the diagnosis; returns the report and whether a path works.
pub async fn run(config: &AgentConfig) -> (String, bool) {
    let mut out = String::new();
    let _ = writeln!(out, "sallyport doctor: gateway {}", config.gateway);
    let net = egress::network::key();
    let _ = writeln!(
        out,
        "network: {}",
        if net.is_empty() { "(unknown)" } else { &net }
    );
    let way = &config.way;
    // With a v2 token, the authenticated handshake says whether the certificate seen is the
    // gateway's own: remember what each winning connection found.
    let resigned = std::sync::Mutex::new(Vec::<String>::new());
    // And the certificates a v1 bearer token was not sent over (not the gateway's own).
    let untrusted = std::sync::Mutex::new(Vec::<String>::new());
    let up = config.uplink();
    let (discovery, attempts) = way
        .diagnose(
            &config.gateway,
            config.tls.as_ref(),
            config.connect_timeout,
            |io| async {
                let r = up.over_websocket(io).await;
                match &r {
                    Ok(c) if c.carried.resigned() => resigned
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(c.cert.clone()),
                    Err(uplink::ConnectError::Untrusted { seen }) => untrusted
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(seen.clone()),
                    _ => {}
                }
                r.map(|c| (c.session, c.carried.to_string(), c.cert))
            },
        )
        .await;
    let resigned = resigned.into_inner().unwrap_or_else(|e| e.into_inner());
    let untrusted = untrusted.into_inner().unwrap_or_else(|e| e.into_inner());
    if !discovery.notes.is_empty() {
        let _ = writeln!(out, "\nwhat was looked at:");
        for n in &discovery.notes {
            let _ = writeln!(out, "  - {n}");
        }
    }
    let _ = writeln!(out, "\ncandidates, in the order they are tried:");
    let mut seen_certs: Vec<(String, String)> = Vec::new();
    let mut fallback: Option<egress::probe::Candidate> = None;
    for (i, a) in attempts.iter().enumerate() {
        let took = fmt_duration(a.elapsed);
        match &a.outcome {
            Ok(how) => {
                let _ = writeln!(
                    out,
                    "  {}. {}  [{}]\n     ok in {took}: {how}",
                    i + 1,
                    a.candidate.proxy,
                    a.candidate.source
                );
                if stripped(how) {
                    fallback_note(config, &a.candidate, &mut out, &mut fallback).await;
                }
                if !how.starts_with("TLS, certificate ") {
                    // Plain, or the gateway's refusal: no certificate to compare.
                    continue;
                }
                seen_certs.push((a.candidate.proxy.to_string(), how.clone()));
                if resigned.contains(how) {
                    resigned_note(config, how, &mut out);
                } else {
                    intercepted_note(config, how, &mut out);
                }
            }
            Err(why) => {
                let _ = writeln!(
                    out,
                    "  {}. {}  [{}]\n     failed after {took}: {why}",
                    i + 1,
                    a.candidate.proxy,
                    a.candidate.source
                );
                if stripped(why) {
                    fallback_note(config, &a.candidate, &mut out, &mut fallback).await;
                }
                if let Some(seen) = untrusted.iter().find(|seen| why.contains(seen.as_str())) {
                    intercepted_note(config, seen, &mut out);
                }
            }
        }
    }
    let distinct: std::collections::BTreeSet<&String> = seen_certs.iter().map(|(_, c)| c).collect();
    if distinct.len() > 1 {
        let _ = writeln!(out, "\nnote: paths see different gateway certificates, so one of them inspects TLS (re-signs the gateway's certificate):");
        for (p, c) in &seen_certs {
            let _ = writeln!(out, "  {p}: {c}");
        }
    }
    let winner = attempts.iter().find(|a| a.outcome.is_ok());
    let refused = attempts.iter().find(|a| a.refused);
    match (winner, &fallback) {
        (None, None) if refused.is_some() => {
            let _ = writeln!(
                out,
                "\nthe way out works, but the token in {} was refused by the gateway (expired, revoked or mistyped); ask your admin or run `sallyport enroll`",
                config.token_source
            );
        }
        (Some(a), _) => {
            let _ = writeln!(
                out,
                "\nwould use: {}  [{}]",
                a.candidate.proxy, a.candidate.source
            );
        }
        (None, Some(c)) => {
            let _ = writeln!(
                out,
                "\nwould use: {}  [{}] with the HTTP transport",
                c.proxy, c.source
            );
        }
        (None, None) => {
            let _ = writeln!(out, "\nno way out to the gateway works.");
        }
    }
    (out, winner.is_some() || fallback.is_some())
}

/// Protocol v2: the gateway's authenticated offer did not list the certificate key seen, so
/// someone on the way re-signs the TLS. Who, and the request for the proxy's admins.
fn resigned_note(config: &AgentConfig, seen: &str, out: &mut String) {
    let issuer = seen
        .split("; ")
        .next()
        .and_then(|leaf| leaf.rsplit_once(" issued by "))
        .map(|(_, i)| i)
        .unwrap_or("an unknown issuer");
    let _ = writeln!(
        out,
        "     TLS on this path is intercepted: the certificate was re-signed by {issuer} (the gateway's handshake lists other keys as its own); the session stays sealed by protocol v2, so the proxy reads neither token nor traffic"
    );
    let _ = writeln!(
        out,
        "     for the proxy's admins: please exempt {} from TLS inspection. Sallyport authenticates the gateway itself and encrypts end to end; re-signing its certificate cannot let the proxy inspect the traffic, it only costs a second layer of encryption.",
        config.gateway.host
    );
}

/// When the certificate seen (`TLS, certificate <subject> issued by <issuer>; …`) was not
/// issued by the gateway's CA: who re-signed it, and a request to pass to the proxy's admins.
fn intercepted_note(config: &AgentConfig, seen: &str, out: &mut String) {
    // Issuers along the chain sent; the leaf's first.
    let issuers: Vec<&str> = seen
        .split("; ")
        .filter_map(|part| part.rsplit_once(" issued by ").map(|(_, i)| i))
        .collect();
    let Some(issuer) = issuers.first() else {
        return;
    };
    if config.gateway_ca_names.is_empty()
        || issuers
            .iter()
            .any(|i| config.gateway_ca_names.iter().any(|n| n == i))
    {
        return;
    }
    let _ = writeln!(
        out,
        "     TLS on this path is intercepted: the certificate was re-signed by {issuer}, not by the gateway's CA ({}); the proxy can read the tunnel's outer layer, so the token is sent only inside the inner channel (or not at all)",
        config.gateway_ca_names.join("; ")
    );
    let _ = writeln!(
        out,
        "     for the proxy's admins: please exempt {} from TLS inspection. Sallyport authenticates the gateway itself and encrypts end to end; re-signing its certificate cannot let the proxy inspect the traffic, it only breaks the connection or forces it into a slower inner channel.",
        config.gateway.host
    );
}

/// The gateway's (or a proxy's) answer shows that the WebSocket upgrade was stripped.
fn stripped(text: &str) -> bool {
    ["HTTP 426", "HTTP 400", "HTTP 200", "HTTP 405"]
        .iter()
        .any(|s| text.contains(s))
}

/// Says that the upgrade is stripped on `c`, and whether the HTTP transport gets through.
async fn fallback_note(
    config: &AgentConfig,
    c: &egress::probe::Candidate,
    out: &mut String,
    fallback: &mut Option<egress::probe::Candidate>,
) {
    let _ = writeln!(out, "     the WebSocket upgrade did not reach the gateway: something on this path (typically a TLS-inspecting proxy; squid needs `http_upgrade_request_protocols websocket allow all`) strips WebSocket upgrades");
    if config.transport == crate::config::TransportChoice::WebSocket {
        return;
    }
    match config.uplink().over_http(c, None).await {
        Ok(conn) => {
            conn.session
                .close(tunnel::ErrorCode::Shutdown, "doctor done");
            let issuer = conn
                .cert
                .split("; ")
                .next()
                .and_then(|leaf| leaf.rsplit_once(" issued by "))
                .map(|(_, i)| i.to_string())
                .unwrap_or_else(|| "unknown".into());
            let inner = match conn.carried.protection {
                uplink::connect::Protection::V2(d) if d.sealed => {
                    "sealed by protocol v2 (the proxy reads nothing)"
                }
                uplink::connect::Protection::V2(_) => "by protocol v2",
                uplink::connect::Protection::V1Inner => "inside the pinned inner channel",
                uplink::connect::Protection::Tls => {
                    "WITHOUT the inner channel, over TLS proven the gateway's own"
                }
            };
            let _ = writeln!(
                out,
                "     {} inspects TLS (issuer: {issuer}) and strips WebSocket upgrades; using HTTP streaming {inner} ({})",
                c.proxy, conn.carried
            );
            if conn.carried.resigned() {
                resigned_note(config, &conn.cert, out);
            }
            fallback.get_or_insert(c.clone());
        }
        Err(e) => {
            let _ = writeln!(out, "     the HTTP transport fails too: {e}");
        }
    }
}

fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        format!("{:.2} ms", d.as_secs_f64() * 1000.0)
    } else if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}
