#!/usr/bin/env bash
# Proves the benchmark's two promises on a smoke run (debug binaries, ~2 min in all):
#   1. a failed iperf3 test is retried once, then shows as `failed` in the table, and the run goes on;
#   2. no process it started (DMZ, connector, agent, nginx, iperf3, echo server, wstunnel) outlives it:
#      after a normal end, an exception, SIGTERM, Ctrl-C (SIGINT) in the middle of an iperf3 test,
#      and even kill -9 of the benchmark.
# Every child carries SALLYPORT_BENCH_MARK in its environment; this script sets the mark, then looks
# for it in /proc/*/environ (all processes) and with `pgrep -f` (the run's temporary folder is on
# the command line of every Sallyport and nginx process) once the run is over.
#   bench/selfcheck.sh [extra run.py arguments, e.g. --mode independent]
# With WSTUNNEL set, wstunnel's processes (either mode) are part of the check.
set -uo pipefail
cd "$(dirname "$0")/.."
fail=0
left() {
  local mark=$1 pids=() f
  for f in /proc/[0-9]*/environ; do
    if { tr "\0" "\n" <"$f"; } 2>/dev/null | grep -qx "SALLYPORT_BENCH_MARK=$mark"; then
      pids+=("$(basename "$(dirname "$f")")")
    fi
  done
  pids+=($(pgrep -f "sallyport-bench-$mark" || true))
  echo "${pids[@]:-}"
}
check() {  # name, mark, expected exit ("0" or "nonzero"), exit code
  local name=$1 mark=$2 want=$3 code=$4 l
  sleep 0.2
  l=$(left "$mark")
  if grep -q "processes left behind" "$log"; then
    echo "FAIL $name: $(grep "processes left behind" "$log")"; fail=1
  elif [ -n "$l" ]; then
    echo "FAIL $name: left behind: $l"; ps -o pid,args -p "${l// /,}" || true; kill -9 $l 2>/dev/null; fail=1
  elif [ "$want" = 0 ] && [ "$code" != 0 ]; then
    echo "FAIL $name: exit $code"; fail=1
  elif [ "$want" = nonzero ] && [ "$code" = 0 ]; then
    echo "FAIL $name: exit 0"; fail=1
  else
    echo "ok   $name: exit $code, nothing left behind"
  fi
}
log=$(mktemp)
run() {  # mark, break, then run.py arguments; in the background, pid in $pid
  local mark=$1 brk=$2; shift 2
  SALLYPORT_BENCH_MARK=$mark BENCH_BREAK=$brk python3 bench/run.py --smoke --out "$log.md" "$@" >"$log" 2>&1 &
  pid=$!
}
wait_line() {  # pattern: until the run's output has it (60 s at most)
  for _ in $(seq 600); do grep -q "$1" "$log" && return 0; sleep 0.1; done
  echo "never saw: $1"; tail -20 "$log"; return 1
}

m=sc-iperf-$$; run "$m" iperf "$@"; wait "$pid"; code=$?
if grep -q "failed (attempt 2 of 2)" "$log" && grep -q "failed" "$log.md"; then
  echo "ok   failed iperf3: retried once, a 'failed' cell, the run went on"
else echo "FAIL failed iperf3: no retry or no 'failed' cell"; tail -30 "$log"; fail=1; fi
check "failed iperf3" "$m" 0 "$code"

m=sc-raise-$$; run "$m" raise "$@"; wait "$pid"; code=$?
grep -q "deliberately broken step" "$log" || { echo "FAIL exception: not raised"; tail -20 "$log"; fail=1; }
check "exception" "$m" nonzero "$code"

m=sc-term-$$; run "$m" hang "$@"; wait_line "waiting for a signal" && kill -TERM "$pid"; wait "$pid"; code=$?
check "SIGTERM" "$m" nonzero "$code"

m=sc-int-$$; run "$m" "" "$@"; wait_line "rounds of" && sleep 1.5 && kill -INT "$pid"; wait "$pid"; code=$?
check "Ctrl-C during iperf3" "$m" nonzero "$code"

# kill -9 runs no cleanup: its children die with it (PR_SET_PDEATHSIG), nginx's workers with their master.
m=sc-kill9-$$; run "$m" hang "$@"; wait_line "waiting for a signal" && kill -KILL "$pid"; wait "$pid"; code=$?
sleep 1
check "kill -9" "$m" nonzero "$code"

# The negative control: a process the registry does not know is found, named, and fails the run.
m=sc-leak-$$; run "$m" leak "$@"; wait "$pid"; code=$?
if [ "$code" = 1 ] && grep -q "processes left behind" "$log" && [ -z "$(left "$m")" ]; then
  echo "ok   negative control: an unregistered process is named, killed, exit 1"
else echo "FAIL negative control: exit $code"; tail -5 "$log"; fail=1; fi

[ "${KEEP_LOG:-}" ] && echo "last log: $log" || rm -f "$log" "$log.md"
exit $fail
