//! Protocol policy: what an allow rule lets a client *speak* once it is connected
//! (`protocol=tls sni=*.internal`, `protocol=ssh`, `protocol=postgres`, `protocol=http`, or the
//! default `protocol=any`), which rules a stream must satisfy ([`Policy::protocols`]), and the
//! verdict on the client's first bytes ([`Requirement::judge`], built on [`super::sniff`]).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::routes::{parse_host, Host, HostPattern};
use super::rules::{Policy, Rule, Who};
use super::sniff::{self, PgFirst, Sniff};

/// How many of the client's first bytes the connector holds back to check them: enough for any
/// ClientHello seen in practice (post-quantum key shares make them ~2 KB), an SSH line (255), a
/// PostgreSQL startup packet (10 000) or a long HTTP request line.
pub const PEEK_CAP: usize = 16 * 1024;

/// What a rule lets the client speak.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// Anything (no check): the default, and what rules meant before protocols existed.
    #[default]
    Any,
    /// A TLS ClientHello; with `sni`, its server name must match one of the patterns.
    Tls { sni: Vec<HostPattern> },
    /// An SSH-2.0 identification line.
    Ssh,
    /// A PostgreSQL startup, SSL, GSSAPI or cancel request, or a TLS ClientHello offering ALPN
    /// `postgresql` (PostgreSQL 17's `sslnegotiation=direct`).
    Postgres,
    /// An HTTP/1.0 or 1.1 request line (or the HTTP/2 prior-knowledge preface).
    Http,
}

impl Protocol {
    /// From a rule's `protocol=` and `sni=` values (the flag's text or the TOML table's).
    pub fn from_parts(protocol: Option<&str>, sni: Option<&[String]>) -> Result<Protocol, String> {
        let p = match protocol.unwrap_or("any") {
            "any" => Protocol::Any,
            "tls" => Protocol::Tls { sni: Vec::new() },
            "ssh" => Protocol::Ssh,
            "postgres" => Protocol::Postgres,
            "http" => Protocol::Http,
            other => {
                return Err(format!(
                    "protocol={other:?} is not one of tls, ssh, postgres, http, any"
                ))
            }
        };
        match (p, sni) {
            (p, None) => Ok(p),
            (Protocol::Tls { .. }, Some(list)) => {
                if list.is_empty() {
                    return Err("sni= is empty: list names like *.internal,wiki.corp".into());
                }
                let sni = list
                    .iter()
                    .map(|s| sni_pattern(s))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Protocol::Tls { sni })
            }
            (_, Some(_)) => Err("sni= needs protocol=tls".into()),
        }
    }

    /// The `protocol=` word.
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Any => "any",
            Protocol::Tls { .. } => "tls",
            Protocol::Ssh => "ssh",
            Protocol::Postgres => "postgres",
            Protocol::Http => "http",
        }
    }

    /// What it wants, for a refusal: `TLS to wiki.internal,*.corp`, `SSH`, …
    pub fn wanted(&self) -> String {
        match self {
            Protocol::Any => "anything".into(),
            Protocol::Tls { sni } if sni.is_empty() => "TLS".into(),
            Protocol::Tls { sni } => format!(
                "TLS to {}",
                sni.iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Protocol::Ssh => "SSH".into(),
            Protocol::Postgres => "PostgreSQL".into(),
            Protocol::Http => "HTTP".into(),
        }
    }

    /// The `sni=` patterns (empty: any or no server name).
    pub fn sni(&self) -> &[HostPattern] {
        match self {
            Protocol::Tls { sni } => sni,
            _ => &[],
        }
    }
}

/// An `sni=` entry: a name, `*.suffix` or `*`; never an address (TLS sends none as SNI).
fn sni_pattern(s: &str) -> Result<HostPattern, String> {
    match s.parse::<HostPattern>() {
        Ok(HostPattern::Net(_)) => Err(format!(
            "sni={s}: an address is never a TLS server name; list names (db.internal, *.internal)"
        )),
        Ok(p) => Ok(p),
        Err(e) => Err(format!("sni={s}: {}", super::routes::inner_why(&e))),
    }
}

impl fmt::Display for Protocol {
    /// The rule words: empty for `any`, `protocol=tls sni=a,b` otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Protocol::Any {
            return Ok(());
        }
        write!(f, "protocol={}", self.name())?;
        let sni = self.sni();
        if !sni.is_empty() {
            let list: Vec<String> = sni.iter().map(|p| p.to_string()).collect();
            write!(f, " sni={}", list.join(","))?;
        }
        Ok(())
    }
}

impl FromStr for Protocol {
    type Err = String;
    /// Just the `protocol=` word (no `sni=`).
    fn from_str(s: &str) -> Result<Protocol, String> {
        Protocol::from_parts(Some(s), None)
    }
}

/// The protocols a stream must speak: every group must be satisfied by one of its rules. The
/// first group holds the rules that allowed the destination for the caller; a second one, when
/// the dialled address is special (loopback, …), the rules that list that address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    groups: Vec<Vec<Rule>>,
}

/// The verdict on the first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not decided yet: read more (up to [`PEEK_CAP`]).
    More,
    /// Allowed: what was seen, and the rule that allowed it (of the last group).
    Pass { seen: String, rule: String },
    /// Refused: what was seen, the rules it failed, and what they wanted (`TLS to
    /// wiki.internal or SSH`).
    Fail {
        seen: String,
        rules: String,
        wanted: String,
    },
}

impl Policy {
    /// The protocols a stream to `host:port`, dialled at `addr`, must speak for `who`; `None`
    /// when a rule that allows it says `any` (no check: today's behaviour). Call it after
    /// [`Policy::check_resolved`] said yes.
    pub fn protocols(
        &self,
        host: &Host,
        port: u16,
        who: &Who,
        addr: IpAddr,
    ) -> Option<Requirement> {
        let mut groups = vec![self.allowing(host, port, who).cloned().collect::<Vec<_>>()];
        if let Some(listing) = self.listing_special(addr, port, who) {
            groups.push(listing.cloned().collect());
        }
        groups.retain(|g| !g.iter().any(|r| r.protocol == Protocol::Any));
        (!groups.is_empty() && groups.iter().all(|g| !g.is_empty()))
            .then_some(Requirement { groups })
    }
}

/// What the first bytes are, as far as each recogniser can tell.
struct Seen {
    tls: Sniff<sniff::ClientHello>,
    ssh: Sniff<String>,
    pg: Sniff<PgFirst>,
    http: Sniff<sniff::RequestLine>,
}

impl Seen {
    fn of(buf: &[u8]) -> Seen {
        Seen {
            tls: sniff::tls_client_hello(buf),
            ssh: sniff::ssh_ident(buf),
            pg: sniff::postgres_first(buf),
            http: sniff::http_request_line(buf),
        }
    }

    /// Does `protocol` accept these bytes: `Some(true/false)`, or `None` if it cannot tell yet.
    fn accepts(&self, protocol: &Protocol) -> Option<bool> {
        let decided = |s: Sniff<bool>| match s {
            Sniff::More => None,
            Sniff::Is(ok) => Some(ok),
            Sniff::Not(_) => Some(false),
        };
        match protocol {
            Protocol::Any => Some(true),
            Protocol::Tls { sni } => decided(self.tls.clone().map(|ch| sni_allowed(sni, &ch))),
            Protocol::Ssh => decided(self.ssh.clone().map(|_| true)),
            Protocol::Http => decided(self.http.clone().map(|_| true)),
            Protocol::Postgres => match (&self.pg, &self.tls) {
                (Sniff::Is(_), _) => Some(true),
                (_, Sniff::Is(ch)) => Some(ch.alpn.iter().any(|p| p == "postgresql")),
                (Sniff::More, _) | (_, Sniff::More) => None,
                _ => Some(false),
            },
        }
    }

    /// A short, safe description for the audit log.
    fn describe(&self, buf: &[u8]) -> String {
        self.recognised().unwrap_or_else(|| Seen::unrecognised(buf))
    }

    /// What one recogniser made of the bytes, said in a few safe words.
    fn recognised(&self) -> Option<String> {
        if let Sniff::Is(ch) = &self.tls {
            let sni = match &ch.sni {
                Some(s) => format!("SNI {}", crate::logsafe::Clean(s)),
                None => "without SNI".to_string(),
            };
            let alpn = if ch.alpn.is_empty() {
                String::new()
            } else {
                format!(
                    ", ALPN {}",
                    crate::logsafe::Clean(&ch.alpn.join(",").chars().take(64).collect::<String>())
                )
            };
            return Some(format!("TLS ClientHello {sni}{alpn}"));
        }
        if let Sniff::Is(line) = &self.ssh {
            let cut: String = line.chars().take(64).collect();
            return Some(format!(
                "SSH identification {}",
                crate::logsafe::Clean(&cut)
            ));
        }
        if let Sniff::Is(pg) = &self.pg {
            return Some(match pg {
                PgFirst::SslRequest => "PostgreSQL SSLRequest".into(),
                PgFirst::GssEncRequest => "PostgreSQL GSSENCRequest".into(),
                PgFirst::CancelRequest => "PostgreSQL CancelRequest".into(),
                PgFirst::Startup { minor } => format!("PostgreSQL startup, protocol 3.{minor}"),
            });
        }
        if let Sniff::Is(rl) = &self.http {
            return Some(format!(
                "HTTP/{} request {} (target {} bytes)",
                rl.version,
                crate::logsafe::Clean(&rl.method),
                rl.target_len
            ));
        }
        None
    }

    /// Bytes no recogniser took: their count and a few, escaped.
    fn unrecognised(buf: &[u8]) -> String {
        if buf.is_empty() {
            return "no bytes".to_string();
        }
        format!(
            "{} bytes, starts '{}'",
            buf.len(),
            sniff::preview(buf, PREVIEW)
        )
    }
}

/// How many first bytes an audit line shows of something unrecognised.
const PREVIEW: usize = 8;

/// An SNI list allows a hello when it is empty, or when the hello names a host one pattern
/// matches (names normalised as destinations are: lowercase, no trailing dot).
fn sni_allowed(list: &[HostPattern], hello: &sniff::ClientHello) -> bool {
    if list.is_empty() {
        return true;
    }
    match hello.sni.as_deref().map(parse_host) {
        Some(Ok(host @ Host::Name(_))) => list.iter().any(|p| p.matches(&host)),
        _ => false,
    }
}

impl Requirement {
    /// The rules, for messages: `a; b` per group, groups joined by ` and `.
    pub fn rules(&self) -> String {
        self.groups
            .iter()
            .map(|g| {
                g.iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .collect::<Vec<_>>()
            .join(" and ")
    }

    /// The verdict on the client's first bytes `buf`. `ended`: no more will come (the client
    /// closed, the time is up, or `buf` holds [`PEEK_CAP`] bytes), so an undecided check fails.
    pub fn judge(&self, buf: &[u8], ended: bool) -> Verdict {
        let seen = Seen::of(buf);
        let mut passed_by = String::new();
        for group in &self.groups {
            let answers: Vec<Option<bool>> =
                group.iter().map(|r| seen.accepts(&r.protocol)).collect();
            if let Some(i) = answers.iter().position(|a| *a == Some(true)) {
                passed_by = group[i].to_string();
                continue;
            }
            if !ended && answers.contains(&None) {
                return Verdict::More;
            }
            let mut wanted: Vec<String> = group.iter().map(|r| r.protocol.wanted()).collect();
            wanted.dedup();
            return Verdict::Fail {
                seen: self.failure(&seen, buf, group, ended),
                rules: group
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
                wanted: wanted.join(" or "),
            };
        }
        Verdict::Pass {
            seen: seen.describe(buf),
            rule: passed_by,
        }
    }

    /// What was seen, for a failed group: the recognised thing, or why each protocol said no.
    fn failure(&self, seen: &Seen, buf: &[u8], group: &[Rule], ended: bool) -> String {
        if let Some(what) = seen.recognised() {
            return what; // a ClientHello with the wrong SNI, an HTTP request to ssh, …
        }
        let what = Seen::unrecognised(buf);
        let mut whys: Vec<String> = Vec::new();
        for r in group {
            let why = match (&r.protocol, &seen.tls, &seen.ssh, &seen.pg, &seen.http) {
                (Protocol::Tls { .. }, Sniff::Not(w), ..)
                | (Protocol::Ssh, _, Sniff::Not(w), ..)
                | (Protocol::Postgres, _, _, Sniff::Not(w), _)
                | (Protocol::Http, .., Sniff::Not(w)) => w.clone(),
                _ if ended && !buf.is_empty() => format!("incomplete {}", r.protocol.name()),
                _ => continue,
            };
            if !whys.contains(&why) {
                whys.push(why);
            }
        }
        if whys.is_empty() {
            what
        } else {
            format!("{what}: {}", whys.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &[&str]) -> Policy {
        Policy::new(rules.iter().map(|r| r.parse().unwrap()).collect(), vec![])
    }
    fn who() -> Who<'static> {
        Who {
            user: "alice",
            groups: &[],
        }
    }
    fn host(s: &str) -> Host {
        parse_host(s).unwrap()
    }
    fn need(p: &Policy, h: &str, port: u16, addr: &str) -> Option<Requirement> {
        p.protocols(&host(h), port, &who(), addr.parse().unwrap())
    }

    #[test]
    fn rules_name_protocols_and_print_back() {
        for text in [
            "db.internal:5432 protocol=postgres",
            "*.internal:443 users=alice protocol=tls sni=*.internal,wiki.corp",
            "git.internal:22 protocol=ssh",
            "web.internal:80 groups=dev protocol=http",
            "a.internal:1 protocol=tls",
        ] {
            let r: Rule = text.parse().unwrap();
            let again: Rule = r.to_string().parse().unwrap();
            assert_eq!(r, again, "{text}");
        }
        #[derive(serde::Deserialize)]
        struct File {
            allow: Vec<Rule>,
        }
        let f: File = toml::from_str(
            r#"allow = [{ route = "*.internal:443", protocol = "tls", sni = ["*.internal"] }, "db.internal:5432 protocol=postgres"]"#,
        )
        .unwrap();
        assert_eq!(
            f.allow[0].to_string(),
            "*.internal:443 protocol=tls sni=*.internal"
        );
        assert_eq!(f.allow[1].protocol, Protocol::Postgres);
        let e =
            toml::from_str::<File>(r#"allow = [{ route = "a.internal:1", sni = ["x.internal"] }]"#)
                .err()
                .unwrap()
                .to_string();
        assert!(e.contains("sni= needs protocol=tls"), "{e}");
        let r: Rule = "x.internal:1 protocol=any".parse().unwrap();
        assert_eq!(r.protocol, Protocol::Any);
        assert_eq!(r.to_string(), "x.internal:1");
        for (bad, says) in [
            ("x.internal:1 protocol=ftp", "not one of tls"),
            ("x.internal:1 sni=a.internal", "needs protocol=tls"),
            (
                "x.internal:1 protocol=ssh sni=a.internal",
                "needs protocol=tls",
            ),
            (
                "x.internal:1 protocol=tls sni=10.0.0.1",
                "never a TLS server name",
            ),
            ("x.internal:1 protocol=tls sni=a*b", "only allowed"),
            ("x.internal:1 protocol=tls protocol=ssh", "given twice"),
            ("x.internal:1 protocol=tls sni=", "empty"),
        ] {
            let e = bad.parse::<Rule>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_protocol_rule_is_enforced_unless_another_rule_allows_any() {
        let p = policy(&["db.internal:5432 protocol=postgres"]);
        assert!(need(&p, "db.internal", 5432, "10.0.0.1").is_some());
        let p = policy(&[
            "db.internal:5432 protocol=postgres",
            "*.internal:* users=alice",
        ]);
        assert_eq!(need(&p, "db.internal", 5432, "10.0.0.1"), None);
        // A rule for someone else does not lift the check.
        let p = policy(&[
            "db.internal:5432 protocol=postgres",
            "*.internal:* users=bob",
        ]);
        assert!(need(&p, "db.internal", 5432, "10.0.0.1").is_some());
        let p = policy(&["*.internal:*"]);
        assert_eq!(need(&p, "db.internal", 5432, "10.0.0.1"), None);
    }

    #[test]
    fn a_name_rule_for_any_does_not_lift_a_protocol_on_a_listed_loopback_address() {
        let p = policy(&["*.internal:*", "127.0.0.1/32:8080 protocol=http"]);
        let need = need(&p, "app.internal", 8080, "127.0.0.1").expect("checked");
        assert!(matches!(
            need.judge(b"GET / HTTP/1.1\r\n", false),
            Verdict::Pass { .. }
        ));
        assert!(matches!(
            need.judge(b"\x16\x03\x01", false),
            Verdict::Fail { .. }
        ));
        // Not special: the name rule alone decides.
        assert_eq!(
            super::tests::need(&p, "app.internal", 8080, "10.1.1.1"),
            None
        );
    }

    fn hello(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
        crate::policy::sniff::client_hello(sni, alpn, 16384)
    }

    #[test]
    fn an_sni_outside_the_list_is_refused_and_said() {
        let p = policy(&["*.internal:443 protocol=tls sni=wiki.internal,*.corp.internal"]);
        let n = need(&p, "wiki.internal", 443, "10.0.0.1").unwrap();
        assert!(matches!(
            n.judge(&hello(Some("WIKI.internal."), &[]), false),
            Verdict::Pass { .. }
        ));
        assert!(matches!(
            n.judge(&hello(Some("a.corp.internal"), &[]), false),
            Verdict::Pass { .. }
        ));
        match n.judge(&hello(Some("evil.example"), &[]), false) {
            Verdict::Fail { seen, rules, .. } => {
                assert_eq!(seen, "TLS ClientHello SNI evil.example");
                assert!(rules.contains("sni=wiki.internal"), "{rules}");
            }
            v => panic!("{v:?}"),
        }
        match n.judge(&hello(None, &[]), false) {
            Verdict::Fail { seen, .. } => assert_eq!(seen, "TLS ClientHello without SNI"),
            v => panic!("{v:?}"),
        }
        let h = hello(Some("wiki.internal"), &[]);
        assert_eq!(n.judge(&h[..10], false), Verdict::More);
        assert!(matches!(n.judge(&h[..10], true), Verdict::Fail { .. }));
    }

    #[test]
    fn what_was_seen_is_short_and_holds_no_raw_bytes() {
        let p = policy(&["git.internal:22 protocol=ssh"]);
        let n = need(&p, "git.internal", 22, "10.0.0.1").unwrap();
        match n.judge(b"GET /?token=s3cret HTTP/1.1\r\n\r\n", false) {
            Verdict::Fail { seen, .. } => {
                assert_eq!(seen, "HTTP/1.1 request GET (target 14 bytes)");
            }
            v => panic!("{v:?}"),
        }
        match n.judge(b"\x00\x01hello\nworld and more", false) {
            Verdict::Fail { seen, .. } => {
                assert!(
                    seen.starts_with("22 bytes, starts '\\x00\\x01hello\\x0a'"),
                    "{seen}"
                );
                assert!(!seen.contains("world"), "{seen}");
            }
            v => panic!("{v:?}"),
        }
        match n.judge(b"", true) {
            Verdict::Fail { seen, .. } => assert_eq!(seen, "no bytes"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn postgres_accepts_its_packets_and_direct_tls_with_its_alpn() {
        let p = policy(&["db.internal:5432 protocol=postgres"]);
        let n = need(&p, "db.internal", 5432, "10.0.0.1").unwrap();
        assert!(matches!(
            n.judge(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f], false),
            Verdict::Pass { .. }
        ));
        assert!(matches!(
            n.judge(&hello(Some("db.internal"), &["postgresql"]), false),
            Verdict::Pass { .. }
        ));
        assert!(matches!(
            n.judge(&hello(Some("db.internal"), &["h2"]), false),
            Verdict::Fail { .. }
        ));
        assert_eq!(n.judge(&[0, 0, 0], false), Verdict::More);
    }

    #[test]
    fn one_of_several_rules_suffices() {
        let p = policy(&[
            "web.internal:443 protocol=http",
            "web.internal:443 protocol=tls",
        ]);
        let n = need(&p, "web.internal", 443, "10.0.0.1").unwrap();
        assert!(matches!(
            n.judge(b"GET / HTTP/1.1\r\n", false),
            Verdict::Pass { .. }
        ));
        assert!(matches!(
            n.judge(&hello(None, &[]), false),
            Verdict::Pass { .. }
        ));
        assert!(matches!(
            n.judge(b"SSH-2.0-x\r\n", false),
            Verdict::Fail { .. }
        ));
    }
}
