//! Sites on one machine, made of network namespaces, veth pairs, a router namespace and
//! nftables: the network the product's claim is about ("neither site opens an inbound port, and
//! only 443 leaves either site"). Two layouts ([`Layout`]): four sites with a corporate proxy
//! ([`Layout::Proxied`], below), and a DMZ with a desktop and two trusted sites that each may
//! reach only the DMZ's 443 ([`Layout::TwoSites`], for several DMZ instances behind a load
//! balancer).
//!
//! ```text
//!   desktop 10.99.1.2 ─┐                       ┌─ DMZ 10.99.3.2      (gateway :443)
//!                      ├── router 10.99.n.1 ───┤
//!   proxy   10.99.2.2 ─┘                       └─ trusted 10.99.4.2  (connector, services)
//! ```
//!
//! Each site's own firewall (nftables, in its namespace) says what it may do:
//!
//! | site | outbound (new connections) | inbound (new connections) |
//! |---|---|---|
//! | desktop | only to the proxy, TCP 3128 | none |
//! | proxy | only TCP 443 | only from the desktop, TCP 3128 |
//! | DMZ | anything (it is shown not to reach the trusted site) | only TCP 443 |
//! | trusted | only to the DMZ, TCP 443 | **none at all** |
//!
//! In [`Layout::TwoSites`] there is no proxy: the desktop, the trusted site and the second trusted
//! site (`TrustedB`, 10.99.5.2) may each open only TCP 443 to the DMZ and accept nothing.
//!
//! Loopback is open everywhere (the agent's local ports, the services on the trusted site).
//! Everything is created by [`Topology::new`] and removed on drop, also when a test fails.
//! Needs root, `ip` (iproute2) and `nft` (nftables).

use crate::require_tool;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// One of the sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    Desktop,
    Proxy,
    Dmz,
    Trusted,
    /// A second trusted site ([`Layout::TwoSites`] only).
    TrustedB,
}

/// Which sites a [`Topology`] has, and what each may reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Desktop, proxy, DMZ, trusted site: the desktop goes out through the proxy.
    Proxied,
    /// Desktop, DMZ and two trusted sites, each allowed only TCP 443 to the DMZ.
    TwoSites,
}

impl Layout {
    pub fn sites(self) -> &'static [Site] {
        match self {
            Layout::Proxied => &[Site::Desktop, Site::Proxy, Site::Dmz, Site::Trusted],
            Layout::TwoSites => &[Site::Desktop, Site::Dmz, Site::Trusted, Site::TrustedB],
        }
    }
}

impl Site {
    fn index(self) -> u8 {
        match self {
            Site::Desktop => 1,
            Site::Proxy => 2,
            Site::Dmz => 3,
            Site::Trusted => 4,
            Site::TrustedB => 5,
        }
    }

    fn short(self) -> &'static str {
        match self {
            Site::Desktop => "desk",
            Site::Proxy => "proxy",
            Site::Dmz => "dmz",
            Site::Trusted => "trust",
            Site::TrustedB => "trustb",
        }
    }

    /// The site's address.
    pub fn ip(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, self.index(), 2)
    }
}

/// The sites and the router; removed on drop.
pub struct Topology {
    prefix: String,
    namespaces: Vec<String>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Topology {
    /// The four sites of [`Layout::Proxied`].
    pub fn new(tag: &str) -> Result<Topology> {
        Topology::with_layout(tag, Layout::Proxied)
    }

    pub fn with_layout(tag: &str, layout: Layout) -> Result<Topology> {
        require_tool("ip");
        require_tool("nft");
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("sp{}{n}-{tag}", std::process::id() % 100_000);
        let mut t = Topology {
            prefix,
            namespaces: Vec::new(),
        };
        let router = t.router();
        ip(&["netns", "add", &router])?;
        t.namespaces.push(router.clone());
        ip(&["-n", &router, "link", "set", "lo", "up"])?;
        t.sysctl(&router, "net.ipv4.ip_forward=1")?;
        for &site in layout.sites() {
            let ns = t.ns(site);
            ip(&["netns", "add", &ns])?;
            t.namespaces.push(ns.clone());
            let peer = format!("s{}", site.index());
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns",
                &router,
            ])?;
            let i = site.index();
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.99.{i}.2/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.99.{i}.1"),
            ])?;
            ip(&[
                "-n",
                &router,
                "addr",
                "add",
                &format!("10.99.{i}.1/24"),
                "dev",
                &peer,
            ])?;
            ip(&["-n", &router, "link", "set", &peer, "up"])?;
            t.nft(&ns, &firewall(site, layout))?;
        }
        Ok(t)
    }

    /// Masquerades everything `site` sends through the router to `to` (nftables NAT in the
    /// router): `to` sees every connection of the site come from one address, the router's on
    /// `to`'s link (10.99.n.1), like desktops behind a corporate NAT.
    pub fn masquerade(&self, site: Site, to: Site) -> Result<()> {
        let rules = format!(
            "table ip nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr 10.99.{}.0/24 oifname \"s{}\" masquerade
  }}
}}
",
            site.index(),
            to.index()
        );
        self.nft(&self.router(), &rules)
    }

    /// The address `site` is seen from on `to`'s link when [`Topology::masquerade`]d there.
    pub fn nat_address(to: Site) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, to.index(), 1)
    }

    fn router(&self) -> String {
        format!("{}-r", self.prefix)
    }

    /// The namespace name of a site.
    pub fn ns(&self, site: Site) -> String {
        format!("{}-{}", self.prefix, site.short())
    }

    /// A command that runs `program` inside the site's namespace.
    pub fn cmd(&self, site: Site, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(site)]).arg(program);
        c
    }

    /// Runs a command in a site to completion: (exit code, stdout, stderr).
    pub fn run(&self, site: Site, program: &str, args: &[&str]) -> Result<(i32, String, String)> {
        crate::run(self.cmd(site, program).args(args))
    }

    fn sysctl(&self, ns: &str, setting: &str) -> Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-qw", setting])
            .output()?;
        if !out.status.success() {
            bail!("sysctl {setting}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn nft(&self, ns: &str, rules: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft in {ns}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The nftables ruleset of a site (see the module table).
fn firewall(site: Site, layout: Layout) -> String {
    let proxy = Site::Proxy.ip();
    let desk = Site::Desktop.ip();
    let dmz = Site::Dmz.ip();
    let (inbound, outbound) = match site {
        Site::Desktop if layout == Layout::TwoSites => (
            String::new(),
            format!("ip daddr {dmz} tcp dport 443 accept"),
        ),
        Site::Desktop => (
            String::new(),
            format!("ip daddr {proxy} tcp dport 3128 accept"),
        ),
        Site::Proxy => (
            format!("ip saddr {desk} tcp dport 3128 accept"),
            "tcp dport 443 accept".to_string(),
        ),
        Site::Dmz => ("tcp dport 443 accept".to_string(), "accept".to_string()),
        Site::Trusted | Site::TrustedB => (
            String::new(),
            format!("ip daddr {dmz} tcp dport 443 accept"),
        ),
    };
    format!(
        "table inet site {{
  chain input {{
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
    {inbound}
  }}
  chain output {{
    type filter hook output priority 0; policy drop;
    oif lo accept
    ct state established,related accept
    {outbound}
  }}
}}
"
    )
}

/// One bare network namespace (loopback up), removed on drop: for tests that need an address
/// that is not loopback without touching the host's own network.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    pub fn new(tag: &str) -> Result<Namespace> {
        require_tool("ip");
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("sp{}{n}-{tag}", std::process::id() % 100_000);
        ip(&["netns", "add", &name])?;
        let ns = Namespace { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command that runs `program` inside this namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// The `/etc/resolv.conf` that programs run with [`Namespace::cmd`] (or `ip netns exec`)
    /// see: `ip netns exec` mounts `/etc/netns/NAME/resolv.conf` over it. Removed on drop.
    pub fn resolv_conf(&self, text: &str) -> Result<()> {
        let dir = std::path::Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("resolv.conf"), text)?;
        Ok(())
    }

    /// Runs `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Links this namespace to `other` with a veth pair: `mine` (e.g. `10.77.0.1/24`) on this
    /// side, `theirs` on the other.
    pub fn link(&self, other: &Namespace, mine: &str, theirs: &str) -> Result<()> {
        ip(&[
            "-n",
            &self.name,
            "link",
            "add",
            "lan0",
            "type",
            "veth",
            "peer",
            "name",
            "lan1",
            "netns",
            &other.name,
        ])?;
        for (ns, dev, cidr) in [(self, "lan0", mine), (other, "lan1", theirs)] {
            ip(&["-n", &ns.name, "addr", "add", cidr, "dev", dev])?;
            ip(&["-n", &ns.name, "link", "set", dev, "up"])?;
        }
        Ok(())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(&self.name));
    }
}
