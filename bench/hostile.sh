#!/usr/bin/env bash
# Sallyport under attack, one command: installs curl when missing, builds the release binaries
# (the gateway, the agent, and the test programs sp-testsvc and sp-attack), runs
# bench/hostile.py. See docs/benchmarks.md, "Under attack".
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v curl >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq curl >/dev/null
fi
cargo build --release --bins
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 bench/hostile.py "$@"
