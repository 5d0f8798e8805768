#!/usr/bin/env bash
# Builds a .deb of the agent: /usr/bin/sallyport and a systemd user unit
# (/usr/lib/systemd/user/sallyport.service; enable it for everyone with
# `systemctl --global enable sallyport.service`, or per user with `sallyport service install`).
#
#   scripts/package-deb.sh [--profile dist|release|dev] [--bin PATH] [--out DIR]
#
# --bin packages an agent already built instead of building one (the tests pass the one the
# workspace's test build made; `-p sallyport` resolves the dependencies' features apart from the
# workspace's and rebuilt ~70 s of them in CI).
#
# Needs dpkg-deb (Debian's dpkg). Prints the path of the .deb.
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."
profile=dist
out=target/deb
bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    *) echo "usage: $0 [--profile dist|release|dev] [--bin PATH] [--out DIR]" >&2; exit 64 ;;
  esac
done
case "$bin" in /* | "") ;; *) bin="$here/$bin" ;; esac
if [ -z "$bin" ]; then
  cargo build --profile "$profile" -p sallyport >&2
  dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
  bin="${CARGO_TARGET_DIR:-target}/$dir/sallyport"
fi
[ -x "$bin" ] || { echo "$0: no agent at $bin (build it, or give --bin PATH)" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
install -D -m 0755 "$bin" "$stage/usr/bin/sallyport"
mkdir -p "$stage/usr/lib/systemd/user"
"$bin" service unit --exe /usr/bin/sallyport > "$stage/usr/lib/systemd/user/sallyport.service"
install -D -m 0644 README.md "$stage/usr/share/doc/sallyport/README.md"
install -D -m 0644 docs/install.md "$stage/usr/share/doc/sallyport/install.md"
install -D -m 0644 examples/agent.toml "$stage/usr/share/doc/sallyport/examples/agent.toml"
size=$(du -k -s "$stage/usr" | cut -f1)
mkdir -p "$stage/DEBIAN"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: sallyport
Version: $version
Architecture: $arch
Maintainer: Sallyport <sallyport@example.com>
Installed-Size: $size
Depends: libc6
Recommends: libgssapi-krb5-2
Suggests: libsecret-tools
Section: net
Priority: optional
Description: Sallyport agent: reach services inside a trusted network
 Local SOCKS5 and HTTP proxy ports and static forwards, tunnelled over
 WebSocket-over-TLS through whatever the corporate network offers (HTTP
 proxies with Basic/Digest/NTLM/Negotiate, SOCKS5, PAC/WPAD) to a DMZ gateway.
CONTROL
mkdir -p "$out"
deb="$out/sallyport_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$stage" "$deb" >&2
echo "$deb"
