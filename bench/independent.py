#!/usr/bin/env python3
"""The independent harness of issue 21 (`bench/run.sh --mode independent`): fresh processes for
every peer in every round, the peer order rotated each round, one worker per process.

    bench/run.sh --mode independent                 # 5 rounds of 5 s tests, release build
    WSTUNNEL=/path/to/wstunnel bench/run.sh --mode independent   # with the wstunnel row
    python3 bench/run.py --mode independent --help  # every knob

Peers, each in the same three-process shape where it has one:
  direct                      iperf3 / the echo client straight to the server
  sallyport                   client -> agent (forward / SOCKS5) -> DMZ (TLS) <- connector (TLS,
                              dialled out) -> server; `--threads 1` for all three
  sallyport default threads   the same, the DMZ and the connector on their default thread count
                              (half the cores), the agent on its default (one)
  nginx chain                 three nginx `stream` processes, plain -> TLS -> TLS -> plain,
                              `worker_processes 1; master_process off` each
  wstunnel wss                (when WSTUNNEL is set) client -> wstunnel client (-L) -> wstunnel
                              server (wss) <- wstunnel client (-R, dialled out) -> server; one
                              tokio worker each (TOKIO_WORKER_THREADS, --wstunnel-threads)

Per round and peer: iperf3 upload, download (-R) and 8 streams (-P 8), each --seconds; CPU
(user+system of the chain's processes) per GB during the upload; peak resident memory of the
chain; new connection (connect + 1-byte echo + close, --latency-n times) through the forward and,
for Sallyport, through SOCKS5, in batches alternating with as many straight to the echo server
(the reference of its ratio, taken beside it), with the chain's CPU per connection (through the
forward); CPU
per keystroke at rest (--keys 1-byte echoes 10 ms apart on one connection); an interactive
1-byte echo every 10 ms on its own connection through the same chain during the reverse test (latency under load: median and p99); cold start (a fresh agent / wstunnel client process started, to
the first byte echoed through its forward: process start, TCP, TLS, upgrade, handshake, hello,
first open). Every ratio is taken within a round, then the median and the per-round values are
printed side by side. A failed measurement is a `failed` cell; the run goes on.
"""

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: processes, chains, iperf3, latency)

METRICS = [("up", "single stream up, Gbit/s"), ("down", "single stream reverse (-R), Gbit/s"),
           ("p8", "8 streams (-P 8), Gbit/s"), ("cpu_gb", "CPU s per GB, all processes of the chain (lower is better)")]


class Direct:
    name = "direct"

    def __init__(self, tmp, iperf_port, echo_port):
        self.port, self.echo, self.socks, self.procs = iperf_port, echo_port, None, []

    def stop(self):
        pass


class SallyportPeer:
    def __init__(self, tmp, iperf_port, echo_port, threads):
        self.sp = bench.Sallyport(tmp, iperf_port, echo_port, echo_port, threads=threads)
        self.port, self.echo, self.socks, self.procs = self.sp.fwd_iperf, self.sp.fwd_echo, self.sp.socks, self.sp.procs
        self.tmp, self.echo_target = Path(tmp), echo_port

    def cold_start(self):
        """A second agent process: its start to the first byte echoed through its forward."""
        fwd = bench.free_port()
        t = self.tmp
        t0 = time.perf_counter()
        a = bench.Proc(f"cold-agent-{time.monotonic_ns()}", [
            str(self.sp.agent_bin), "--threads", "1", "run", "--gateway", self.sp.url, "--token-file", str(t / "agent.token"),
            "--ca", str(t / "ca.crt"), "--socks", "off", "--http", "off",
            "--forward", f"127.0.0.1:{fwd}=127.0.0.1:{self.echo_target}", "--log", "warn"], t, env={"HOME": str(t)})
        try:
            return bench.first_echo(fwd, t0, a)
        finally:
            a.stop()

    def stop(self):
        self.sp.stop()


class NginxPeer:
    def __init__(self, tmp, iperf_port, echo_port):
        self.chain = bench.NginxChain(tmp, [iperf_port, echo_port], master=False)
        self.port, self.echo = self.chain.ports
        self.socks, self.procs = None, self.chain.procs

    def stop(self):
        self.chain.stop()


def echo_under_load(port, stop, out, n=None):
    """1-byte echoes every 10 ms on one connection until `stop` (or `n` of them): round trips in
    ms into `out`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not stop.is_set() and (n is None or len(out) < n):
                t0 = time.perf_counter()
                s.sendall(b"x")
                if s.recv(1) != b"x":
                    break
                out.append((time.perf_counter() - t0) * 1000)
                stop.wait(0.01)
    except OSError as e:
        print(f"  echo under load through port {port} failed: {e!r}", file=sys.stderr)


def keystrokes(port, n):
    """`n` 1-byte echoes 10 ms apart on one connection, nothing else running (an idle shell):
    True when all came back."""
    rtts = []
    echo_under_load(port, threading.Event(), rtts, n)
    return len(rtts) == n


def cpu_per(peer, n, run):
    """Runs `run()` (n units) and returns (CPU µs of the chain's processes per unit, what
    `run()` returned); the first is None when `run()` returned a false value (it failed) or
    the peer has no processes of its own."""
    c0 = sum(p.cpu_ns() for p in peer.procs)
    result = run()
    c1 = sum(p.cpu_ns() for p in peer.procs)
    return ((c1 - c0) / n / 1000 if peer.procs and result and c1 > c0 else None), result


BATCHES = 8


def new_connections(port, echo_port, n, socks_target=None, batches=None):
    """n new connections through `port` in BATCHES batches, each after as many straight to the
    echo server (`echo_port`): (median ms through the peer, median ms direct), None where one
    failed. The direct figure taken beside the peer's is its reference: over the minutes between
    two peers of a round the machine drifts by up to ±30 % (seen: the direct peer's own figure
    went from 0.16 to 0.59 ms between rounds), which a reference taken minutes apart puts into
    the ratio. `batches`, a list: each batch's (direct median, peer median) is appended to it,
    for the raw results (independent.json)."""
    per = max(1, n // BATCHES)
    ours, direct = [], []
    for _ in range(BATCHES):
        d = bench.latency_times(echo_port, per)
        o = bench.latency_times(port, per, socks_target)
        if d is None or o is None:
            return (None if o is None else bench.med(ours + o)), (None if d is None else bench.med(direct + d))
        if batches is not None:
            batches.append((round(bench.med(d), 4), round(bench.med(o), 4)))
        direct += d
        ours += o
    return bench.med(ours), bench.med(direct)


def measure(peer, a, echo_port):
    """One peer's figures in one round (None for what failed)."""
    out = {}
    c0 = sum(p.cpu() for p in peer.procs)
    out["up"], nbytes = bench.iperf(peer.port, a.seconds)
    c1 = sum(p.cpu() for p in peer.procs)
    out["cpu_gb"] = (c1 - c0) / (nbytes / 1e9) if peer.procs and nbytes else None
    # Interactive echo on its own connection through the same chain while the reverse test runs.
    stop, pings = threading.Event(), []
    t = threading.Thread(target=echo_under_load, args=(peer.echo, stop, pings))
    t.start()
    try:
        out["down"] = bench.iperf(peer.port, a.seconds, reverse=True)[0]
    finally:
        stop.set()
        t.join()
    pings.sort()
    out["ping"] = bench.med(pings) if pings else None
    out["ping99"] = pings[min(len(pings) - 1, int(len(pings) * 0.99))] if pings else None
    out["p8"] = bench.iperf(peer.port, a.seconds, parallel=8)[0]
    out["mem"] = sum(p.hwm_mib() for p in peer.procs) if peer.procs else None
    # The chain's CPU over the interleaved run is the peer's connections' (the direct ones do
    # not touch it).
    out["conn_batches"], out["socks_batches"] = [], []
    out["conn_cpu"], (out["conn"], out["conn_ref"]) = cpu_per(
        peer, a.latency_n, lambda: new_connections(peer.echo, echo_port, a.latency_n, batches=out["conn_batches"]))
    if out["conn"] is None:
        out["conn_cpu"] = None
    if peer.socks:
        out["socks"], out["socks_ref"] = new_connections(peer.socks, echo_port, a.latency_n, batches=out["socks_batches"],
                                                         socks_target=("127.0.0.1", peer.echo_target))
    if hasattr(peer, "cold_start"):
        out["cold"] = bench.med([peer.cold_start() for _ in range(a.cold_n)])
    # Last, so that the figures above are taken in the same order as in earlier runs.
    out["key_cpu"], _ = cpu_per(peer, a.keys, lambda: keystrokes(peer.echo, a.keys))
    return out


def main(argv):
    ap = argparse.ArgumentParser(prog="bench/run.sh --mode independent", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--latency-n", type=int, default=200, help="new connections per path and round")
    ap.add_argument("--keys", type=int, default=200, help="1-byte echoes 10 ms apart at rest, per round (CPU per keystroke)")
    ap.add_argument("--cold-n", type=int, default=3, help="cold starts per peer and round")
    ap.add_argument("--wstunnel-threads", type=int, default=1, help="TOKIO_WORKER_THREADS for wstunnel (0: its default)")
    ap.add_argument("--smoke", action="store_true", help="one round of 1 s tests, small counts, the debug binaries")
    ap.add_argument("--bin-dir", help="the Sallyport binaries (default target/release; target/debug with --smoke)")
    ap.add_argument("--out", default=str(bench.ROOT / "bench" / "results" / "independent.md"))
    a = ap.parse_args(argv)
    if a.smoke:
        a.rounds, a.seconds, a.latency_n, a.cold_n, a.keys = 1, 1, 20, 1, 20
        if a.out == ap.get_default("out"):
            a.out = str(bench.ROOT / "target" / "bench-smoke-independent.md")
    bench.BIN = Path(a.bin_dir) if a.bin_dir else (bench.ROOT / "target" / ("debug" if a.smoke else "release"))
    wst = os.environ.get("WSTUNNEL")
    a.load_start = os.getloadavg()[0]

    peers = ["direct", "sallyport", "sallyport default threads", "nginx chain"] + (["wstunnel wss"] if wst else [])
    res = {p: [] for p in peers}
    tmp = Path(tempfile.mkdtemp(prefix=f"sallyport-bench-{bench.MARK}-"))
    print(f"independent harness: {a.rounds} rounds of {a.seconds} s tests, peers {', '.join(peers)}", file=sys.stderr)
    rounds = []
    for rnd in range(a.rounds):
        order = bench.rotated(peers, rnd)
        rounds.append({"order": order, "start_utc": time.strftime("%H:%M:%S", time.gmtime())})
        rt = tmp / f"round{rnd + 1}"
        rt.mkdir()
        iperf_port, echo_port = bench.free_port(), bench.free_port()
        iperf_srv = bench.Proc("iperf3", ["iperf3", "-s", "-p", str(iperf_port), "-B", "127.0.0.1"], rt)
        echo = bench.Proc("echo", [sys.executable, str(bench.ROOT / "bench" / "run.py"), "--echo-server", str(echo_port)], rt)
        bench.wait_listening(iperf_port, iperf_srv)
        bench.wait_listening(echo_port, echo)
        for name in order:
            pt = rt / name.replace(" ", "-")
            pt.mkdir()
            peer = None
            try:
                if name == "direct":
                    peer = Direct(pt, iperf_port, echo_port)
                elif name == "sallyport":
                    peer = SallyportPeer(pt, iperf_port, echo_port, threads=1)
                elif name == "sallyport default threads":
                    peer = SallyportPeer(pt, iperf_port, echo_port, threads=None)
                elif name == "nginx chain":
                    peer = NginxPeer(pt, iperf_port, echo_port)
                else:
                    peer = bench.WstunnelPeer(pt, wst, iperf_port, echo_port, a.wstunnel_threads)
                if name == order[-1]:
                    bench.broken_step()
                if bench.BREAK == "iperf" and name == "nginx chain":
                    peer.port = bench.free_port()
                figures = measure(peer, a, echo_port)
            except Exception as e:  # a peer that does not start is a failed round for it, not the end of the run
                print(f"  round {rnd + 1}: {name} failed: {e}", file=sys.stderr)
                figures = {}
            finally:
                if peer:
                    peer.stop()
            res[name].append(figures)
        iperf_srv.stop()
        echo.stop()
        print(f"  round {rnd + 1} ({', '.join(order)}): up " + ", ".join(f"{n} {bench.fmt(res[n][-1].get('up'))}" for n in peers),
              file=sys.stderr)
    a.load_end = os.getloadavg()[0]
    bench.write_table(table(res, peers, a, wst), a.out)
    # The raw figures beside the table: every peer's per-round values, with each new-connection
    # batch's medians (direct, peer) and the round's order and start time, to look into a round
    # that stands out.
    raw = Path(a.out).with_suffix(".json")
    raw.write_text(json.dumps({"rounds": rounds, "results": res}, indent=1) + "\n")
    print(f"raw figures in {raw}", file=sys.stderr)


def series(res, peer, key):
    return [r.get(key) for r in res[peer]]


def commit():
    """The commit measured (with `+changes` when the work tree differs from it)."""
    try:
        head = subprocess.run(["git", "-C", str(bench.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(bench.ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except OSError:
        return "unknown"


def shown(path):
    """`path` relative to the repository when it is inside (the table names no machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(bench.ROOT))
    except ValueError:
        return str(path)


def table(res, peers, a, wst):
    f, med = bench.fmt, bench.med
    lines = [f"Commit {commit()}. Machine: {os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}, "
             f"load average {a.load_start:.1f} at the start, {a.load_end:.1f} at the end; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {a.rounds} rounds of {a.seconds} s, fresh processes per "
             f"round, peer order rotated; binaries {shown(bench.BIN)}"
             + (f"; {bench.version(wst)}, {a.wstunnel_threads or 'default'} worker(s)" if wst else ""),
             ""]
    targets = []
    ng = "nginx chain"
    for key, title in METRICS:
        lines.append(f"| {title} | median | × nginx chain (median of per-round) | per round × nginx chain | worst round |")
        lines.append("|---|---:|---:|---:|---:|")
        for p in peers:
            xs = series(res, p, key)
            if key == "cpu_gb" and p == "direct":
                continue
            text, rs = bench.per_round(xs, series(res, ng, key))
            ok = [r for r in rs if r is not None]
            worst = (max(ok) if key == "cpu_gb" else min(ok)) if ok else None
            lines.append(f"| {p} | {f(med(xs))}{bench.failures(xs)} | {f(med(rs))}× | {text} | {f(worst)}× |")
            if p == "sallyport" and key != "cpu_gb":
                targets.append((f"{key}: median ≥ 1.1× nginx chain", med(rs), med(rs) >= 1.1))
                targets.append((f"{key}: worst round ≥ 1.0× nginx chain", worst, worst is not None and worst >= 1.0))
            if p == "sallyport" and key == "cpu_gb":
                targets.append(("CPU per GB ≤ 0.85× nginx chain (median)", med(rs), med(rs) <= 0.85))
        if wst and key != "cpu_gb":
            text, rs = bench.per_round(series(res, "sallyport", key), series(res, "wstunnel wss", key))
            lines.append(f"| sallyport × wstunnel wss | | {f(med(rs))}× | {text} | |")
            targets.append((f"{key}: median ≥ 1.0× wstunnel wss", med(rs), med(rs) >= 1.0))
        lines.append("")

    lines.append("| new connection (connect + 1-byte echo + close), ms | median | × direct beside it (median of per-round) | per round × direct beside it | worst round | × the round's direct peer (median) |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    direct = series(res, "direct", "conn")
    rows = [(p, p, "conn") for p in peers] + [("sallyport socks5", "sallyport", "socks"),
                                              ("sallyport default threads socks5", "sallyport default threads", "socks")]
    for label, p, key in rows:
        xs = series(res, p, key)
        text, rs = bench.per_round(xs, series(res, p, key + "_ref"))
        ok = [r for r in rs if r is not None]
        worst = max(ok) if ok else None
        _, apart = bench.per_round(xs, direct)
        lines.append(f"| {label} | {f(med(xs), '.3f')} | {f(med(rs))}× | {text} | {f(worst)}× | {f(med(apart))}× |")
        if label == "sallyport":
            targets.append(("new connection through a forward ≤ 3× direct, every round", worst, worst is not None and worst <= 3))
        if label == "sallyport socks5":
            targets.append(("new connection through SOCKS5 ≤ 4× direct, every round", worst, worst is not None and worst <= 4))
    lines.append("")

    lines.append("| default threads (DMZ, connector) × `--threads 1`, same round | median | per round | worst round |")
    lines.append("|---|---:|---:|---:|")
    for key, title in METRICS + [("conn", "new connection ms (lower is better)")]:
        text, rs = bench.per_round(series(res, "sallyport default threads", key), series(res, "sallyport", key))
        ok = [r for r in rs if r is not None]
        lower_better = key in ("cpu_gb", "conn")
        worst = (max(ok) if lower_better else min(ok)) if ok else None
        lines.append(f"| {title} | {f(med(rs))}× | {text} | {f(worst)}× |")
        if key in ("up", "down", "p8"):
            # The gateway roles' default is half the cores (uplink::cli): on a 2-core machine that
            # is one worker, the very configuration of `--threads 1`, so it cannot lose to it;
            # the row then measures how far two identical chains differ within a round.
            same = max(1, (os.cpu_count() or 1) // 2) == 1
            targets.append((f"{key}: default threads never loses to --threads 1 (worst round ≥ 1.0×)", worst,
                            "yes: the same configuration on this machine (one worker); the row is noise"
                            if same else worst is not None and worst >= 1.0))
    lines.append("")

    lines.append("| other, median over rounds | " + " | ".join(p for p in peers if p != "direct") + " |")
    lines.append("|---|" + "---:|" * (len(peers) - 1))
    lines.append("| peak resident memory of the chain's processes, MiB | "
                 + " | ".join(f(med(series(res, p, "mem")), ".1f") for p in peers if p != "direct") + " |")
    for key, what in (("ping", "median"), ("ping99", "p99")):
        lines.append(f"| interactive 1-byte echo every 10 ms during the reverse bulk test, same chain, {what} ms | "
                     + " | ".join(f(med(series(res, p, key)), ".2f") for p in peers if p != "direct") + " |")
    lines.append("| CPU per new connection through the forward (connect + 1-byte echo + close), µs, all processes of the chain | "
                 + " | ".join(f(med(series(res, p, "conn_cpu")), ".0f") for p in peers if p != "direct") + " |")
    lines.append("| CPU per keystroke at rest (1-byte echo every 10 ms, nothing else running), µs, all processes of the chain | "
                 + " | ".join(f(med(series(res, p, "key_cpu")), ".0f") for p in peers if p != "direct") + " |")
    lines.append("| cold start: process start to first echo through a fresh forward, ms | "
                 + " | ".join(f(med(series(res, p, "cold")), ".1f") if any(series(res, p, "cold")) else "–"
                              for p in peers if p != "direct") + " |")
    lines.append("")
    lines += bench.target_lines("target (issue 21), sallyport `--threads 1` unless said", targets)
    return lines


if __name__ == "__main__":
    bench.run_guarded(lambda: main(sys.argv[1:]))
