#!/usr/bin/env bash
# One command for the benchmark: installs iperf3 and nginx's stream module when missing,
# builds the release binaries, raises the open-file limit, runs bench/run.py.
#   bench/run.sh                     # interleaved rounds on long-lived processes (bench/run.py --help)
#   bench/run.sh --mode independent  # fresh processes per round, rotated order (bench/independent.py)
#   bench/run.sh --smoke             # CI: one round of 1 s tests on the debug binaries, figures printed
#   WSTUNNEL=/path/to/wstunnel bench/run.sh   # either mode: also the optional `wstunnel wss` row (a wstunnel
#                                    # binary built outside the tree: it is not on crates.io)
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian's nginx package starts a system nginx on port 80; the benchmark runs its own.
# --smoke (CI) measures the debug binaries the tests already built: no release build.
if [[ " $* " == *" --smoke "* ]]; then
  [ -x target/debug/sallyport ] && [ -x target/debug/sallyport-gateway ] || cargo build --bins
else
  cargo build --release --bins
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 bench/run.py "$@"
