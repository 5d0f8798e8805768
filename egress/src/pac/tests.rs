//! The sandbox and the helpers, with an injected [`PacEnv`]: no network, a fixed clock.

use super::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, UNIX_EPOCH};

/// Fake DNS, addresses and clock; counts lookups.
struct FakeEnv {
    hosts: HashMap<String, Vec<IpAddr>>,
    local: Vec<IpAddr>,
    now: SystemTime,
    offset: Option<i32>,
    lookups: AtomicUsize,
    /// Sleep this long in `resolve`, ignoring its timeout (a misbehaving resolver).
    hang: Duration,
}

impl FakeEnv {
    fn new() -> FakeEnv {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let hosts = [
            ("intranet.corp", vec![ip("10.1.2.3")]),
            (
                "dual.corp",
                vec![ip("2001:db8::5"), ip("10.1.2.4"), ip("10.1.2.5")],
            ),
            ("v6only.corp", vec![ip("2001:db8::6")]),
            ("build.internal.example.org", vec![ip("10.5.6.7")]),
            ("gw.example.org", vec![ip("203.0.113.10")]),
            ("api.github.com", vec![ip("140.82.112.5")]),
        ];
        FakeEnv {
            hosts: hosts.into_iter().map(|(h, a)| (h.to_string(), a)).collect(),
            local: vec![ip("192.168.7.20"), ip("2001:db8:7::20")],
            // Friday 2024-03-15 23:30:15 UTC; Saturday 00:30:15 in UTC+1.
            now: UNIX_EPOCH + Duration::from_secs(1_710_545_415),
            offset: Some(60),
            lookups: AtomicUsize::new(0),
            hang: Duration::ZERO,
        }
    }
}

impl PacEnv for FakeEnv {
    fn resolve(&self, host: &str, _timeout: Duration) -> Vec<IpAddr> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.hang);
        if let Ok(ip) = host.parse() {
            return vec![ip];
        }
        self.hosts.get(host).cloned().unwrap_or_default()
    }
    fn local_addresses(&self) -> Vec<IpAddr> {
        self.local.clone()
    }
    fn now(&self) -> SystemTime {
        self.now
    }
    fn utc_offset_minutes(&self) -> Option<i32> {
        self.offset
    }
}

fn script(source: &str, env: Arc<dyn PacEnv>, limits: PacLimits) -> Arc<engine::Script> {
    Arc::new(engine::Script {
        name: "test.pac".into(),
        source: source.into(),
        limits,
        env,
    })
}

/// Evaluates each expression in the helpers' environment and compares its `JSON.stringify`
/// with the expected text.
fn check(env: FakeEnv, cases: &[(&str, &str)]) {
    let list = cases
        .iter()
        .map(|(e, _)| format!("JSON.stringify({e})"))
        .collect::<Vec<_>>()
        .join(",\n");
    let source =
        format!("function FindProxyForURL(url, host) {{ return [\n{list}\n].join('\\u0001'); }}");
    let s = script(&source, Arc::new(env), PacLimits::default());
    let (_, answer) = engine::run(&s, Some(("http://x/".into(), "x".into()))).unwrap();
    let answer = answer.unwrap();
    let got: Vec<&str> = answer.split('\u{1}').collect();
    assert_eq!(got.len(), cases.len());
    let mut wrong = Vec::new();
    for ((expr, want), got) in cases.iter().zip(got) {
        if *want != got {
            wrong.push(format!("{expr} = {got}, expected {want}"));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

#[test]
fn pac_helpers_on_names_and_patterns() {
    check(
        FakeEnv::new(),
        &[
            ("isPlainHostName('www')", "true"),
            ("isPlainHostName('www.corp')", "false"),
            ("isPlainHostName('::1')", "false"),
            ("dnsDomainIs('www.netscape.com', '.netscape.com')", "true"),
            ("dnsDomainIs('www', '.netscape.com')", "false"),
            ("dnsDomainIs('www.mcom.com', '.netscape.com')", "false"),
            (
                "localHostOrDomainIs('www.netscape.com', 'www.netscape.com')",
                "true",
            ),
            ("localHostOrDomainIs('www', 'www.netscape.com')", "true"),
            (
                "localHostOrDomainIs('www.mcom.com', 'www.netscape.com')",
                "false",
            ),
            (
                "localHostOrDomainIs('home.netscape.com', 'www.netscape.com')",
                "false",
            ),
            ("dnsDomainLevels('www')", "0"),
            ("dnsDomainLevels('www.netscape.com')", "2"),
            ("convert_addr('104.16.41.2')", "1745889538"),
            ("convert_addr('255.255.255.255')", "-1"),
            (
                "shExpMatch('http://home.netscape.com/people/ari/index.html', '*/ari/*')",
                "true",
            ),
            (
                "shExpMatch('http://home.netscape.com/people/montulli/index.html', '*/ari/*')",
                "false",
            ),
            (
                "shExpMatch('www.corp.example.com', '*.example.com')",
                "true",
            ),
            ("shExpMatch('wwwXcorp', 'www.corp')", "false"),
            ("shExpMatch('a+b', 'a+b')", "true"),
            ("shExpMatch('(x)|[y]', '(x)|[y]')", "true"),
            ("shExpMatch('10.1.2.3', '10.?.*')", "true"),
            ("shExpMatch(12345, '12*')", "true"),
            ("isInNet('10.1.2.3', '10.0.0.0', '255.0.0.0')", "true"),
            ("isInNet('11.1.2.3', '10.0.0.0', '255.0.0.0')", "false"),
            ("isInNet('172.20.1.1', '172.16.0.0', '255.240.0.0')", "true"),
            (
                "isInNet('172.32.1.1', '172.16.0.0', '255.240.0.0')",
                "false",
            ),
            (
                "isInNet('198.95.249.79', '198.95.249.79', '255.255.255.255')",
                "true",
            ),
            ("isInNet('10.1.2.3', '10.0.0.0', 'garbage')", "false"),
            ("isInNet('10.1.2.3', '10.0.0.300', '255.0.0.0')", "false"),
            ("getClientVersion()", "\"1.0\""),
            (
                "sortIpAddressList('10.2.2.2;10.1.1.1;::2;::1')",
                "\"::1;::2;10.1.1.1;10.2.2.2\"",
            ),
            ("sortIpAddressList('10.1.1.1;bogus')", "false"),
            ("sortIpAddressList('')", "false"),
            ("typeof alert('hello from the test PAC')", "\"undefined\""),
        ],
    );
}

#[test]
fn pac_helpers_on_dns_and_addresses() {
    let env = FakeEnv::new();
    check(
        env,
        &[
            ("dnsResolve('intranet.corp')", "\"10.1.2.3\""),
            ("dnsResolve('dual.corp')", "\"10.1.2.4\""),
            ("dnsResolve('v6only.corp')", "null"),
            ("dnsResolve('nowhere.example')", "null"),
            ("dnsResolve('192.0.2.7')", "\"192.0.2.7\""),
            (
                "dnsResolveEx('dual.corp')",
                "\"2001:db8::5;10.1.2.4;10.1.2.5\"",
            ),
            ("dnsResolveEx('nowhere.example')", "\"\""),
            ("isResolvable('intranet.corp')", "true"),
            ("isResolvable('v6only.corp')", "false"),
            ("isResolvable('nowhere.example')", "false"),
            ("isResolvableEx('v6only.corp')", "true"),
            ("isResolvableEx('nowhere.example')", "false"),
            ("isInNet('intranet.corp', '10.0.0.0', '255.0.0.0')", "true"),
            (
                "isInNet('nowhere.example', '10.0.0.0', '255.0.0.0')",
                "false",
            ),
            ("isInNetEx('10.1.2.3', '10.0.0.0/8')", "true"),
            ("isInNetEx('10.1.2.3', '10.1.2.3/32')", "true"),
            ("isInNetEx('10.1.2.3', '10.1.2.4/32')", "false"),
            ("isInNetEx('2001:db8::5', '2001:db8::/32')", "true"),
            ("isInNetEx('2001:db9::5', '2001:db8::/32')", "false"),
            (
                "isInNetEx('192.0.2.1;2001:db8::5', '2001:db8::/32')",
                "true",
            ),
            ("isInNetEx('dual.corp', '2001:db8::/48')", "true"),
            ("isInNetEx('v6only.corp', '10.0.0.0/8')", "false"),
            ("isInNetEx('10.1.2.3', '10.0.0.0/33')", "false"),
            ("isInNetEx('10.1.2.3', '10.0.0.0')", "false"),
            ("isInNetEx('10.1.2.3', '0.0.0.0/0')", "true"),
            ("myIpAddress()", "\"192.168.7.20\""),
            ("myIpAddressEx()", "\"192.168.7.20;2001:db8:7::20\""),
            (
                "isInNet(myIpAddress(), '192.168.0.0', '255.255.0.0')",
                "true",
            ),
        ],
    );

    let mut env = FakeEnv::new();
    env.local = Vec::new();
    check(
        env,
        &[
            ("myIpAddress()", "\"127.0.0.1\""),
            ("myIpAddressEx()", "\"127.0.0.1\""),
        ],
    );
}

#[test]
fn pac_dns_answers_are_cached_per_evaluation() {
    let env = Arc::new(FakeEnv::new());
    let source = "function FindProxyForURL(url, host) {
        if (isInNet(host, '192.168.0.0', '255.255.0.0')) return 'PROXY a:1';
        if (isInNet(host, '172.16.0.0', '255.240.0.0')) return 'PROXY b:1';
        if (isResolvable(host) && isInNet(host, '10.0.0.0', '255.0.0.0')) return 'DIRECT';
        return 'PROXY c:1';
    }";
    let pac = Pac::with_env("test.pac", source, PacLimits::default(), env.clone()).unwrap();
    assert_eq!(
        pac.find_proxy("http://intranet.corp/", "intranet.corp")
            .unwrap(),
        vec![Proxy::Direct]
    );
    assert_eq!(env.lookups.load(Ordering::SeqCst), 1);
    pac.find_proxy("http://intranet.corp/", "intranet.corp")
        .unwrap();
    assert_eq!(
        env.lookups.load(Ordering::SeqCst),
        2,
        "a new evaluation asks again"
    );
}

#[test]
fn pac_dns_lookups_are_bounded_per_evaluation() {
    let env = Arc::new(FakeEnv::new());
    let source = "function FindProxyForURL(url, host) {
        for (var i = 0; i < 100; i++) dnsResolve('n' + i + '.example');
        return isResolvable('intranet.corp') ? 'PROXY late:1' : 'DIRECT';
    }";
    let pac = Pac::with_env("dns.pac", source, PacLimits::default(), env.clone()).unwrap();
    assert_eq!(
        pac.find_proxy("http://a/", "a").unwrap(),
        vec![Proxy::Direct]
    );
    assert_eq!(env.lookups.load(Ordering::SeqCst), 32);
}

#[test]
fn pac_scripts_see_no_credentials_paths_of_encrypted_urls_or_fragments() {
    for (url, seen) in [
        (
            "wss://gw.example.org:8443/sp/agent?token=x",
            "wss://gw.example.org:8443/",
        ),
        (
            "https://user:pw@GW.example.org/a/b#frag",
            "https://GW.example.org/",
        ),
        (
            "http://user@www.example.org/a/b?q=1#frag",
            "http://www.example.org/a/b?q=1",
        ),
        ("http://www.example.org", "http://www.example.org/"),
        ("ws://[::1]:8080/x", "ws://[::1]:8080/x"),
        ("not a url", "not a url"),
    ] {
        assert_eq!(url_for_script(url), seen, "{url}");
    }
    let source = "function FindProxyForURL(url, host) {
        return url == 'wss://gw.example.org:8443/' ? 'DIRECT' : 'PROXY saw-too-much:1';
    }";
    let pac = Pac::with_env(
        "url.pac",
        source,
        PacLimits::default(),
        Arc::new(FakeEnv::new()),
    )
    .unwrap();
    assert_eq!(
        pac.find_proxy("wss://gw.example.org:8443/sp/agent", "gw.example.org")
            .unwrap(),
        vec![Proxy::Direct]
    );
}

#[test]
fn pac_date_and_time_helpers_honour_local_time_and_gmt() {
    // Local (UTC+1): Saturday 2024-03-16 00:30:15. GMT: Friday 2024-03-15 23:30:15.
    check(
        FakeEnv::new(),
        &[
            ("weekdayRange('SAT')", "true"),
            ("weekdayRange('FRI')", "false"),
            ("weekdayRange('FRI', 'GMT')", "true"),
            ("weekdayRange('SAT', 'GMT')", "false"),
            ("weekdayRange('MON', 'FRI')", "false"),
            ("weekdayRange('MON', 'FRI', 'GMT')", "true"),
            ("weekdayRange('FRI', 'MON')", "true"),
            ("weekdayRange('SUN', 'THU')", "false"),
            ("weekdayRange('sat')", "true"),
            ("weekdayRange('XYZ')", "false"),
            ("weekdayRange()", "false"),
            ("weekdayRange('MON', 'TUE', 'WED')", "false"),
            ("dateRange(16)", "true"),
            ("dateRange(15)", "false"),
            ("dateRange(15, 'GMT')", "true"),
            ("dateRange('MAR')", "true"),
            ("dateRange(2024)", "true"),
            ("dateRange(2023)", "false"),
            ("dateRange(10, 20)", "true"),
            ("dateRange(20, 10)", "false"),
            ("dateRange(25, 17)", "true"),
            ("dateRange('JAN', 'MAR')", "true"),
            ("dateRange('APR', 'JUN')", "false"),
            ("dateRange('NOV', 'MAR')", "true"),
            ("dateRange(2020, 2030)", "true"),
            ("dateRange(2030, 2020)", "false"),
            ("dateRange(1, 'MAR', 16, 'MAR')", "true"),
            ("dateRange(1, 'MAR', 15, 'MAR')", "false"),
            ("dateRange(1, 'MAR', 15, 'MAR', 'GMT')", "true"),
            ("dateRange(1, 'DEC', 31, 'MAR')", "true"),
            ("dateRange('FEB', 2024, 'APR', 2024)", "true"),
            ("dateRange('APR', 2024, 'FEB', 2025)", "false"),
            ("dateRange(16, 'MAR', 2024, 16, 'MAR', 2024)", "true"),
            ("dateRange(15, 'MAR', 2024, 15, 'MAR', 2024)", "false"),
            ("dateRange(15, 'MAR', 2024, 15, 'MAR', 2024, 'GMT')", "true"),
            ("dateRange('16')", "true"),
            ("dateRange(0)", "false"),
            ("dateRange('MAR', 16)", "false"),
            ("dateRange()", "false"),
            ("timeRange(0)", "true"),
            ("timeRange(23)", "false"),
            ("timeRange(23, 'GMT')", "true"),
            ("timeRange(0, 1)", "true"),
            ("timeRange(9, 17)", "false"),
            ("timeRange(9, 17, 'GMT')", "false"),
            ("timeRange(22, 6)", "true"),
            ("timeRange(0, 30, 0, 31)", "true"),
            ("timeRange(0, 31, 0, 59)", "false"),
            ("timeRange(23, 0, 23, 59, 'GMT')", "true"),
            ("timeRange(0, 30, 15, 0, 30, 15)", "true"),
            ("timeRange(0, 30, 16, 0, 30, 59)", "false"),
            ("timeRange(23, 0, 0, 1, 0, 0)", "true"),
            ("timeRange('x')", "false"),
            ("timeRange(1, 2, 3)", "false"),
        ],
    );

    // New Year: local Wednesday 2025-01-01 00:30, GMT Tuesday 2024-12-31 23:30.
    let mut env = FakeEnv::new();
    env.now = UNIX_EPOCH + Duration::from_secs(1_735_687_800);
    check(
        env,
        &[
            ("weekdayRange('WED')", "true"),
            ("weekdayRange('TUE', 'GMT')", "true"),
            ("dateRange(2025)", "true"),
            ("dateRange(2024, 'GMT')", "true"),
            ("dateRange('DEC', 'FEB')", "true"),
            ("dateRange('DEC', 'GMT')", "true"),
            ("dateRange(1, 'DEC', 15, 'JAN')", "true"),
            ("dateRange('NOV', 2024, 'JAN', 2025)", "true"),
            ("dateRange('NOV', 2024, 'DEC', 2024)", "false"),
            ("dateRange('NOV', 2024, 'DEC', 2024, 'GMT')", "true"),
            ("dateRange(31, 'DEC', 2024, 1, 'JAN', 2025)", "true"),
        ],
    );

    // The OS's time zone (whatever it is): the helpers still answer.
    let mut env = FakeEnv::new();
    env.offset = None;
    check(
        env,
        &[
            ("weekdayRange('SUN', 'SAT')", "true"),
            ("weekdayRange('FRI', 'SAT')", "true"),
            ("dateRange(2024)", "true"),
            ("timeRange(0, 23)", "true"),
        ],
    );
}

const CORPORATE_PAC: &str = r#"
// A corporate PAC in the style of real ones.
var proxies = "PROXY proxy1.corp.example.com:3128; PROXY proxy2.corp.example.com:3128; DIRECT";

function FindProxyForURL(url, host) {
    // Intranet names go direct.
    if (isPlainHostName(host) ||
        dnsDomainIs(host, ".corp.example.com") ||
        localHostOrDomainIs(host, "intranet.corp") ||
        shExpMatch(host, "*.local")) {
        return "DIRECT";
    }
    // So do private addresses.
    var ip = dnsResolve(host);
    if (ip && (isInNet(ip, "10.0.0.0", "255.0.0.0") ||
               isInNet(ip, "172.16.0.0", "255.240.0.0") ||
               isInNet(ip, "192.168.0.0", "255.255.0.0") ||
               isInNet(ip, "127.0.0.0", "255.0.0.0"))) {
        return "DIRECT";
    }
    // VPN users go through the VPN's SOCKS proxy first.
    if (isInNet(myIpAddress(), "10.20.0.0", "255.255.0.0")) {
        return "SOCKS5 vpn-socks.corp.example.com:1080; " + proxies;
    }
    if (shExpMatch(host, "*.partner.example.net") || shExpMatch(url, "*://*.github.com/*")) {
        return "PROXY partner-proxy.corp.example.com:8080";
    }
    if (url.substring(0, 4) == "ftp:") {
        return "PROXY ftp-proxy.corp.example.com:2121";
    }
    return proxies;
}
"#;

fn http(h: &str, p: u16) -> Proxy {
    Proxy::Http {
        host: h.into(),
        port: p,
        user: None,
    }
}

#[test]
fn pac_realistic_corporate_script() {
    let pac = Pac::with_env(
        "http://wpad.corp.example.com/wpad.dat",
        CORPORATE_PAC,
        PacLimits::default(),
        Arc::new(FakeEnv::new()),
    )
    .unwrap();
    let proxies = vec![
        http("proxy1.corp.example.com", 3128),
        http("proxy2.corp.example.com", 3128),
        Proxy::Direct,
    ];
    let cases: &[(&str, &str, Vec<Proxy>)] = &[
        (
            "https://wiki.corp.example.com/",
            "wiki.corp.example.com",
            vec![Proxy::Direct],
        ),
        ("http://intranet/", "intranet", vec![Proxy::Direct]),
        (
            "http://intranet.corp/x",
            "intranet.corp",
            vec![Proxy::Direct],
        ),
        (
            "http://printer.local/",
            "printer.local",
            vec![Proxy::Direct],
        ),
        (
            "https://build.internal.example.org/",
            "build.internal.example.org",
            vec![Proxy::Direct],
        ),
        ("https://10.9.8.7/", "10.9.8.7", vec![Proxy::Direct]),
        (
            "wss://gw.example.org/agent",
            "gw.example.org",
            proxies.clone(),
        ),
        (
            "wss://gw.example.net/agent",
            "GW.Example.NET",
            proxies.clone(),
        ),
        (
            "https://api.github.com/repos",
            "api.github.com",
            vec![http("partner-proxy.corp.example.com", 8080)],
        ),
        (
            "https://x.partner.example.net/",
            "x.partner.example.net",
            vec![http("partner-proxy.corp.example.com", 8080)],
        ),
        (
            "ftp://files.example.org/",
            "files.example.org",
            vec![http("ftp-proxy.corp.example.com", 2121)],
        ),
    ];
    for (url, host, want) in cases {
        assert_eq!(&pac.find_proxy(url, host).unwrap(), want, "{url}");
    }

    // On the VPN, SOCKS5 first, then the HTTP proxies, then direct.
    let mut env = FakeEnv::new();
    env.local = vec!["10.20.1.5".parse().unwrap()];
    let pac = Pac::with_env(
        "vpn.pac",
        CORPORATE_PAC,
        PacLimits::default(),
        Arc::new(env),
    )
    .unwrap();
    let mut want = vec![Proxy::Socks5 {
        host: "vpn-socks.corp.example.com".into(),
        port: 1080,
        user: None,
        remote_dns: true,
    }];
    want.extend(proxies);
    assert_eq!(
        pac.find_proxy("wss://gw.example.org/agent", "gw.example.org")
            .unwrap(),
        want
    );
}

#[test]
fn pac_realistic_pac_is_fast() {
    let pac = Pac::with_env(
        "corp.pac",
        CORPORATE_PAC,
        PacLimits::default(),
        Arc::new(FakeEnv::new()),
    )
    .unwrap();
    let n = 100;
    let t0 = Instant::now();
    for _ in 0..n {
        pac.find_proxy("wss://gw.example.org/agent", "gw.example.org")
            .unwrap();
    }
    let each = t0.elapsed() / n;
    let trivial = Pac::with_env(
        "trivial.pac",
        "function FindProxyForURL(u, h) { return 'DIRECT'; }",
        PacLimits::default(),
        Arc::new(FakeEnv::new()),
    )
    .unwrap();
    let t0 = Instant::now();
    for _ in 0..n {
        trivial
            .find_proxy("wss://gw.example.org/agent", "gw.example.org")
            .unwrap();
    }
    let base = t0.elapsed() / n;
    eprintln!(
        "realistic PAC: {each:?} per find_proxy (fresh engine, helpers and script each time); \
         a one-line PAC: {base:?}"
    );
    assert!(each < Duration::from_millis(100), "{each:?}");
}

#[test]
fn pac_prefers_find_proxy_for_url_ex_and_gets_lowercase_host() {
    let source = "
        function FindProxyForURL(url, host) { return 'PROXY plain:1'; }
        function FindProxyForURLEx(url, host) {
            return host == 'gw.example.org' ? 'PROXY ex:1' : 'PROXY other:1';
        }";
    let pac = Pac::with_env(
        "ex.pac",
        source,
        PacLimits::default(),
        Arc::new(FakeEnv::new()),
    )
    .unwrap();
    assert_eq!(
        pac.find_proxy("https://GW.example.ORG/", "GW.example.ORG")
            .unwrap(),
        vec![http("ex", 1)]
    );
}

#[test]
fn pac_evaluations_share_no_state() {
    let source = "var calls = 0;
        function FindProxyForURL(url, host) { calls++; return calls == 1 ? 'DIRECT' : 'PROXY leak:1'; }";
    let pac = Pac::with_env(
        "state.pac",
        source,
        PacLimits::default(),
        Arc::new(FakeEnv::new()),
    )
    .unwrap();
    for _ in 0..3 {
        assert_eq!(
            pac.find_proxy("http://a/", "a").unwrap(),
            vec![Proxy::Direct]
        );
    }
}

#[test]
fn pac_is_send_sync_and_usable_from_threads() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Pac>();
    let pac = Pac::with_env(
        "mt.pac",
        CORPORATE_PAC,
        PacLimits::default(),
        Arc::new(FakeEnv::new()),
    )
    .unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let pac = pac.clone();
            std::thread::spawn(move || pac.find_proxy("http://intranet/", "intranet").unwrap())
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), vec![Proxy::Direct]);
    }
}

#[test]
fn pac_sandbox_has_no_io() {
    let source = "function FindProxyForURL(url, host) {
        var names = ['std', 'os', 'require', 'fetch', 'XMLHttpRequest', 'process', 'Deno', 'scriptArgs', 'print'];
        for (var i = 0; i < names.length; i++) {
            if (typeof globalThis[names[i]] !== 'undefined') return 'PROXY has-' + names[i] + ':1';
        }
        return 'DIRECT';
    }";
    let pac = Pac::with_env(
        "io.pac",
        source,
        PacLimits::default(),
        Arc::new(FakeEnv::new()),
    )
    .unwrap();
    assert_eq!(
        pac.find_proxy("http://a/", "a").unwrap(),
        vec![Proxy::Direct]
    );
}

#[test]
fn pac_exotic_javascript_neither_crashes_nor_leaks() {
    for body in [
        "import('os'); return 'DIRECT';",
        "async function f() { await null; return 1; } f(); return 'DIRECT';",
        "Promise.resolve().then(function () { for (;;) {} }); return 'DIRECT';",
        "function again() { Promise.resolve().then(again); } again(); return 'DIRECT';",
        "Promise.reject(new Error('unhandled')); return 'DIRECT';",
        "function* g() { yield 1; } g().next(); return 'DIRECT';",
        "var m = new Map([['a', 1]]); return m.get('a') === 1 ? 'DIRECT' : '';",
        "return eval('\"DIRECT\"');",
        "return new Function('return \"DIRECT\"')();",
        "return new Date().getFullYear() > 2000 ? 'DIRECT' : '';",
        "return /^D(IR)ECT$/.test('DIRECT') ? 'DIRECT' : '';",
        "globalThis.dnsResolve = null; return 'DIRECT';",
        "return String.prototype.toUpperCase.call('direct');",
        "var o = {}; o.self = o; return JSON.stringify({ a: 'DIRECT' }).slice(6, 12);",
    ] {
        let source = format!("function FindProxyForURL(url, host) {{ {body} }}");
        let pac = Pac::with_env("exotic.pac", &source, quick(), Arc::new(FakeEnv::new()))
            .unwrap_or_else(|e| panic!("{body}: {e}"));
        assert_eq!(
            pac.find_proxy("http://a/", "a")
                .unwrap_or_else(|e| panic!("{body}: {e}")),
            vec![Proxy::Direct],
            "{body}"
        );
    }
}

fn quick() -> PacLimits {
    PacLimits {
        time: Duration::from_millis(500),
        ..PacLimits::default()
    }
}

fn load_err(source: &str, limits: PacLimits) -> String {
    Pac::with_env(
        "http://wpad.corp/wpad.dat",
        source,
        limits,
        Arc::new(FakeEnv::new()),
    )
    .unwrap_err()
    .to_string()
}

fn call_err(source: &str, limits: PacLimits) -> String {
    let pac = Pac::with_env(
        "http://wpad.corp/wpad.dat",
        source,
        limits,
        Arc::new(FakeEnv::new()),
    )
    .unwrap();
    pac.find_proxy("https://gw.example.org/", "gw.example.org")
        .unwrap_err()
        .to_string()
}

#[test]
fn pac_endless_loops_end_at_the_time_limit() {
    for (what, source, at_load) in [
        ("at load", "for (;;) {}", true),
        (
            "in the call",
            "function FindProxyForURL(u, h) { while (true) {} }",
            false,
        ),
        (
            "catching everything",
            "function FindProxyForURL(u, h) { for (;;) { try { for (;;) {} } catch (e) {} } }",
            false,
        ),
        (
            "in a helper loop",
            "function FindProxyForURL(u, h) { for (;;) { shExpMatch(u, '*a*b*c'); dnsResolve('x' + Math.random()); } }",
            false,
        ),
    ] {
        let t0 = Instant::now();
        let e = if at_load {
            load_err(source, quick())
        } else {
            call_err(source, quick())
        };
        let took = t0.elapsed();
        eprintln!("endless loop {what}: error after {took:?}");
        assert_eq!(
            e,
            "PAC at http://wpad.corp/wpad.dat: timed out after 500ms (an endless loop in the script, or DNS lookups that hang?)",
            "{what}"
        );
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_millis(900),
            "{what}: {took:?}"
        );
    }
}

#[test]
fn pac_watchdog_abandons_an_evaluation_stuck_outside_the_engine() {
    // A resolver that ignores its timeout: QuickJS cannot interrupt it; the watchdog answers.
    let mut env = FakeEnv::new();
    env.hang = Duration::from_secs(2);
    let source =
        "function FindProxyForURL(u, h) { return dnsResolve(h) ? 'DIRECT' : 'PROXY p:1'; }";
    let limits = PacLimits {
        time: Duration::from_millis(200),
        ..PacLimits::default()
    };
    let pac = Pac::with_env("hang.pac", source, limits, Arc::new(env)).unwrap();
    let t0 = Instant::now();
    let e = pac
        .find_proxy("http://slow/", "slow")
        .unwrap_err()
        .to_string();
    let took = t0.elapsed();
    assert!(e.contains("timed out after 200ms"), "{e}");
    assert!(took < Duration::from_millis(1200), "{took:?}");
}

#[test]
fn pac_script_errors_say_what_went_wrong() {
    assert_eq!(
        call_err("function FindProxyForURL(url, host) {\n  return foo;\n}", quick()),
        "PAC at http://wpad.corp/wpad.dat: FindProxyForURL threw: ReferenceError: foo is not defined"
    );
    assert_eq!(
        call_err(
            "function FindProxyForURL(url, host) { throw 'no proxy for you'; }",
            quick()
        ),
        "PAC at http://wpad.corp/wpad.dat: FindProxyForURL threw: no proxy for you"
    );
    assert_eq!(
        call_err(
            "function FindProxyForURL(url, host) { return 42; }",
            quick()
        ),
        "PAC at http://wpad.corp/wpad.dat: FindProxyForURL returned 42 (a number), not a string"
    );
    assert_eq!(
        call_err("function FindProxyForURL(url, host) { }", quick()),
        "PAC at http://wpad.corp/wpad.dat: FindProxyForURL returned undefined (no return?), not a string"
    );
    let e = call_err(
        "function FindProxyForURL(url, host) { return ''; }",
        quick(),
    );
    assert!(
        e.starts_with(
            "PAC at http://wpad.corp/wpad.dat: FindProxyForURL returned ``: no usable entry"
        ),
        "{e}"
    );
    let e = call_err(
        "function FindProxyForURL(url, host) { return 'HTTPS secure:443'; }",
        quick(),
    );
    assert!(
        e.contains("returned `HTTPS secure:443`: no usable entry"),
        "{e}"
    );
    let e = call_err(
        "function FindProxyForURL(url, host) { return 'DIRECT;' + new Array(10000).join(' '); }",
        quick(),
    );
    assert!(e.contains("longer than the 8 KiB"), "{e}");
    assert!(e.len() < 400, "{e}");
    let e = call_err(
        "function FindProxyForURL(u, h) { return FindProxyForURL(u, h); }",
        quick(),
    );
    assert!(e.contains("FindProxyForURL threw: RangeError"), "{e}");
    let e = call_err(
        "function FindProxyForURL(u, h) { return isInNet(h, '10.0.0.0'); }",
        quick(),
    );
    assert!(
        e.contains("returned false (a boolean), not a string"),
        "{e}"
    );

    assert_eq!(
        load_err("var x = ;", quick()),
        "PAC at http://wpad.corp/wpad.dat: the script does not load: SyntaxError: unexpected token in expression: ';' (line 1)"
    );
    assert_eq!(
        load_err("var FindProxyForURL = 'DIRECT';", quick()),
        "PAC at http://wpad.corp/wpad.dat: the script defines no function FindProxyForURL (is this really a PAC file?)"
    );
    assert!(load_err("", quick()).contains("no function FindProxyForURL"));
    assert!(load_err("<html>404</html>", quick()).contains("does not load: SyntaxError"));
    let e = load_err("function FindProxyForURL() { return 'DIRECT'; }\0", quick());
    assert!(
        e.contains("does not load: it contains a NUL character"),
        "{e}"
    );
    let e = load_err("throw new Error('bad config');", quick());
    assert!(e.ends_with("does not load: Error: bad config"), "{e}");
    let e = call_err(
        "function helper(h) { return h.nope.deeper; }\nfunction FindProxyForURL(u, h) { return helper(h); }",
        quick(),
    );
    assert!(
        e.ends_with("FindProxyForURL threw: TypeError: cannot read property 'deeper' of undefined (in helper)"),
        "{e}"
    );
    let e = load_err(
        "function FindProxyForURL(u, h) {\n  return 'DIRECT';\n}}\n",
        quick(),
    );
    assert!(e.contains("does not load: SyntaxError: "), "{e}");
    assert!(e.ends_with("(line 3)"), "{e}");
}

#[test]
fn pac_memory_bombs_end_with_an_error() {
    let t0 = Instant::now();
    let e = call_err(
        "function FindProxyForURL(u, h) { var a = []; while (1) a.push(new Array(1e6)); }",
        PacLimits::default(),
    );
    assert!(e.contains("ran out of memory (the limit is 16 MiB)"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let e = call_err(
        "function FindProxyForURL(u, h) { var s = 'x'; while (1) s = s + s; }",
        PacLimits::default(),
    );
    assert!(e.contains("ran out of memory"), "{e}");
    let e = load_err(
        "var a = []; for (;;) a.push({ x: a.length, y: 'some text ' + a.length });",
        PacLimits::default(),
    );
    assert!(e.contains("ran out of memory"), "{e}");
}

#[test]
fn pac_oversized_scripts_are_refused() {
    let big = format!(
        "function FindProxyForURL(u, h) {{ return 'DIRECT'; }}\n//{}",
        "x".repeat(1 << 20)
    );
    let e = load_err(&big, PacLimits::default());
    assert!(
        e.starts_with("PAC at http://wpad.corp/wpad.dat: the script is 10")
            && e.ends_with("bytes, more than the 1 MiB limit"),
        "{e}"
    );
    let small = PacLimits {
        script_size: 10,
        ..PacLimits::default()
    };
    assert!(
        load_err("function FindProxyForURL(u, h) { return 'DIRECT'; }", small)
            .contains("more than the 10 bytes limit")
    );
}

#[test]
fn pac_source_names_hide_credentials() {
    let e = Pac::with_env(
        "http://user:secret@wpad.corp/wpad.dat",
        "",
        PacLimits::default(),
        Arc::new(FakeEnv::new()),
    )
    .unwrap_err()
    .to_string();
    assert!(!e.contains("secret"), "{e}");
}

#[test]
fn pac_system_env_works_offline() {
    // Literals need no resolver; names time out at the deadline at worst.
    let env = SystemEnv;
    assert_eq!(
        env.resolve("192.0.2.1", Duration::from_millis(10)),
        vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        env.resolve("::1", Duration::ZERO),
        vec![IpAddr::from(Ipv6Addr::LOCALHOST)]
    );
    assert!(env.resolve("", Duration::from_secs(1)).is_empty());
    let t0 = Instant::now();
    let _ = env.resolve("name.invalid", Duration::from_millis(300));
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    for a in env.local_addresses() {
        assert!(!a.is_unspecified(), "{a}");
    }
}
