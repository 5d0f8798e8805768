#!/usr/bin/env bash
# Runs every test of the workspace: installs the tools the end-to-end tests drive (curl,
# OpenSSH client and server, setpriv, squid, dante, an MIT KDC, nginx, HAProxy, Wine, mingw-w64,
# wixl, osslsigncode) when missing, builds the binaries, runs unit and
# end-to-end tests. Tests never skip for a missing tool: they fail naming it.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
# tcpdump: what a TLS-inspecting proxy forwarded, captured in the DMZ (tests/tests/topology.rs).
command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# psql: a real PostgreSQL client on a `protocol=postgres` rule (tests/tests/e2e.rs).
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
# native-tls (`--tls native`) builds against OpenSSL's headers.
pkg-config --exists openssl 2>/dev/null || need+=(libssl-dev pkg-config)
# squid-openssl: squid with TLS inspection and the same auth helpers (conflicts with `squid`).
command -v squid >/dev/null 2>&1 || need+=(squid-openssl)
# dante: the SOCKS5 proxy of the egress tests (with and without username/password).
command -v danted >/dev/null 2>&1 || need+=(dante-server)
# A real MIT KDC for Negotiate (Kerberos) through squid's negotiate_kerberos_auth.
[ -x /usr/sbin/krb5kdc ] || need+=(krb5-kdc)
[ -x /usr/sbin/kadmin.local ] || need+=(krb5-admin-server)
command -v kinit >/dev/null 2>&1 || need+=(krb5-user)
# The topology tests (four sites; two DMZ instances and two trusted sites): network namespaces, veth, nftables, ss.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ss >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || need+=(procps)
# A real browser for the agent's PAC file and status page (tests/tests/browser.rs); dpkg-deb
# for the package test.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v dpkg-deb >/dev/null 2>&1 || need+=(dpkg)
# systemd-analyze checks the generated user unit (tests/tests/service.rs).
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# nginx and HAProxy: real load balancers in front of the --plain gateway (tests/tests/lb.rs).
command -v nginx >/dev/null 2>&1 || need+=(nginx)
# iperf3 and nginx's stream module: the benchmark's smoke run at the end (bench/run.sh --smoke).
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
# promtool (Debian's prometheus package) checks the scraped /metrics and deploy/alerts.yml
# (tests/tests/ops.rs, which also installs it when run alone).
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# The Windows agent under Wine (tests/tests/windows.rs): Wine, the mingw-w64 C compiler (ring's C
# code, the ProcessPrng shim and the test client), and the rustup target below.
command -v wine >/dev/null 2>&1 || need+=(wine64 wine)
command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1 || need+=(gcc-mingw-w64-x86-64)
# The per-user MSI (scripts/package-msi.sh): wixl (msitools) and Authenticode signing.
command -v wixl >/dev/null 2>&1 || need+=(wixl)
command -v osslsigncode >/dev/null 2>&1 || need+=(osslsigncode)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  # The tests start their own KDC, squid, dante, nginx and HAProxy: keep the packages from starting system
  # services (and failing without an init system) while they install.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  [ -z "$policy" ] || $sudo rm -f "$policy"
fi

if ! rustup target list --installed | grep -qx x86_64-pc-windows-gnu; then
  rustup target add x86_64-pc-windows-gnu
fi

# The end-to-end tests run the real binaries from target/debug, which `cargo test --workspace`
# builds before it runs any test (agent/tests and gateway/tests need them): a separate
# `cargo build --bins` would build the whole tree a second time, without the dev-dependencies'
# features (tokio's test-util), only to have the test build replace it. The Windows tests run
# target/x86_64-pc-windows-gnu/debug/sallyport.exe under Wine (they build it too; building it
# here first shows its build time on its own line).
start=$(date +%s)
cargo build --target x86_64-pc-windows-gnu -p sallyport
echo "windows build: $(( $(date +%s) - start )) s"
cargo test --workspace

# The benchmark's smoke run on the debug binaries built above (both modes, one round of 1 s
# tests): its figures are printed, never asserted; it fails only when the benchmark itself is
# broken (a chain that does not start, a process left behind).
start=$(date +%s)
bench/run.sh --smoke
bench/run.sh --smoke --mode independent
echo "benchmark smoke: $(( $(date +%s) - start )) s"
