//! WPAD by DNS: the PAC file is at `http://wpad.<domain>/wpad.dat` for this machine's DNS
//! search domain or one of its parents.
//!
//! Walking up is where WPAD is dangerous: `wpad.com` or `wpad.co.uk` belong to whoever registered
//! them, and a machine that asks them hands its traffic to a stranger. So the walk stops at the
//! organisation's registrable domain, approximated without a public-suffix list: two labels
//! (`example.com`), or three when the last two look like a public two-level suffix, i.e. a
//! generic second-level label such as `co`, `com`, `ac`, `gov` under a two-letter country code
//! (`example.co.uk`, `example.com.au`). A search domain that is itself such a suffix gives no
//! candidate at all.

/// Second-level labels that, under a two-letter country code, form public suffixes
/// (`co.uk`, `com.au`, `ac.jp`, `gov.br`, `ne.jp`, `or.at`, …).
const PUBLIC_SECOND_LEVEL: &[&str] = &[
    "ac", "ad", "co", "com", "ed", "edu", "go", "gob", "gouv", "gov", "gr", "gv", "int", "lg",
    "ltd", "mil", "ne", "net", "nhs", "nic", "nom", "or", "org", "plc", "police", "sch",
];

/// The WPAD URLs to try for one DNS search domain, most specific first:
/// `eng.corp.example.com` → `http://wpad.eng.corp.example.com/wpad.dat`,
/// `http://wpad.corp.example.com/wpad.dat`, `http://wpad.example.com/wpad.dat`. Empty when the
/// domain is not a valid DNS name or is itself a public suffix.
pub fn wpad_urls(dns_suffix: &str) -> Vec<String> {
    let domain = dns_suffix.trim().trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = domain.split('.').collect();
    let valid = domain.len() <= 253
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !valid {
        return Vec::new();
    }
    let n = labels.len();
    let public_two_level = n >= 2
        && labels[n - 1].len() == 2
        && labels[n - 1].bytes().all(|b| b.is_ascii_alphabetic())
        && PUBLIC_SECOND_LEVEL.contains(&labels[n - 2]);
    let min_labels = if public_two_level { 3 } else { 2 };
    // A leading `wpad` label is not part of the domain to walk (wpad.wpad.corp is no better).
    let start = usize::from(labels.first() == Some(&"wpad") && n > min_labels);
    (start..n)
        .take_while(|&i| n - i >= min_labels)
        .map(|i| format!("http://wpad.{}/wpad.dat", labels[i..].join(".")))
        .collect()
}

/// This machine's DNS search domains, in order (unix: `/etc/resolv.conf`; Windows: none yet).
pub fn dns_suffixes() -> Vec<String> {
    #[cfg(unix)]
    {
        match std::fs::read_to_string("/etc/resolv.conf") {
            Ok(text) => parse_resolv_conf(&text),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read /etc/resolv.conf for WPAD");
                Vec::new()
            }
        }
    }
    #[cfg(not(unix))]
    {
        Vec::new()
    }
}

/// The search list of a `resolv.conf`: as in glibc, the last `search` or `domain` line wins
/// (`domain x` is a one-entry search list). Comments start with `#` or `;`; names are
/// lower-cased, without the trailing dot, without duplicates; the root (`.`) is dropped.
pub fn parse_resolv_conf(text: &str) -> Vec<String> {
    let mut list = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        let (keyword, rest): (_, Vec<&str>) = match words.next() {
            Some(k) => (k, words.collect()),
            None => continue,
        };
        let names = match keyword {
            "search" => rest,
            "domain" => rest.into_iter().take(1).collect(),
            _ => continue,
        };
        list.clear();
        for name in names {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if !name.is_empty() && !list.contains(&name) {
                list.push(name);
            }
        }
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(s: &str) -> Vec<String> {
        wpad_urls(s)
    }

    #[test]
    fn pac_wpad_walks_up_to_the_registrable_domain() {
        assert_eq!(
            urls("eng.corp.example.com"),
            [
                "http://wpad.eng.corp.example.com/wpad.dat",
                "http://wpad.corp.example.com/wpad.dat",
                "http://wpad.example.com/wpad.dat",
            ]
        );
        assert_eq!(urls("Example.COM."), ["http://wpad.example.com/wpad.dat"]);
        assert_eq!(
            urls("a.b.example.co.uk"),
            [
                "http://wpad.a.b.example.co.uk/wpad.dat",
                "http://wpad.b.example.co.uk/wpad.dat",
                "http://wpad.example.co.uk/wpad.dat",
            ]
        );
        assert_eq!(
            urls("corp.example.com.au"),
            [
                "http://wpad.corp.example.com.au/wpad.dat",
                "http://wpad.example.com.au/wpad.dat",
            ]
        );
        assert_eq!(urls("lab.ne.jp"), ["http://wpad.lab.ne.jp/wpad.dat"]);
        // Not public suffixes: a company domain under a country code, or a generic label under a
        // generic TLD.
        assert_eq!(
            urls("eng.corp.de"),
            [
                "http://wpad.eng.corp.de/wpad.dat",
                "http://wpad.corp.de/wpad.dat"
            ]
        );
        assert_eq!(
            urls("x.co.com"),
            [
                "http://wpad.x.co.com/wpad.dat",
                "http://wpad.co.com/wpad.dat"
            ]
        );
        assert_eq!(urls("wpad.corp.example.com"), urls("corp.example.com"));
    }

    #[test]
    fn pac_wpad_never_asks_a_public_suffix() {
        for s in ["com", "co.uk", "com.au", "uk", "", ".", "local"] {
            assert_eq!(urls(s), Vec::<String>::new(), "{s}");
        }
        for s in ["a.b.example.co.uk", "x.y.z.com", "p.q.org.br", "a.com"] {
            for u in urls(s) {
                for bad in ["wpad.co.uk/", "wpad.com/", "wpad.org.br/", "wpad.uk/"] {
                    assert!(!u.contains(&format!("//{bad}")), "{s}: {u}");
                }
            }
        }
        for s in [
            "a..b.com",
            "bad domain.com",
            "-x.com",
            "x/y.com",
            "ü.example.com",
        ] {
            assert_eq!(urls(s), Vec::<String>::new(), "{s}");
        }
    }

    #[test]
    fn pac_resolv_conf_search_domains() {
        let conf = "\
# Generated by NetworkManager
nameserver 10.0.0.53
search eng.corp.example.com corp.example.com. Corp.Example.com
options ndots:2
";
        assert_eq!(
            parse_resolv_conf(conf),
            ["eng.corp.example.com", "corp.example.com"]
        );
        assert_eq!(
            parse_resolv_conf("domain corp.example.com\nnameserver 1.1.1.1\n"),
            ["corp.example.com"]
        );
        // The last search/domain line wins, as in glibc.
        assert_eq!(
            parse_resolv_conf("search a.example b.example\ndomain c.example\n"),
            ["c.example"]
        );
        assert_eq!(
            parse_resolv_conf("domain c.example\nsearch a.example b.example # comment\n"),
            ["a.example", "b.example"]
        );
        assert_eq!(
            parse_resolv_conf("; search x.example\n#search y\n"),
            Vec::<String>::new()
        );
        assert_eq!(parse_resolv_conf("search .\n"), Vec::<String>::new());
        assert_eq!(parse_resolv_conf(""), Vec::<String>::new());
        assert_eq!(
            parse_resolv_conf("searchx a.example\n"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn pac_dns_suffixes_reads_the_system() {
        // Whatever the machine has; every entry must be usable by wpad_urls or harmless.
        for s in dns_suffixes() {
            assert!(!s.is_empty() && !s.ends_with('.'), "{s}");
        }
    }
}
