#!/usr/bin/env bash
# Runs every test of the workspace: installs the tools the end-to-end tests drive (curl,
# OpenSSH client and server, setpriv, squid) when missing, builds the binaries, runs unit and
# end-to-end tests. Tests never skip for a missing tool: they fail naming it.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# squid-openssl: squid with TLS inspection and the same auth helpers (conflicts with `squid`).
command -v squid >/dev/null 2>&1 || need+=(squid-openssl)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The end-to-end tests run the real binaries from target/debug.
cargo build --bins
cargo test --workspace
