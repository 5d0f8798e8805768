#!/usr/bin/env python3
"""Where one Sallyport process spends its CPU during a single-stream iperf3 transfer through the
three-process chain (`--threads 1` each): `perf record -g` of that process, then its self time
grouped into what bounds throughput (crypto, copies, the kernel's TCP and syscalls, WebSocket
framing and masking, the tokio scheduler, allocation).

    python3 bench/profile.py --bin-dir DIR [--role dmz|agent|connector] [--reverse] [--seconds 10]

DIR holds binaries with symbols (the release profile strips them): `cargo build --profile
profiling --bins` (target/profiling); with RUSTFLAGS="-C force-frame-pointers=yes" in a separate
CARGO_TARGET_DIR, the call graphs (-g) are whole as well.
PERF_CALLGRAPH="--call-graph dwarf,16384" records whole call graphs without frame pointers (then
`perf report -i OUT -g caller` shows who calls each copy).
Needs `perf` (Debian: linux-perf). Prints the grouped table and the top symbols.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402

# First match wins: (group, regular expression on the symbol). The scheduler comes before TCP/IP
# (`finish_task_switch` holds `sk_`).
GROUPS = [
    ("crypto (AES-GCM, GHASH, ChaCha: ring / aws-lc)", r"aes|gcm|ghash|gfmul|chacha|poly1305|ring_core|aws_lc|ecp_nistz|x25519|sha"),
    ("WebSocket framing and masking", r"mask|websocket|tungstenite|frame"),
    ("memcpy / memmove (user space)", r"memcpy|memmove|memset"),
    ("kernel: copy to/from user", r"copy_user|copy_to_user|copy_from_user|_copy_to_iter|_copy_from_iter|rep_movs"),
    ("kernel: epoll, futex, scheduler, syscall entry", r"epoll|futex|schedule|switch_to|task_switch|entry_SYSCALL|syscall|pick_next|enqueue|dequeue|try_to_wake|__x64_sys|do_syscall"),
    ("kernel: TCP/IP, loopback, softirq", r"softirq|tcp_|ip_|skb|__dev_queue|net_rx|loopback|napi|sock_|inet_|__netif|process_backlog|sk_"),
    ("tokio runtime and wakers", r"tokio|mio|waker|wake_by"),
    ("kernel: page faults", r"page_fault|handle_mm_fault|clear_page"),
    ("allocation", r"malloc|free|alloc|realloc|cfree|_int_"),
    ("rustls record layer", r"rustls"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", required=True, help="Sallyport binaries with symbols")
    ap.add_argument("--role", choices=["dmz", "agent", "connector"], default="dmz")
    ap.add_argument("--reverse", action="store_true", help="download (iperf3 -R) instead of upload")
    ap.add_argument("--parallel", type=int, default=1, help="streams (iperf3 -P)")
    ap.add_argument("--seconds", type=int, default=10, help="of perf recording (iperf3 runs 4 s longer)")
    ap.add_argument("--out", help="keep perf.data here")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    bench.BIN = Path(a.bin_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"sallyport-bench-{bench.MARK}-"))
    iperf_port, echo_port = bench.free_port(), bench.free_port()
    srv = bench.Proc("iperf3", ["iperf3", "-s", "-p", str(iperf_port), "-B", "127.0.0.1"], tmp)
    bench.wait_listening(iperf_port, srv)
    sp = bench.Sallyport(tmp, iperf_port, echo_port, echo_port, threads=1)
    role = {"dmz": sp.dmz, "agent": sp.agent, "connector": sp.connector}[a.role]
    result = {}
    t = threading.Thread(target=lambda: result.update(
        gbps=bench.iperf(sp.fwd_iperf, a.seconds + 4, reverse=a.reverse, parallel=a.parallel)[0]))
    t.start()
    data = a.out or str(tmp / "perf.data")
    code, _ = bench.Child(["perf", "record", *os.environ.get("PERF_CALLGRAPH", "-g").split(), "-o", data, "-p", str(role.p.pid), "--", "sleep", str(a.seconds)],
                          timeout=a.seconds + 30).run()
    t.join()
    if code != 0:
        sys.exit(f"perf record failed (exit {code}); is linux-perf installed?")
    rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "--stdio", "-q", "-g", "none",
                          "--percent-limit", "0.05"], capture_output=True, text=True).stdout
    rows = []
    for line in rep.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*)", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3).strip()))
    groups = {g: 0.0 for g, _ in GROUPS}
    for pct, dso, sym in rows:
        for g, rx in GROUPS:
            if re.search(rx, sym, re.I):
                groups[g] += pct
                break
        else:
            rest = "kernel: other (mostly irq-restore points)" if dso == "[kernel.kallsyms]" else "other (user space)"
            groups[rest] = groups.get(rest, 0.0) + pct
    print(f"{a.role}, {'single stream' if a.parallel == 1 else f'{a.parallel} streams'} {'download' if a.reverse else 'upload'}, --threads 1, {bench.fmt(result.get('gbps'))} Gbit/s "
          f"while recorded; self time of its samples by group:\n")
    print("| group | % of the process's samples |\n|---|---:|")
    for g, pct in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {pct:.1f} |")
    print(f"\n| top symbols (self) | % | object |\n|---|---:|---|")
    for pct, dso, sym in rows[:a.top]:
        print(f"| `{sym[:90]}` | {pct:.2f} | {dso} |")


if __name__ == "__main__":
    bench.run_guarded(main)
