#!/usr/bin/env python3
"""A second harness for the transport claims of docs/benchmarks.md: bulk HTTP transfers with
curl (not iperf3), through the agent's static forward to a plain HTTP server (`sp-testsvc`),
for each protocol variant, in interleaved rounds; medians and per-round ratios against v1's
plain WebSocket. Download: `GET /bytes/N`; upload: `POST /sha256` of an N-byte file.

Usage (after `cargo build --release --bins`, which bench/run.sh does):
    python3 bench/transfer.py [--rounds 5] [--mib 512]

A failed sample is recorded as missing, never the end of the run; every process started is
ended on exit (bench/run.py's Proc bookkeeping).
"""

import argparse
import atexit
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: Proc, Sallyport, stop_all, med, free_port)

VARIANTS = [
    # name, agent args, agent config, token file
    ("v2 ws sealed", [], "[tunnel]\ninner = \"always\"\n", "agent.token"),
    ("v2 http stream sealed", ["--transport", "http"], "", "agent.token"),
]


def curl(args, timeout):
    try:
        out = subprocess.run(["curl", "-sS", "--max-time", str(timeout)] + args,
                             capture_output=True, text=True, timeout=timeout + 10)
        return float(out.stdout.strip()) * 8 / 1e9 if out.returncode == 0 else float("nan")
    except (subprocess.TimeoutExpired, ValueError):
        return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=512, help="bytes per transfer, MiB")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="sallyport-transfer-")
    svc = bench.Proc("sp-testsvc", [str(bench.REL / "sp-testsvc"), "http", "127.0.0.1:0"], tmp)
    port = int(svc.wait_for(r"listening addr=127\.0\.0\.1:(\d+)").group(1))
    echo = bench.free_port()
    # The "iperf" forward of the main agent points at the HTTP service here.
    sp = bench.Sallyport(tmp, port, echo, echo)
    # variant() forwards to the chain's "iperf" port, which is the HTTP service here.
    chains = {"direct": port, "v2 outer (default)": sp.fwd_iperf}
    _, chains["v1 ws (bearer)"], _ = sp.variant("v1-ws", [], "", "agent-v1.token")
    for name, args, conf, token in VARIANTS:
        _, chains[name], _ = sp.variant(name.replace(" ", "-"), args, conf, token)
    n = a.mib * 1024 * 1024
    up_file = Path(tmp) / "up.bin"
    with open(up_file, "wb") as f:
        chunk = bytes(range(256)) * 4096
        for _ in range(n // len(chunk)):
            f.write(chunk)
    res = {c: {"down": [], "up": []} for c in chains}
    print(f"{a.rounds} interleaved rounds of {a.mib} MiB each way...", file=sys.stderr)
    for r in range(a.rounds):
        for name, p in chains.items():
            res[name]["down"].append(curl(["-o", "/dev/null", "-w", "%{speed_download}",
                                           f"http://127.0.0.1:{p}/bytes/{n}"], 120))
            res[name]["up"].append(curl(["-o", "/dev/null", "-w", "%{speed_upload}", "-H", "Expect:",
                                         "--data-binary", f"@{up_file}", f"http://127.0.0.1:{p}/sha256"], 120))
        print(f"  round {r + 1}: " + ", ".join(f"{k} {res[k]['down'][-1]:.2f}/{res[k]['up'][-1]:.2f}" for k in chains),
              file=sys.stderr)
    base = res["v1 ws (bearer)"]
    lines = [f"curl through the agent's static forward, {a.mib} MiB per transfer, {a.rounds} interleaved rounds, medians (Gbit/s);"
             " ratios vs v1 plain WebSocket (ratio of medians; per-round min–max)", "",
             "| chain | down | up | down vs v1 ws | up vs v1 ws |", "|---|---:|---:|---:|---:|"]
    for name, r in res.items():
        def ratio(k):
            per = [x / y for x, y in zip(r[k], base[k]) if x == x and y == y and y]
            span = f" ({min(per):.2f}–{max(per):.2f})" if per else ""
            return f"{bench.med(r[k]) / bench.med(base[k]):.2f}×{span}"
        lines.append(f"| {name} | {bench.med(r['down']):.2f} | {bench.med(r['up']):.2f} | {ratio('down')} | {ratio('up')} |")
    print("\n".join(lines))
    up_file.unlink()


if __name__ == "__main__":
    atexit.register(bench.stop_all)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    main()
