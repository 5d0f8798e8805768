#!/usr/bin/env bash
# One command for the cluster figures: builds the release binaries, raises the open-file limit
# as far as this machine allows (bench/cluster.py raises it further as root and spreads the
# service side of the streams over enough connector processes when it cannot), runs
# bench/cluster.py with its arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 bench/cluster.py "$@"
