#!/usr/bin/env python3
"""Streams that survive their session (issue 17): what resumable streams cost and how fast
they come back, on loopback, release binaries.

    bench/resume.sh                      # builds release, runs this
    bench/resume.sh --kills 50 --rounds 7 --seconds 5

1. Session loss to resumed data: a static forward (`127.0.0.1:0=backend.internal:PORT`) to an
   echo service, one connection held; `--kills` times: `kill -9` of the DMZ, a line written on
   the same socket right after the kill, the DMZ started again on the same port; the time from
   the kill (and from "the DMZ listens again") to that line's echo on the same socket.
2. and 3. Resume on (default) against off (agent `--resume-grace 0s`): iperf3 one stream up,
   down (-R) and 8 streams, `--rounds` interleaved rounds (on/off order alternating), a fresh
   chain (DMZ, connector, agent) for every mode in every round; the peak resident memory of the
   agent and the connector sampled every 100 ms during each test, and `sallyport status` on the
   agent in the middle of the 8-stream test.

Nothing is asserted. Every process is started through bench/run.py's registry (own process
group, dies with the benchmark, marked, ended on every exit path, leftovers named and killed).
Writes bench/results/resume.md and prints it.
"""

import argparse
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402  (the registry, cleanup, iperf and helpers of bench/run.py)


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


class Chain:
    """DMZ on a fixed port, a connector that knows `backend.internal`, one agent with a static
    forward to backend.internal:PORT for each of `ports`."""

    def __init__(self, tmp, name, ports, agent_args=()):
        t = Path(tmp) / name
        t.mkdir()
        self.t, self.name = t, name
        gw, ag = R.BIN / "sallyport-gateway", R.BIN / "sallyport"
        self.gw = gw
        self.port = R.free_port()
        R.credentials(gw, t, listen=f"127.0.0.1:{self.port}")
        self.restarts = 0
        self.dmz = self.start_dmz()
        url = f"wss://127.0.0.1:{self.port}/"
        allow = []
        for p in ports:
            allow += ["--allow", f"backend.internal:{p}", "--allow", f"127.0.0.1/32:{p}"]
        self.connector = R.Proc(f"{name}-connector", [str(gw), "connector", "--gateway", url, "--token-file", str(t / "connector.token"),
                                                      "--ca", str(t / "ca.crt"), "--threads", "1", "--host", "backend.internal=127.0.0.1",
                                                      "--log", "warn,gateway::connector=info,uplink=info"] + allow, t)
        self.connector.wait_for("connected to the gateway")
        self.fwd = [R.free_port() for _ in ports]
        fwd_args = []
        for f, p in zip(self.fwd, ports):
            fwd_args += ["--forward", f"127.0.0.1:{f}=backend.internal:{p}"]
        self.home = t / "home"
        self.home.mkdir()
        self.agent = R.Proc(f"{name}-agent", [str(ag), "--threads", "1", "run", "--gateway", url, "--token-file", str(t / "agent.token"),
                                              "--ca", str(t / "ca.crt"), "--socks", "off", "--http", "off", *fwd_args, *agent_args,
                                              "--log", "warn,agent=info,uplink=info"], t, env={"HOME": str(self.home)})
        self.agent.wait_for("connected to the gateway")
        for f in self.fwd:
            R.wait_listening(f, self.agent)
        time.sleep(0.3)

    def start_dmz(self):
        self.restarts += 1
        d = R.Proc(f"{self.name}-dmz{self.restarts}", [str(self.gw), "dmz", "-c", str(self.t / "dmz.toml"), "--threads", "1",
                                                        "--log", "warn,gateway::dmz=info"], self.t)
        return d

    def kill9_dmz(self):
        """kill -9 of the DMZ's process group; returns the time of the kill."""
        t0 = time.monotonic()
        os.killpg(self.dmz.p.pid, signal.SIGKILL)
        return t0

    def reap_dmz(self):
        self.dmz.p.wait(5)
        self.dmz.stop()

    def status(self):
        code, out = R.Child([str(R.BIN / "sallyport"), "status"], timeout=10, env={"HOME": str(self.home)}).run()
        return out if code == 0 else f"(status exit {code})"

    def stop(self):
        for p in (self.agent, self.connector, self.dmz):
            p.stop()


def connected_at(log_path):
    """Wall-clock times (s) of the "connected to the gateway" lines of a log."""
    out = []
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if "connected to the gateway" in line:
            try:
                out.append(datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp())
            except ValueError:
                pass
    return out


def echo_line(s, msg):
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        b = s.recv(len(msg) - len(got))
        if not b:
            raise RuntimeError("the held connection was closed")
        got += b
    if got != msg:
        raise RuntimeError(f"echo mismatch: {got!r} != {msg!r}")


def resume_latency(tmp, echo_port, kills, up_for):
    """[(kill->echo s, listening->echo s)] over `kills` kill -9s of the DMZ."""
    c = Chain(tmp, "lat", [echo_port])
    out = []
    try:
        s = socket.create_connection(("127.0.0.1", c.fwd[0]))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(90)
        echo_line(s, b"before\n")
        for i in range(kills):
            # Let the new sessions live past uplink's `Backoff::UP_AT_LEAST` (2 s): a session lost
            # sooner counts as a failed attempt (a growing wait, no spread), one lost later as a
            # session that was up (the agent's first attempt spread over `Backoff::SPREAD`).
            time.sleep(up_for)
            t0w = time.time()
            t0 = c.kill9_dmz()
            msg = f"after kill {i}\n".encode()
            s.sendall(msg)
            c.reap_dmz()
            c.dmz = c.start_dmz()
            t_listen = [None]

            def watch():
                end = time.monotonic() + 30
                while time.monotonic() < end:
                    if R.listening(c.port):
                        t_listen[0] = time.monotonic()
                        return
                    time.sleep(0.001)

            w = threading.Thread(target=watch, daemon=True)
            w.start()
            got = b""
            while len(got) < len(msg):
                b = s.recv(len(msg) - len(got))
                if not b:
                    raise RuntimeError(f"kill {i}: the held connection was closed (not resumed)")
                got += b
            t1 = time.monotonic()
            w.join()
            if got != msg:
                raise RuntimeError(f"kill {i}: echo mismatch {got!r}")
            t1w = time.time()
            # The agent's session up again (its log, wall clock): what is left after it is the resume itself.
            ups = [u for u in connected_at(c.agent.log_path) if t0w < u <= t1w]
            up = (t1w - ups[0]) if ups else float("nan")
            # The connector's sessions up again (the last of them): a resume needs it back too.
            cups = [u for u in connected_at(c.connector.log_path) if t0w < u <= t1w]
            cup = (t1w - max(cups)) if cups else float("nan")
            out.append((t1 - t0, t1 - t_listen[0], up, cup, t1w - t0w))
            print(f"  kill {i + 1}/{kills}: {t1 - t0:.3f} s from the kill, {t1 - t_listen[0]:.3f} s from listening, "
                  f"{up:.3f} s from the agent's session up, {cup:.3f} s from the connector's", file=sys.stderr, flush=True)
        s.close()
        status = c.status()
    finally:
        c.stop()
    return out, status


def sampled(procs, fn):
    """Runs fn() while sampling the peak VmRSS (MiB) of each proc every 100 ms: (fn(), [peaks])."""
    peaks = [0.0] * len(procs)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            for i, p in enumerate(procs):
                peaks[i] = max(peaks[i], p.rss_mib())
            stop.wait(0.1)

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        r = fn()
    finally:
        stop.set()
        th.join()
    return r, peaks


def throughput(tmp, iperf_port, rounds, seconds):
    tests = [("up", False, 1), ("down (-R)", True, 1), ("8 streams (-P 8)", False, 8)]
    res = {m: {t[0]: [] for t in tests} for m in ("on", "off")}
    mem = {m: {"agent": [], "connector": [], "idle_agent": [], "idle_connector": []} for m in ("on", "off")}
    statuses = {"on": [], "off": []}
    for r in range(rounds):
        order = ["on", "off"] if r % 2 == 0 else ["off", "on"]
        for mode in order:
            args = [] if mode == "on" else ["--resume-grace", "0s"]
            c = Chain(tmp, f"r{r}-{mode}", [iperf_port], args)
            try:
                mem[mode]["idle_agent"].append(c.agent.rss_mib())
                mem[mode]["idle_connector"].append(c.connector.rss_mib())
                for name, rev, par in tests:
                    if par > 1:
                        st = {}

                        def status_later():
                            time.sleep(seconds / 2)
                            st["s"] = c.status()

                        th = threading.Thread(target=status_later, daemon=True)
                        th.start()
                    (gbps, _), peaks = sampled([c.agent, c.connector], lambda: R.iperf(c.fwd[0], seconds, reverse=rev, parallel=par))
                    res[mode][name].append(gbps)
                    if par > 1:
                        th.join()
                        statuses[mode].append(st.get("s", ""))
                        mem[mode]["agent"].append(peaks[0])
                        mem[mode]["connector"].append(peaks[1])
                    print(f"  round {r + 1} resume {mode}: {name} {R.fmt(gbps)} Gbit/s, peak RSS agent {peaks[0]:.1f} MiB, "
                          f"connector {peaks[1]:.1f} MiB", file=sys.stderr, flush=True)
            finally:
                c.stop()
    return tests, res, mem, statuses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--up-for", type=float, default=2.5, help="seconds between a resumed echo and the next kill")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--out", default=str(R.ROOT / "bench" / "results" / "resume.md"))
    ap.add_argument("--bin-dir", default=str(R.REL), help="where sallyport and sallyport-gateway are (default target/release)")
    a = ap.parse_args()
    R.BIN = Path(a.bin_dir)
    tmp = tempfile.mkdtemp(prefix="sp-resume-")
    echo_port, iperf_port = R.free_port(), R.free_port()
    R.echo_server_thread(echo_port)
    srv = R.Proc("iperf3-server", ["iperf3", "-s", "-p", str(iperf_port), "-B", "127.0.0.1"], tmp)
    R.wait_listening(iperf_port, srv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()[0]

    lines = []
    if a.kills > 0:
        lat, lat_status = resume_latency(tmp, echo_port, a.kills, a.up_for)
        k = [x[0] for x in lat]
        ls = [x[1] for x in lat]
        us = [x[2] for x in lat if x[2] == x[2]]
        cs = [x[3] for x in lat if x[3] == x[3]]
        both = [min(x[2], x[3]) for x in lat if x[2] == x[2] and x[3] == x[3]]
        lines += [f"Machine: {os.cpu_count()} cores, load average {load0:.1f} at the start; {started}; binaries {R.BIN}", "",
                  f"| session loss to resumed data, {len(lat)} kill -9s of the DMZ | median | p99 | min | max |",
                  "|---|---:|---:|---:|---:|",
                  f"| kill -9 → echo on the same socket | {statistics.median(k) * 1000:.0f} ms | {pct(k, 99) * 1000:.0f} ms | {min(k) * 1000:.0f} ms | {max(k) * 1000:.0f} ms |",
                  f"| DMZ listening again → echo | {statistics.median(ls) * 1000:.0f} ms | {pct(ls, 99) * 1000:.0f} ms | {min(ls) * 1000:.0f} ms | {max(ls) * 1000:.0f} ms |",
                  f"| connector's last session up again (its log) → echo ({len(cs)} samples) | {R.med(cs) * 1000:.0f} ms | {pct(cs, 99) * 1000:.0f} ms | {min(cs, default=float('nan')) * 1000:.0f} ms | {max(cs, default=float('nan')) * 1000:.0f} ms |",
                  f"| both ends up again (the later of the two) → echo ({len(both)} samples) | {R.med(both) * 1000:.0f} ms | {pct(both, 99) * 1000:.0f} ms | {min(both, default=float('nan')) * 1000:.0f} ms | {max(both, default=float('nan')) * 1000:.0f} ms |",
                  f"| agent's session up again (its log) → echo ({len(us)} samples) | {R.med(us) * 1000:.0f} ms | {pct(us, 99) * 1000:.0f} ms | {min(us, default=float('nan')) * 1000:.0f} ms | {max(us, default=float('nan')) * 1000:.0f} ms |",
                  "", "agent status after the run: `" + " ".join(l for l in lat_status.splitlines() if "resumable" in l) + "`", ""]
    if a.rounds > 0:
        tests, res, mem, statuses = throughput(tmp, iperf_port, a.rounds, a.seconds)
        lines += [f"| {a.rounds} rounds of {a.seconds} s, fresh chain per mode and round, Gbit/s | resume on (median) | off (median) | on/off (median of per-round) | per round on/off |",
                  "|---|---:|---:|---:|---|"]
        for name, _, _ in tests:
            on, off = res["on"][name], res["off"][name]
            ratios = [x / y for x, y in zip(on, off) if x and y]
            lines.append(f"| {name} | {R.fmt(R.med([x for x in on if x]))} | {R.fmt(R.med([x for x in off if x]))} | "
                         f"{R.fmt(R.med(ratios))}× | {' '.join(f'{x:.2f}' for x in ratios)} |")
        lines += ["", "| resident memory, MiB (median over rounds) | resume on | off | on − off |", "|---|---:|---:|---:|"]
        for key, label in (("idle_agent", "agent, idle, before the tests"), ("agent", "agent, peak during the 8-stream test (after up and down)"),
                           ("idle_connector", "connector, idle, before the tests"), ("connector", "connector, peak during the 8-stream test (after up and down)")):
            on, off = R.med(mem["on"][key]), R.med(mem["off"][key])
            lines.append(f"| {label} | {on:.1f} | {off:.1f} | {on - off:+.1f} |")
        lines += ["", "agent status in the middle of the 8-stream test (resume on): `" +
                  " ".join(l for l in (statuses["on"][-1] if statuses["on"] else "").splitlines() if "resumable" in l) + "`",
                  "agent status in the middle of the 8-stream test (resume off): `" +
                  " ".join(l for l in (statuses["off"][-1] if statuses["off"] else "").splitlines() if "resumable" in l) + "`"]
    R.write_table(lines, a.out)


if __name__ == "__main__":
    R.run_guarded(main)
