//! Which network the machine is on, as a short key: the way out that worked is remembered per
//! network, so a laptop that moves from the office (proxy) to home (direct) and back re-probes
//! once on each move and not on every reconnect.
//!
//! The key is built from what changes when the network changes: the default gateway (Linux:
//! `/proc/net/route`) and the DNS search domains and servers (`/etc/resolv.conf`). Other systems
//! use what they have of these; an empty key only means "one network".

/// The current network's key (cheap: reads two small files).
pub fn key() -> String {
    #[allow(unused_mut)]
    let mut parts: Vec<String> = Vec::new();
    #[cfg(target_os = "linux")]
    if let Ok(route) = std::fs::read_to_string("/proc/net/route") {
        if let Some(gw) = default_gateway(&route) {
            parts.push(format!("gw={gw}"));
        }
    }
    #[cfg(unix)]
    if let Ok(conf) = std::fs::read_to_string("/etc/resolv.conf") {
        parts.push(resolv_key(&conf));
    }
    parts.join(" ")
}

/// The default route's gateway from `/proc/net/route` (hex, little-endian), as `a.b.c.d`.
pub fn default_gateway(route: &str) -> Option<String> {
    route.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[1] != "00000000" {
            return None;
        }
        let gw = u32::from_str_radix(f[2], 16).ok()?;
        let [a, b, c, d] = gw.to_le_bytes();
        Some(format!("{}/{a}.{b}.{c}.{d}", f[0]))
    })
}

/// The DNS part of the key: search/domain and nameserver lines, in order.
pub fn resolv_key(conf: &str) -> String {
    conf.lines()
        .map(str::trim)
        .filter(|l| {
            l.starts_with("search") || l.starts_with("domain") || l.starts_with("nameserver")
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(";")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gateway_is_read_from_proc_net_route() {
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
                     eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(default_gateway(route).unwrap(), "eth0/192.168.0.1");
        assert_eq!(default_gateway("Iface\n"), None);
    }

    #[test]
    fn the_dns_part_ignores_comments_and_options() {
        let conf = "# generated\nsearch corp.example.com\nnameserver 10.0.0.53\noptions ndots:2\n";
        assert_eq!(
            resolv_key(conf),
            "search corp.example.com;nameserver 10.0.0.53"
        );
    }
}
