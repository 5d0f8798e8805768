#!/usr/bin/env bash
# The DMZ's CPU per agent handshake (TCP accept to session up: TLS 1.3, the v2 handshake, the
# tunnel hello), the figure the reconnect-storm arithmetic in docs/deploy.md rests on. On
# loopback, release binaries: a DMZ with its admin listener, then N agents (each its own token)
# started at once; the DMZ's own CPU time (utime + stime from /proc) from before the first agent
# until its metrics count N agent sessions, divided by N. Nothing asserts; it prints one line per
# round.
#
#   bench/handshake-cpu.sh [N [ROUNDS]]      # default 200 agents, 3 rounds
#   BIN=target/release bench/handshake-cpu.sh   # the binaries to use (built when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200}
ROUNDS=${2:-3}
BIN=${BIN:-target/release}
if [ ! -x "$BIN/sallyport-gateway" ] || [ ! -x "$BIN/sallyport" ]; then
  cargo build --release --bins
fi
BIN=$(cd "$BIN" && pwd)
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
cd "$WORK"
"$BIN/sallyport-gateway" cert --name 127.0.0.1 --out pki >/dev/null 2>&1
for i in $(seq 0 $((N - 1))); do
  "$BIN/sallyport-gateway" token new --kind agent --id "desk-$i" --name "user$i" \
    --tokens pki/agents.toml --out "pki/desk-$i.token" >/dev/null 2>&1
done
"$BIN/sallyport-gateway" token new --kind connector --id site-a --route '*.internal:*' \
  --tokens pki/connectors.toml --out pki/site-a.token >/dev/null 2>&1
# Limits out of the way: this measures the handshake, not the budget.
printf '[limits]\nhandshakes_per_ip = 100000.0\nhandshake_burst = 100000.0\nunauth_per_addr = 100000\n' >dmz.toml
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
tick=$(getconf CLK_TCK)
cpu_ms() { awk -v t="$tick" '{print ($14 + $15) * 1000 / t}' "/proc/$1/stat"; }
sessions() {
  curl -s --max-time 2 http://127.0.0.1:19090/metrics |
    awk '/^sallyport_sessions\{role="agent"\}/ {print $2}'
}
for r in $(seq 1 "$ROUNDS"); do
  "$BIN/sallyport-gateway" dmz -c dmz.toml --listen 127.0.0.1:18443 \
    --tls-cert pki/gateway.crt --tls-key pki/gateway.key --agent-tokens pki/agents.toml \
    --connector-tokens pki/connectors.toml --admin 127.0.0.1:19090 2>dmz.log &
  DMZ=$!
  PIDS+=("$DMZ")
  for _ in $(seq 100); do [ -n "$(sessions)" ] && break; sleep 0.1; done
  [ -n "$(sessions)" ] || { echo "the DMZ did not start:"; cat dmz.log; exit 1; }
  sleep 1
  c0=$(cpu_ms "$DMZ")
  t0=$(date +%s.%N)
  agents=()
  for i in $(seq 0 $((N - 1))); do
    mkdir -p "home/$i"
    HOME="$WORK/home/$i" "$BIN/sallyport" run --gateway wss://127.0.0.1:18443/ --proxy direct \
      --socks off --http off --token-file "pki/desk-$i.token" --ca pki/ca.crt 2>/dev/null &
    agents+=("$!")
    PIDS+=("$!")
  done
  for _ in $(seq 1200); do [ "$(sessions)" = "$N" ] && break; sleep 0.05; done
  t1=$(date +%s.%N)
  c1=$(cpu_ms "$DMZ")
  awk -v n="$N" -v r="$r" -v c0="$c0" -v c1="$c1" -v t0="$t0" -v t1="$t1" -v up="$(sessions)" \
    'BEGIN { printf "round %d: %d of %d agents up in %.1f s; DMZ CPU %.0f ms: %.2f ms per handshake\n", r, up, n, t1 - t0, c1 - c0, (c1 - c0) / n }'
  kill "${agents[@]}" 2>/dev/null || true
  wait "${agents[@]}" 2>/dev/null || true
  kill "$DMZ" 2>/dev/null || true
  wait "$DMZ" 2>/dev/null || true
done
