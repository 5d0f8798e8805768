//! Pages the agent's HTTP proxy port serves itself, for people and browsers:
//!
//! - `/proxy.pac` — a proxy auto-config file that sends only what this user can reach through
//!   the agent (the routes the gateway reports for this identity) and everything else the way it
//!   went before (the way out the agent found: DIRECT, or the corporate proxy). Point a browser's
//!   "automatic proxy configuration URL" at `http://127.0.0.1:8118/proxy.pac` and nothing else
//!   changes. The PAC decides by host name patterns, IP literals and ports only: it never calls
//!   `dnsResolve`/`isInNet`, which would send internal names to the desktop's DNS.
//! - `/` — a small status page (the same facts as `sallyport status`).
//!
//! Served only for a `Host` of `127.0.0.1`/`localhost` (see `socks::LocalPages`), and on Linux
//! only to the user running the agent (the same-user check of every local connection).

use crate::config::AgentConfig;
use crate::pool::Pool;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

pub struct Pages {
    pub config: Arc<AgentConfig>,
    pub pool: Arc<Pool>,
    pub listening: Vec<(&'static str, SocketAddr)>,
}

impl socks::LocalPages for Pages {
    fn page(&self, path: &str) -> Option<(&'static str, String)> {
        match path {
            "/proxy.pac" | "/wpad.dat" => Some(("application/x-ns-proxy-autoconfig", self.pac())),
            "/" => Some(("text/html; charset=utf-8", self.status_html())),
            _ => None,
        }
    }
}

impl Pages {
    fn routes(&self) -> Vec<String> {
        self.pool
            .current()
            .map(|s| s.peer_routes().borrow().clone())
            .unwrap_or_default()
    }

    /// The PAC file for the routes the gateway reported.
    pub fn pac(&self) -> String {
        let agent = match (self.find("http"), self.find("socks5")) {
            (Some(a), _) => format!("PROXY {a}"),
            (None, Some(a)) => format!("SOCKS5 {a}"),
            (None, None) => "DIRECT".into(),
        };
        let before = match self.config.way.remembered().map(|c| c.proxy) {
            Some(egress::Proxy::Http { host, port, .. }) => format!("PROXY {host}:{port}"),
            Some(egress::Proxy::Socks5 { host, port, .. }) => format!("SOCKS5 {host}:{port}"),
            _ => "DIRECT".into(),
        };
        pac_for(
            &self.routes(),
            &agent,
            &before,
            &self.config.gateway.to_string(),
        )
    }

    fn find(&self, front: &str) -> Option<SocketAddr> {
        self.listening
            .iter()
            .find(|(f, _)| *f == front)
            .map(|(_, a)| *a)
    }

    fn status_html(&self) -> String {
        let text = crate::status::render(&self.config, &self.pool, &self.listening);
        let mut rows = String::new();
        for line in text.lines() {
            let (k, v) = line.split_once(": ").unwrap_or((line, ""));
            let _ = writeln!(
                rows,
                "<tr><th>{}</th><td>{}</td></tr>",
                html_escape(k),
                html_escape(v)
            );
        }
        let routes: String = self
            .routes()
            .iter()
            .map(|r| format!("<li><code>{}</code></li>", html_escape(r)))
            .collect();
        format!(
            r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sallyport agent</title>
<meta http-equiv="refresh" content="5">
<style>
body {{ font: 15px system-ui, sans-serif; margin: 2em auto; max-width: 46em; color: #222; }}
h1 {{ font-size: 1.4em; }} th {{ text-align: left; padding-right: 1.5em; color: #555; font-weight: normal; }}
td, th {{ padding: .25em 0; vertical-align: top; }} code {{ background: #f3f3f3; padding: 0 .3em; }}
.hint {{ color: #666; font-size: .9em; }}
</style></head><body>
<h1>Sallyport agent</h1>
<table>
{rows}</table>
<h2>Reachable through the agent</h2>
<ul>{routes}</ul>
<p class="hint">Browsers: set the automatic proxy configuration URL to <code>/proxy.pac</code> on this port. Refreshes every 5 s.</p>
</body></html>
"#
        )
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A JavaScript string literal.
fn js_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_ascii_alphanumeric() || "-._*:/ ;[]".contains(c) => out.push(c),
            c => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

/// One route (`db.internal:5432`, `*.internal:*`, `10.20.0.0/16:22-23`, `*:443`) as a JS
/// condition on `host` (lower case) and `port`; `None` for what a PAC cannot match without DNS
/// (IPv6 networks).
fn route_condition(route: &str) -> Option<String> {
    let (host, ports) = route.rsplit_once(':')?;
    let port_cond = match ports {
        "*" => "true".to_string(),
        p => match p.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi): (u16, u16) = (lo.parse().ok()?, hi.parse().ok()?);
                format!("(port >= {lo} && port <= {hi})")
            }
            None => format!("port == {}", p.parse::<u16>().ok()?),
        },
    };
    let host_cond = if host == "*" {
        "true".to_string()
    } else if let Some(suffix) = host.strip_prefix("*.") {
        // Strict subdomains, as the allow-list reads `*.internal`.
        let dotted = format!(".{}", suffix.to_ascii_lowercase());
        format!(
            "(host.length > {n} && host.substring(host.length - {n}) == {s})",
            n = dotted.len(),
            s = js_str(&dotted)
        )
    } else if host.starts_with('[') {
        return None;
    } else if let Some((net, bits)) = host.split_once('/') {
        let addr: std::net::Ipv4Addr = net.parse().ok()?;
        let bits: u32 = bits.parse().ok()?;
        if bits > 32 {
            return None;
        }
        let mask: u64 = if bits == 0 {
            0
        } else {
            (u32::MAX << (32 - bits)) as u64
        };
        format!("sp_in4(host, {}, {mask})", u32::from(addr) as u64 & mask)
    } else if host.parse::<std::net::Ipv4Addr>().is_ok() {
        format!("host == {}", js_str(host))
    } else {
        format!("host == {}", js_str(&host.to_ascii_lowercase()))
    };
    Some(format!("({host_cond} && {port_cond})"))
}

/// The PAC text: `routes` go to `agent` (`PROXY 127.0.0.1:8118`), the rest to `before`.
pub fn pac_for(routes: &[String], agent: &str, before: &str, gateway: &str) -> String {
    let mut conds = String::new();
    let mut skipped = Vec::new();
    for r in routes {
        match route_condition(r) {
            Some(c) => {
                let shown: String = r
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "-.*:/[]".contains(c) {
                            c
                        } else {
                            '?'
                        }
                    })
                    .collect();
                let _ = writeln!(conds, "  if {c} return AGENT; // {shown}");
            }
            None => skipped.push(r.as_str()),
        }
    }
    let skipped = if skipped.is_empty() {
        String::new()
    } else {
        format!(
            "// Not matched here (IPv6 networks): {}\n",
            skipped
                .iter()
                .map(|r| r.replace(
                    |c: char| !(c.is_ascii_alphanumeric() || "-.*:/[]".contains(c)),
                    "?"
                ))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        r#"// Proxy auto-config from the sallyport agent (gateway {gw}).
// Destinations this user can reach go through the agent; everything else as before.
// Decided by host name, IP literal and port only: no DNS lookups of internal names.
{skipped}var AGENT = {agent};
var BEFORE = {before};

function sp_in4(h, net, mask) {{
  var m = /^(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(h);
  if (!m) return false;
  var a = ((+m[1]) * 16777216) + ((+m[2]) * 65536) + ((+m[3]) * 256) + (+m[4]);
  return (a - (a % (4294967296 - mask))) == net || (mask == 0);
}}

function sp_port(url) {{
  var m = /^([a-z]+):\/\/(?:[^\/@]*@)?(?:\[[^\]]*\]|[^\/:]*)(?::(\d+))?/i.exec(url);
  if (m && m[2]) return +m[2];
  if (m && (m[1].toLowerCase() == "https" || m[1].toLowerCase() == "wss")) return 443;
  return 80;
}}

function FindProxyForURL(url, host) {{
  host = host.toLowerCase();
  var port = sp_port(url);
{conds}  return BEFORE;
}}
"#,
        gw = gateway.replace(['\n', '\r'], " "),
        agent = js_str(agent),
        before = js_str(before),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(pac: &str, url: &str, host: &str) -> Vec<egress::Proxy> {
        egress::pac::Pac::new("test", pac, egress::pac::PacLimits::default())
            .unwrap()
            .find_proxy(url, host)
            .unwrap()
    }

    #[test]
    fn the_pac_sends_only_reachable_destinations_through_the_agent() {
        let routes: Vec<String> = [
            "db.internal:5432",
            "*.corp.internal:*",
            "10.20.0.0/16:8000-8099",
            "192.0.2.7:443",
            "[fd00::/8]:22",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let pac = pac_for(
            &routes,
            "PROXY 127.0.0.1:8118",
            "PROXY proxy.corp:3128",
            "wss://gw/",
        );
        assert!(
            !pac.contains("dnsResolve") && !pac.contains("isInNet"),
            "{pac}"
        );
        let agent = egress::Proxy::Http {
            host: "127.0.0.1".into(),
            port: 8118,
            user: None,
        };
        let corp = egress::Proxy::Http {
            host: "proxy.corp".into(),
            port: 3128,
            user: None,
        };
        let via = |url: &str, host: &str| find(&pac, url, host).into_iter().next().unwrap();
        assert_eq!(&via("http://db.internal:5432/", "db.internal"), &agent);
        assert_eq!(
            &via("http://db.internal/", "db.internal"),
            &corp,
            "port 80 is not routed"
        );
        assert_eq!(
            &via("https://wiki.corp.internal/", "WIKI.corp.internal"),
            &agent
        );
        assert_eq!(
            &via("https://corp.internal/", "corp.internal"),
            &corp,
            "strict subdomains"
        );
        assert_eq!(&via("http://10.20.3.4:8080/", "10.20.3.4"), &agent);
        assert_eq!(&via("http://10.21.3.4:8080/", "10.21.3.4"), &corp);
        assert_eq!(&via("https://192.0.2.7/", "192.0.2.7"), &agent);
        assert_eq!(&via("https://www.example.com/", "www.example.com"), &corp);
        assert!(
            pac.contains("[fd00::/8]:22"),
            "IPv6 routes are listed as skipped"
        );
    }

    #[test]
    fn odd_route_text_cannot_break_out_of_the_script() {
        let routes = vec!["a\"b;alert(1)//.internal:80".to_string()];
        let pac = pac_for(&routes, "PROXY 127.0.0.1:1", "DIRECT", "wss://gw/");
        assert!(!pac.contains("\"b;alert"), "{pac}");
        egress::pac::Pac::new("test", &pac, egress::pac::PacLimits::default()).unwrap();
    }
}
