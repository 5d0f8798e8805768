#!/usr/bin/env bash
# CI: the fuzz targets of fuzz/ (see docs/fuzzing.md). Installs cargo-fuzz (from crates.io) and
# a C++ compiler (for libFuzzer) when missing, builds every target once, replays every committed
# regression and seed input, then fuzzes every target for an equal share of FUZZ_SECONDS
# (default 180). Fails on any crash, timeout or leak, naming the target and the saved input;
# never skips a target.
#
# Knobs (environment): FUZZ_SECONDS (total fuzzing time, default 180), FUZZ_CORPUS (where the
# corpora grow, default fuzz/corpus; keep it between runs to start from what was found),
# FUZZ_TARGET_DIR (cargo's target dir, default fuzz/target), FUZZ_BUILD (`quick`, the default:
# unoptimised and without AddressSanitizer, which builds all targets in ~3 min instead of ~14 on
# two cores and still fuzzes at thousands to tens of thousands of runs a second; `full`:
# optimised with AddressSanitizer, as the campaign in docs/fuzzing.md runs).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export CARGO_TERM_COLOR=never
# cargo-fuzz needs a few -Z flags (sanitizer, coverage); stable rustc accepts them with this.
export RUSTC_BOOTSTRAP=1
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

total=${FUZZ_SECONDS:-180}
corpus=${FUZZ_CORPUS:-$root/fuzz/corpus}
target_dir=${FUZZ_TARGET_DIR:-$root/fuzz/target}
t0=$SECONDS
phase() { echo "fuzz-ci: $1 ($((SECONDS - t0)) s so far)"; }

# --- install ------------------------------------------------------------------------------
# libfuzzer-sys compiles libFuzzer's C++ sources with the system C++ compiler.
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: g++"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq g++ >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing: cargo-fuzz (crates.io)"
  cargo install cargo-fuzz --locked
fi
cargo fuzz --version
phase "tools ready"

# --- build (one cargo invocation for all targets) ------------------------------------------
cd "$root/fuzz"
host=$(rustc -vV | sed -n 's/^host: //p')
case "${FUZZ_BUILD:-quick}" in
  quick)
    cargo fuzz build --dev --sanitizer none --target-dir "$target_dir"
    bin_dir="$target_dir/$host/debug"
    ;;
  full)
    cargo fuzz build --target-dir "$target_dir"
    bin_dir="$target_dir/$host/release"
    ;;
  *) echo "fuzz-ci: FAIL: FUZZ_BUILD is quick or full, not ${FUZZ_BUILD}" >&2; exit 1 ;;
esac
mapfile -t targets < <(cargo fuzz list)
[ ${#targets[@]} -gt 0 ] || { echo "fuzz-ci: FAIL: cargo fuzz list names no target" >&2; exit 1; }
for t in "${targets[@]}"; do
  [ -x "$bin_dir/$t" ] || { echo "fuzz-ci: FAIL: no binary $bin_dir/$t after the build" >&2; exit 1; }
  # Every target starts from committed seeds: a missing seeds folder is a mistake, not a skip.
  [ -n "$(find "seeds/$t" -maxdepth 1 -type f 2>/dev/null | head -1)" ] ||
    { echo "fuzz-ci: FAIL: fuzz/seeds/$t/ is missing or empty" >&2; exit 1; }
done
phase "built ${#targets[@]} targets"

# Extra libFuzzer options per target (see docs/fuzzing.md).
extra() {
  case "$1" in
    http_head) echo "-max_len=20000" ;;
  esac
}

failed=()

# --- replay --------------------------------------------------------------------------------
# Each file given on the command line runs once; any failure fails the step.
for t in "${targets[@]}"; do
  inputs=()
  for d in "regressions/$t" "seeds/$t"; do
    [ -d "$d" ] || continue
    while IFS= read -r -d '' f; do inputs+=("$f"); done < <(find "$d" -maxdepth 1 -type f -print0)
  done
  mkdir -p "artifacts/$t"
  if ! "$bin_dir/$t" -artifact_prefix="artifacts/$t/" -timeout=10 "${inputs[@]}" \
    >"artifacts/$t/replay.log" 2>&1; then
    tail -n 40 "artifacts/$t/replay.log" >&2
    echo "fuzz-ci: FAIL: $t: a committed input fails (log: fuzz/artifacts/$t/replay.log)" >&2
    failed+=("$t (replay)")
  else
    echo "fuzz-ci: $t: replayed ${#inputs[@]} inputs"
  fi
done
phase "replayed regressions and seeds"

# --- fuzz ----------------------------------------------------------------------------------
each=$((total / ${#targets[@]}))
[ "$each" -ge 1 ] || each=1
echo "fuzz-ci: fuzzing ${#targets[@]} targets for $each s each"
for t in "${targets[@]}"; do
  mkdir -p "$corpus/$t" "artifacts/$t"
  # shellcheck disable=SC2046
  if ! "$bin_dir/$t" "$corpus/$t" "seeds/$t" -max_total_time="$each" -timeout=10 \
    -print_final_stats=1 -artifact_prefix="artifacts/$t/" $(extra "$t") \
    >"artifacts/$t/fuzz.log" 2>&1; then
    tail -n 60 "artifacts/$t/fuzz.log" >&2
    echo "fuzz-ci: FAIL: $t crashed; input saved as:" >&2
    grep -h 'Test unit written to' "artifacts/$t/fuzz.log" >&2 || true
    failed+=("$t")
  else
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "artifacts/$t/fuzz.log")
    echo "fuzz-ci: $t: ${runs:-?} executions, no failure"
  fi
done
phase "fuzzed"

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz-ci: FAILED: ${failed[*]}" >&2
  echo "fuzz-ci: reproduce with: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --target-dir target <target> <input>" >&2
  exit 1
fi
echo "fuzz-ci: all ${#targets[@]} targets passed ($((SECONDS - t0)) s)"
