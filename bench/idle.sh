#!/usr/bin/env bash
# Idle desktops per DMZ instance, one command: builds the release binaries (the gateway, the
# light session client sp-idle, the echo service sp-testsvc), raises the open-file limit and
# runs bench/idle.py.
# See docs/benchmarks.md, "Idle sessions".
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p sallyport-gateway -p sallyport-e2e --bin sallyport-gateway --bin sp-idle --bin sp-testsvc
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 bench/idle.py "$@"
