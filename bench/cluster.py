#!/usr/bin/env python3
"""Cluster figures for docs/benchmarks.md: two DMZ instances on this machine, one connector
holding sessions to both (`--gateway` twice), agents spread over both.

    bench/cluster.sh                      # builds release, raises limits, runs this
    python3 bench/cluster.py --help       # every knob

Three parts, each skippable (--skip streams|recovery|cps):
  streams   N concurrent streams (default 100,000), each with a 1-byte echo, all held open at
            once: success, time to open, resident memory per stream of every process (agents,
            connector, each DMZ).
  recovery  kill -9 of the instance an agent (given both URLs) is on: time from the kill to the
            next working new connection through that agent; the instance is restarted on the
            same port between samples; median and p99 over --samples.
  cps       new connections per second (connect + 1-byte echo + close, --concurrency at once)
            through agents on ONE instance against agents spread over TWO, same run,
            interleaved rounds: medians and per-round ratios.

A failed sample is recorded as a failure and the run goes on; every process started is ended
on exit, on an exception and on Ctrl-C (bench/run.py's Proc bookkeeping, process groups).
Writes bench/results/cluster.md and prints it.
"""

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: Proc, stop_all, free_port, med)

GW, AGENT = bench.GW, bench.AGENT
NOFILE = 400_000


def raise_nofile():
    """Root may raise the hard limit too (fs.nr_open allows 1,048,576); children inherit it."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid):
    return bench.status_of(pid, "VmRSS")


def private_kib(pid):
    """Private_Clean + Private_Dirty from smaps_rollup: memory only this process holds."""
    return bench.sum_fields(f"/proc/{pid}/smaps_rollup", ("Private_Clean:", "Private_Dirty:"))


# ----------------------------------------------------------------------------------------------
# The echo service: one process, one listener per address (127.0.0.2, .3, ...): the connector's
# connections to it need distinct destination addresses, or its ~28,000 ephemeral ports run out.

class _Said:
    """bench.echo10k_server's `ready`: tells the parent the listener is bound."""

    def set(self):
        print("echo ready", flush=True, file=sys.stderr)


def echo_serve(addr):
    host, port = addr.rsplit(":", 1)
    asyncio.run(bench.echo10k_server(int(port), _Said(), host))


# ----------------------------------------------------------------------------------------------
# The cluster

class Cluster:
    def __init__(self, tmp, echo_addrs, threads, sessions, connectors):
        self.tmp = t = Path(tmp)
        self.threads = threads
        bench.run([str(GW), "cert", "--name", "127.0.0.1", "--out", str(t)])
        bench.run([str(GW), "token", "new", "--kind", "agent", "--id", "bench", "--tokens", str(t / "agents.toml"),
                   "--out", str(t / "agent.token")])
        bench.run([str(GW), "token", "new", "--kind", "connector", "--id", "site", "--route", "127.0.0.0/8:*",
                   "--tokens", str(t / "connectors.toml"), "--out", str(t / "connector.token")])
        self.ports = [bench.free_port(), bench.free_port()]
        self.urls = [f"wss://127.0.0.1:{p}/" for p in self.ports]
        self.dmz = [None, None]
        for i in range(2):
            self.start_dmz(i)
        allow = []
        for a in echo_addrs:
            host, port = a.rsplit(":", 1)
            allow += ["--allow", f"{host}/32:{port}"]
        gws = []
        for u in self.urls:
            gws += ["--gateway", u]
        self.connectors = [
            bench.Proc(f"connector{k}", [str(GW), "connector", *gws, "--token-file", str(t / "connector.token"),
                                         "--ca", str(t / "ca.crt"), "--threads", str(threads), "--instance-id", f"c{k}",
                                         "--sessions", str(sessions), "--log", "warn,uplink=info"] + allow, t)
            for k in range(connectors)
        ]
        self.sessions = sessions
        self.wait_connector(0, sessions)
        self.wait_connector(1, sessions)
        self.agents = []

    def start_dmz(self, i):
        t = self.tmp
        (t / f"dmz{i}.toml").write_text(f"""
listen = "127.0.0.1:{self.ports[i]}"
tls_cert = "gateway.crt"
tls_key = "gateway.key"
agent_tokens = "agents.toml"
connector_tokens = "connectors.toml"
instance_id = "dmz-{i}"
drain_delay = "0s"
[limits]
max_streams = 65536
streams_per_session = 65536
streams_per_token = 131072
opens_per_token = 1000000.0
handshakes_per_ip = 100000.0
""")
        self.dmz[i] = bench.Proc(f"dmz{i}-{time.monotonic_ns()}", [str(GW), "dmz", "-c", str(t / f"dmz{i}.toml"),
                                                                  "--threads", str(self.threads), "--log", "warn,gateway::dmz=info"], t)
        self.dmz[i].wait_for(r"dmz gateway listening")

    def connector_lines(self, i):
        """Sessions each connector has set up to instance i so far (its log lines)."""
        out = []
        for c in self.connectors:
            text = c.log_path.read_text(errors="replace")
            out.append(sum(1 for line in text.splitlines() if "connected to the gateway" in line and self.urls[i] in line))
        return out

    def wait_connector(self, i, count, timeout=60):
        """Until every connector has set up `count` sessions to instance i (a number, or a list
        from connector_lines plus what is expected more)."""
        end = time.time() + timeout
        want = count if isinstance(count, list) else [count] * len(self.connectors)
        while time.time() < end:
            if all(n >= w for n, w in zip(self.connector_lines(i), want)):
                return True
            time.sleep(0.02)
        return False

    def agent(self, name, urls, forwards):
        """An agent given `urls` in that order, with static forwards [(listen port, dest addr)]."""
        gws = []
        for u in urls:
            gws += ["--gateway", u]
        fw = []
        for port, dest in forwards:
            fw += ["--forward", f"127.0.0.1:{port}={dest}"]
        a = bench.Proc(name, [str(AGENT), "run", *gws, "--token-file", str(self.tmp / "agent.token"),
                              "--ca", str(self.tmp / "ca.crt"), "--socks", "off", "--http", "off",
                              "--log", "warn,agent=info,uplink=info"] + fw, self.tmp, env={"HOME": str(self.tmp)})
        a.wait_for("connected to the gateway")
        self.agents.append(a)
        return a


def current_instance(agent, urls):
    """The instance the agent's newest session is on, from its log."""
    last = None
    for line in agent.log_path.read_text(errors="replace").splitlines():
        if "connected to the gateway" in line:
            for i, u in enumerate(urls):
                if u in line:
                    last = i
    return last


# ----------------------------------------------------------------------------------------------
# Clients

async def open_many(targets, n, measure, parallel=512, hold=None):
    """Opens n connections spread over `targets` (ports on 127.0.0.1), 1-byte echo on each,
    calls measure() while all are open (or awaits hold()), closes them."""
    conns, ok, fails = [], 0, {}
    sem = asyncio.Semaphore(parallel)

    async def one(i):
        nonlocal ok
        port = targets[i % len(targets)]
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
                conns.append(w)
                w.write(b"x")
                await w.drain()
                if await asyncio.wait_for(r.readexactly(1), 60) == b"x":
                    ok += 1
            except Exception as e:
                k = type(e).__name__
                fails[k] = fails.get(k, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    took = time.perf_counter() - t0
    measured = None
    if hold is not None:
        HOLD[:] = [ok, took, fails]
        await hold()
    else:
        await asyncio.sleep(2)
        measured = measure()
    for w in conns:
        w.close()
    await asyncio.sleep(2)
    return ok, took, measured, fails


def client_worker(port, n, parallel):
    """`--client PORT N`: opens n connections to 127.0.0.1:PORT (1-byte echo on each), prints
    one line `ok took fails`, holds them until stdin closes, then closes them. One process per
    agent: a process may hold only RLIMIT_NOFILE sockets."""
    raise_nofile()

    async def go():
        await open_many([port], n, None, parallel, hold=wait_stdin)

    async def wait_stdin():
        ok, took, fails = HOLD
        print(f"{ok} {took:.3f} {json.dumps(fails)}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(go())


class Client:
    """A client_worker process, ended with the others on exit."""

    def __init__(self, port, n):
        bench.STARTED.append(self)
        self.p = bench.spawn([sys.executable, __file__, "--client", str(port), str(n)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def opened(self):
        line = self.p.stdout.readline().split(" ", 2)
        if len(line) < 3:
            return 0, float("nan"), {"client died": 1}
        return int(line[0]), float(line[1]), json.loads(line[2])

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.stop()

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait()


HOLD = []


def one_connection(port, timeout=2.0):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"x")
            return s.recv(1) == b"x"
        finally:
            s.close()
    except OSError:
        return False


async def cps_round(ports, seconds, concurrency):
    """New connections per second for `seconds`, `concurrency` at once, spread over ports."""
    done, failed = 0, 0
    end = time.perf_counter() + seconds

    async def worker(k):
        nonlocal done, failed
        port = ports[k % len(ports)]
        while time.perf_counter() < end:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
                w.write(b"x")
                await w.drain()
                ok = await asyncio.wait_for(r.readexactly(1), 5) == b"x"
                w.close()
                if ok:
                    done += 1
                else:
                    failed += 1
            except Exception:
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / (time.perf_counter() - t0), failed


def cpu_of(procs):
    return sum(p.cpu() for p in procs)


def pct(xs, q):
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# ----------------------------------------------------------------------------------------------

def part_streams(a, cl, spread, echo_addrs, connectors, lines):
    procs = {"dmz-0": cl.dmz[0], "dmz-1": cl.dmz[1]}
    for c in cl.connectors:
        procs[c.name] = c
    for agent, _, i in spread:
        procs[agent.name] = agent

    def snap():
        return {k: (rss_kib(p.p.pid), private_kib(p.p.pid)) for k, p in procs.items()}

    before = snap()
    print(f"opening {a.streams} streams through {a.agents} agents on two instances...", file=sys.stderr)
    t0 = time.perf_counter()
    share = [a.streams // a.agents + (1 if k < a.streams % a.agents else 0) for k in range(a.agents)]
    clients = [Client(port, share[k]) for k, (_, port, _) in enumerate(spread)]
    ok, fails = 0, {}
    try:
        for c in clients:
            o, _, f = c.opened()
            ok += o
            for k, v in f.items():
                fails[k] = fails.get(k, 0) + v
        took = time.perf_counter() - t0
        time.sleep(2)
        after = snap()
    finally:
        for c in clients:
            c.close()
    per_agent = a.streams / a.agents
    lines.append(f"| {a.streams} concurrent streams, two DMZ instances, {a.agents} agents (half on each), {connectors} connector(s) | value |")
    lines.append("|---|---:|")
    lines.append(f"| success | {ok}/{a.streams} ({100.0 * ok / a.streams:.1f} %) |")
    if fails:
        lines.append(f"| failures | {', '.join(f'{k} {v}' for k, v in fails.items())} |")
    lines.append(f"| time to open all (each with a 1-byte echo) | {took:.1f} s |")
    streams_through = {"dmz-0": a.streams / 2, "dmz-1": a.streams / 2}
    agent_rows, conn_rows = [], []
    for k in procs:
        n = streams_through.get(k, a.streams / connectors if k.startswith("connector") else per_agent)
        d_rss = (after[k][0] - before[k][0]) / n
        d_priv = (after[k][1] - before[k][1]) / n
        row = (k, after[k][0] / 1024, d_rss, d_priv, n)
        if k.startswith("agent"):
            agent_rows.append(row)
        elif k.startswith("connector") and connectors > 1:
            conn_rows.append(row)
        else:
            lines.append(f"| {k}: resident with all open; growth per stream (RSS / private) | "
                         f"{row[1]:.1f} MiB; {d_rss:.2f} / {d_priv:.2f} KiB ({n:.0f} streams) |")
    for label, rows in (("connectors", conn_rows), ("agents", agent_rows)):
        if not rows:
            continue
        rs = [r[2] for r in rows]
        ps = [r[3] for r in rows]
        lines.append(f"| {label} ({len(rows)}, ~{rows[0][4]:.0f} streams each): resident each, median; growth per stream (RSS / private), median (min–max) | "
                     f"{statistics.median(r[1] for r in rows):.1f} MiB; {statistics.median(rs):.2f} ({min(rs):.2f}–{max(rs):.2f}) / "
                     f"{statistics.median(ps):.2f} KiB |")
    lines.append("")
    print("\n".join(lines), file=sys.stderr)



def part_recovery(a, cl, spread, echo_addrs, connectors, lines):
    # An agent given both URLs, with a forward; kill -9 the instance it is on. By default a fresh
    # agent per sample (its reconnect backoff starts from the beginning, as after a real loss);
    # --same-agent keeps one agent, so losses follow each other within the backoff's 60 s.
    ra = None
    times, failures = [], 0
    for s in range(a.samples):
        try:
            if ra is None or not a.same_agent:
                if ra is not None:
                    ra.stop()
                port = bench.free_port()
                ra = cl.agent(f"agent-recovery{s}", [cl.urls[s % 2], cl.urls[(s + 1) % 2]], [(port, echo_addrs[0])])
            # The agent works (both instances are up; the connector came back after the last).
            t_ok = time.time() + 30
            while not one_connection(port) and time.time() < t_ok:
                time.sleep(0.05)
            victim = current_instance(ra, cl.urls)
            if victim is None:
                raise RuntimeError("agent not connected")
            seen = cl.connector_lines(victim)
            t0 = time.perf_counter()
            os.kill(cl.dmz[victim].p.pid, signal.SIGKILL)
            got = None
            while time.perf_counter() - t0 < 60:
                if one_connection(port, timeout=2.0):
                    got = time.perf_counter() - t0
                    break
                time.sleep(0.001)
            cl.dmz[victim].stop()
            if got is None:
                failures += 1
            else:
                times.append(got * 1000)
            print(f"  recovery sample {s + 1}: killed dmz-{victim}, {got and got * 1000:.1f} ms", file=sys.stderr)
            cl.start_dmz(victim)
            # The connector reconnects (its backoff) before the next sample.
            if not cl.wait_connector(victim, [n + cl.sessions for n in seen], timeout=60):
                print("  connector did not come back within 60 s", file=sys.stderr)
        except Exception as e:  # one failed sample never ends the run
            failures += 1
            print(f"  recovery sample {s + 1} failed: {e!r}", file=sys.stderr)
    how = "one agent for all samples" if a.same_agent else "a fresh agent each sample"
    lines.append(f"| recovery after kill -9 of the agent's instance ({a.samples} samples, {how}) | value |")
    lines.append("|---|---:|")
    lines.append(f"| recovered | {len(times)}/{a.samples} |")
    if times:
        lines.append(f"| kill → next working new connection, median | {statistics.median(times):.1f} ms |")
        lines.append(f"| p99 | {pct(times, 0.99):.1f} ms |")
        lines.append(f"| min / max | {min(times):.1f} / {max(times):.1f} ms |")
    lines.append("")
    print("\n".join(lines[-6:]), file=sys.stderr)



def part_cps(a, cl, spread, echo_addrs, connectors, lines):
    # The same number of agents in each setting: ONE = both on instance 0 only; TWO = one on
    # each instance (single URL each, so none moves).
    one, two = [], []
    for k in range(2):
        p = bench.free_port()
        cl.agent(f"cps-one{k}", [cl.urls[0]], [(p, echo_addrs[k])])
        one.append(p)
        p = bench.free_port()
        cl.agent(f"cps-two{k}", [cl.urls[k]], [(p, echo_addrs[2 + k])])
        two.append(p)
    res = {"one": [], "two": []}
    cpu = {"one": [], "two": []}
    for r in range(a.rounds):
        for label, ports in (("one", one), ("two", two)) if r % 2 == 0 else (("two", two), ("one", one)):
            c0 = [p.cpu() for p in cl.dmz]
            try:
                rate, failed = asyncio.run(cps_round(ports, a.seconds, a.concurrency))
            except Exception as e:
                print(f"  cps round {r + 1} {label} failed: {e!r}", file=sys.stderr)
                rate, failed = float("nan"), -1
            c1 = [p.cpu() for p in cl.dmz]
            res[label].append(rate)
            cpu[label].append([(x - y) / a.seconds for x, y in zip(c1, c0)])
            print(f"  cps round {r + 1} {label}: {rate:.0f}/s ({failed} failed)", file=sys.stderr)
            time.sleep(1)
    ratios = [t / o for t, o in zip(res["two"], res["one"]) if o == o and t == t and o]
    lines.append(f"| new connections per second (connect + 1-byte echo + close, {a.concurrency} at once, {a.rounds} rounds of {a.seconds:g} s) | one instance | two instances | two / one |")
    lines.append("|---|---:|---:|---:|")
    lines.append(f"| median | {bench.med(res['one']):.0f} | {bench.med(res['two']):.0f} | {bench.med(res['two']) / bench.med(res['one']):.2f}× |")
    lines.append(f"| per round | {', '.join(f'{x:.0f}' for x in res['one'])} | {', '.join(f'{x:.0f}' for x in res['two'])} | "
                 f"{', '.join(f'{x:.2f}' for x in ratios)} |")
    busy = {k: [f"{c[0]:.2f}+{c[1]:.2f}" for c in v] for k, v in cpu.items()}
    lines.append(f"| DMZ CPU (cores: dmz-0+dmz-1) per round | {', '.join(busy['one'])} | {', '.join(busy['two'])} | |")
    lines.append("")


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "--echo-server":
        raise_nofile()
        echo_serve(sys.argv[2])
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--client":
        client_worker(int(sys.argv[2]), int(sys.argv[3]), 256)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=100_000)
    ap.add_argument("--agents", type=int, default=8, help="agents for the stream figure, half on each instance")
    ap.add_argument("--sessions", type=int, default=0,
                    help="connector sessions per instance (16,384 streams each) [default: enough for --streams]")
    ap.add_argument("--connectors", type=int, default=0,
                    help="connector processes [default: 1, or as many as the open-file limit needs: each holds "
                         "one socket per stream]")
    ap.add_argument("--samples", type=int, default=20, help="recovery samples")
    ap.add_argument("--same-agent", dest="same_agent", action="store_true",
                    help="recovery: one agent for all samples (kills 2-15 s apart) instead of a fresh one each")
    ap.add_argument("--rounds", type=int, default=5, help="cps rounds (one and two instances each)")
    ap.add_argument("--seconds", type=float, default=4.0, help="cps: length of one measurement")
    ap.add_argument("--concurrency", type=int, default=64, help="cps: connections at once")
    ap.add_argument("--threads", type=int, default=1, help="worker threads of each DMZ and the connector")
    ap.add_argument("--skip", action="append", default=[], choices=["streams", "recovery", "cps"])
    ap.add_argument("--out", default=str(bench.ROOT / "bench" / "results" / "cluster.md"))
    a = ap.parse_args()

    nofile = raise_nofile()
    tmp = tempfile.mkdtemp(prefix="sallyport-cluster-")
    n_echo = max(a.agents, 8)
    # One echo address per agent (127.0.0.2, .3, ...): at most ~28,000 connections from the
    # connector to one address and port.
    echo_addrs = [f"127.0.0.{2 + i}:{bench.free_port()}" for i in range(n_echo)]
    for k, addr in enumerate(echo_addrs):
        bench.Proc(f"echo{k}", [sys.executable, __file__, "--echo-server", addr], tmp).wait_for("echo ready")
    connectors = a.connectors or max(1, math.ceil(a.streams / (nofile - 2000)))
    sessions = a.sessions or max(2, math.ceil(a.streams / 2 / connectors / 16_000))
    cl = Cluster(tmp, echo_addrs, a.threads, sessions, connectors)
    lines = [f"Machine: {os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; open files {nofile}; "
             f"DMZ and connector `--threads {a.threads}`; {connectors} connector process(es), `--sessions {sessions}` per instance.", ""]

    # Agents for the stream figure and cps: half prefer instance 0, half instance 1; each has a
    # forward to its own echo address.
    spread = []
    for k in range(a.agents):
        order = cl.urls if k % 2 == 0 else cl.urls[::-1]
        port = bench.free_port()
        agent = cl.agent(f"agent{k}", order, [(port, echo_addrs[k])])
        spread.append((agent, port, k % 2))

    for name, part in (("streams", part_streams), ("recovery", part_recovery), ("cps", part_cps)):
        if name in a.skip:
            continue
        try:
            part(a, cl, spread, echo_addrs, connectors, lines)
        except Exception as e:  # a failed part is reported, the run goes on
            print(f"{name} failed: {e!r}", file=sys.stderr)
            lines += [f"{name}: failed ({e!r})", ""]

    bench.write_table(lines, a.out)


if __name__ == "__main__":
    bench.run_guarded(main)
