#!/usr/bin/env bash
# Streams that survive their session (issue 17), one command: builds the release binaries and
# runs bench/resume.py (session loss to resumed data; memory and throughput, resume on vs off).
# See docs/benchmarks.md, "Streams that survive their session".
set -euo pipefail
cd "$(dirname "$0")/.."
command -v iperf3 >/dev/null || apt-get install -y iperf3
cargo build --release --bins
exec python3 bench/resume.py "$@"
