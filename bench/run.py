#!/usr/bin/env python3
"""Sallyport benchmark: the full chain on loopback against the direct connection and the
nginx `stream` TLS relay chain (the practical limit of a three-process TLS relay here), in the
same run, interleaved rounds (the order of the chains rotated each round), medians.

    bench/run.sh            # installs iperf3/nginx if missing, builds release, runs this
    WSTUNNEL=/path/to/wstunnel bench/run.sh   # with the optional wstunnel wss row

Chains (TLS on both tunnel legs):
  direct    client -> server
  sallyport client -> agent (static forward / SOCKS5) -> DMZ gateway -> connector -> server
            (WebSocket; with --variants also: WebSocket inside the inner channel, the HTTP
            fallback transport streamed and long-polled, inside the inner channel, and HTTP
            without it: same DMZ and connector, one more agent each)
  nginx     client -> nginx (plain->TLS) -> nginx (TLS->TLS) -> nginx (TLS->plain) -> server
  rathole   (when `rathole` is on PATH) client -> rathole server <- rathole client -> server
  wstunnel  (when the environment variable WSTUNNEL names a wstunnel binary; wstunnel is not on
            crates.io) client -> wstunnel client (-L) -> wstunnel server (wss) <- wstunnel client
            (-R, dialled out) -> server, the independent harness's shape; TOKIO_WORKER_THREADS =
            BENCH_THREADS (default 1), like the Sallyport gateway roles here. Measured in the same
            interleaved rounds, with its CPU per GB; the table adds sallyport against it (ratio of
            medians, per-round min-max) and the issue's targets, met or not.

Writes the table to bench/results/latest.md and prints it.
"""

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REL = ROOT / "target" / "release"
GW = REL / "sallyport-gateway"
AGENT = REL / "sallyport"
CLK = os.sysconf("SC_CLK_TCK")
# Worker threads per gateway process. Three processes and iperf3 share this machine's two cores,
# so one worker each (like `worker_processes 1` for the nginx chain) is the fair setting; on a
# real DMZ host the default (one per core) applies. The agent defaults to one.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
# The binaries measured: target/release, or target/debug in the smoke run (--bin-dir).
BIN = REL


def listening(port):
    """Whether a socket listens on 127.0.0.1:port (from /proc/net/tcp: connecting to find out
    would open a connection through a relay to the server behind it)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(line.split()[1] == want and line.split()[3] == "0A" for line in list(f)[1:])


def wait_listening(port, proc, timeout=10):
    """Until `proc` listens on 127.0.0.1:port; RuntimeError naming it when it exits or the time is up."""
    end = time.time() + timeout
    while time.time() < end and proc.p.poll() is None:
        if listening(port):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{proc.name} is not listening on {port}: {proc.log_path.read_text(errors='replace')[-2000:]}")


_GIVEN = set()


def free_port():
    """A free loopback port, never one this process handed out before: the kernel may pick the
    same port twice while the first taker has not bound it yet, and two hops of the nginx chain
    given one port made nginx proxy into itself (a loop that grew to 765 MiB, its iperf3 runs
    timed out, and the CI smoke run took two minutes more)."""
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p not in _GIVEN:
            _GIVEN.add(p)
            return p


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return out


def status_of(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def sum_fields(path, prefixes):
    """The sum of the first number on every line of a /proc file that starts with one of
    `prefixes` (0 when the file is gone)."""
    total = 0
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefixes):
                    total += int(line.split()[1])
    except FileNotFoundError:
        pass
    return total


# Every process the benchmark starts is in STARTED, in its own process group (nginx's workers,
# iperf3's children), and carries MARK in its environment: stop_all ends them all on every exit
# path, and leftovers() finds any that escaped (the smoke run fails on one).
STARTED = []
MARK = os.environ.get("SALLYPORT_BENCH_MARK") or f"{os.getpid()}-{time.time_ns()}"
_PR_SET_PDEATHSIG = 1
try:
    import ctypes
    # Looked up once here: the child between fork and exec only calls it (no dlopen there).
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (ImportError, OSError, AttributeError):
    _prctl = None


def _die_with_parent():
    """In the child before exec: SIGKILL when the benchmark dies without cleaning up (kill -9)."""
    if _prctl:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(args, env=None, **kw):
    """Popen in a new process group, marked, registered (ended by stop_all)."""
    p = subprocess.Popen(args, env={**os.environ, **(env or {}), "SALLYPORT_BENCH_MARK": MARK, "SALLYPORT_BENCH_CHILD": "1"},
                         start_new_session=True, preexec_fn=_die_with_parent, **kw)
    return p


def kill_group(p, grace=3):
    """SIGTERM to the process group of `p` (its own session), SIGKILL after `grace` seconds."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # The group may outlive its leader (a worker that ignored SIGTERM): always SIGKILL what is left.
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        pass


def leftovers():
    """Pids of live processes that carry this run's MARK (none after stop_all), except this one
    and its parents (a helper process started by the benchmark, such as the echo server, runs
    this module too)."""
    needle = f"SALLYPORT_BENCH_MARK={MARK}".encode()
    mine, pid = set(), os.getpid()
    while pid > 1 and pid not in mine:
        mine.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as st:
                pid = int(st.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ValueError):
            break
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) not in mine:
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        with open(f"/proc/{d}/stat") as st:
                            if st.read().rsplit(")", 1)[1].split()[0] != "Z":
                                out.append(int(d))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    return out


def stop_all():
    """Ends every process the benchmark started, whatever happened (atexit and signals)."""
    while STARTED:
        p = STARTED.pop()
        try:
            p.stop()
        except Exception:
            pass


class Proc:
    """A child process with its stderr in a file."""

    def __init__(self, name, args, tmp, env=None, pipes=False, stdout=None):
        """`pipes`: stdin and stdout are text pipes (`self.p.stdin`, `self.p.stdout`);
        `stdout`: a file that takes its standard output (else it is discarded)."""
        self.name = name
        self.log_path = Path(tmp) / f"{name}.log"
        self.log = open(self.log_path, "w")
        STARTED.append(self)
        io = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) if pipes else \
            dict(stdin=subprocess.DEVNULL, stdout=stdout if stdout is not None else subprocess.DEVNULL)
        self.p = spawn(args, env=env, stderr=self.log, **io)

    def wait_for(self, pattern, timeout=20):
        end = time.time() + timeout
        rx = re.compile(pattern)
        while time.time() < end:
            text = self.log_path.read_text(errors="replace")
            m = rx.search(text)
            if m:
                return m
            if self.p.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} never logged {pattern!r}:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def _stat_sum(self, value):
        """`value(fields)` of /proc/PID/stat (the fields after the command name) summed over the
        process and its children (nginx workers)."""
        total = 0
        for pid in [self.p.pid] + children(self.p.pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    total += value(f.read().rsplit(")", 1)[1].split())
            except FileNotFoundError:
                pass
        return total

    def cpu(self):
        """utime+stime in seconds of the process and its children (nginx workers)."""
        return self._stat_sum(lambda f: (int(f[11]) + int(f[12])) / CLK)

    def cpu_ns(self):
        """Time on a CPU in ns of every thread of the process and its children (schedstat: exact,
        where utime and stime count 10 ms ticks); for short figures such as CPU per connection.
        A thread that ended in between is missing from the later sum."""
        total = 0
        for pid in [self.p.pid] + children(self.p.pid):
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except FileNotFoundError:
                continue
            for t in tasks:
                try:
                    with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                        total += int(f.read().split()[0])
                except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
                    pass
        return total

    def minflt(self):
        """Minor page faults of the process and its children (fresh pages the kernel zeroed)."""
        return self._stat_sum(lambda f: int(f[7]))

    def rss_mib(self):
        return sum(status_of(pid, "VmRSS") for pid in [self.p.pid] + children(self.p.pid)) / 1024

    def hwm_mib(self):
        return sum(status_of(pid, "VmHWM") for pid in [self.p.pid] + children(self.p.pid)) / 1024

    def ctx_switches(self):
        return sum(sum_fields(f"/proc/{self.p.pid}/task/{t}/status", ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
                   for t in os.listdir(f"/proc/{self.p.pid}/task"))

    def stop(self, grace=3):
        if hasattr(self, "p"):
            kill_group(self.p, grace)
        if self in STARTED:
            STARTED.remove(self)
        if not self.log.closed:
            self.log.close()


class Child:
    """A short-lived registered child (an iperf3 client, `doctor`): its output, ended on every exit path."""

    def __init__(self, args, timeout, env=None):
        self.args, self.timeout, self.env = args, timeout, env

    def run(self):
        """(returncode, stdout); raises subprocess.TimeoutExpired after `timeout` (the child is ended)."""
        STARTED.append(self)
        try:
            self.p = spawn(self.args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            out, _ = self.p.communicate(timeout=self.timeout)
            return self.p.returncode, out
        finally:
            self.stop()

    def stop(self):
        if hasattr(self, "p"):
            kill_group(self.p, grace=1)
        if self in STARTED:
            STARTED.remove(self)


def run(args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


# ----------------------------------------------------------------------------------------------
# Services

def echo_server_thread(port):
    """A threaded 1-byte echo server for latency (plain sockets, like the peers' numbers)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(1024)

    def serve(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                b = c.recv(65536)
                if not b:
                    break
                c.sendall(b)
        except OSError:
            pass
        finally:
            c.close()

    def loop():
        while True:
            c, _ = srv.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


# ----------------------------------------------------------------------------------------------
# Chains

TUNNEL_TOML = ("\n[tunnel]\n" + os.environ["SALLYPORT_BENCH_TUNNEL"].replace(";", "\n") + "\n"
               if os.environ.get("SALLYPORT_BENCH_TUNNEL") else "")


def credentials(gw, t, listen="127.0.0.1:0", tunnel=""):
    """Into `t`: a CA and a certificate for 127.0.0.1, an agent token (`agent.token`), a connector
    token (`connector.token`, routes 127.0.0.1/32 and *.internal) and `dmz.toml` listening on
    `listen` with the benchmark's limits (rates and stream counts out of the way), then `tunnel`."""
    run([str(gw), "cert", "--name", "127.0.0.1", "--out", str(t)])
    run([str(gw), "token", "new", "--kind", "agent", "--id", "bench", "--tokens", str(t / "agents.toml"), "--out", str(t / "agent.token")])
    run([str(gw), "token", "new", "--kind", "connector", "--id", "site", "--route", "127.0.0.1/32:*", "--route", "*.internal:*",
         "--tokens", str(t / "connectors.toml"), "--out", str(t / "connector.token")])
    (t / "dmz.toml").write_text(f"""
listen = "{listen}"
tls_cert = "gateway.crt"
tls_key = "gateway.key"
agent_tokens = "agents.toml"
connector_tokens = "connectors.toml"
[limits]
opens_per_token = 1000000.0
handshakes_per_ip = 1000.0
streams_per_token = 1000000
streams_per_session = 1000000
""" + tunnel)


class Sallyport:
    def __init__(self, tmp, iperf_port, echo_port, echo10k_port, bindir=None, threads=THREADS, name=""):
        """`threads`: worker threads of the DMZ and the connector (None: their default, one per
        core); the agent runs with one (its default)."""
        self.tmp = Path(tmp)
        bindir = bindir or BIN
        self.gw, self.agent_bin = bindir / "sallyport-gateway", bindir / "sallyport"
        gw_threads = ["--threads", str(threads)] if threads else []
        GW, AGENT = self.gw, self.agent_bin
        t = self.tmp
        credentials(GW, t, tunnel=TUNNEL_TOML)
        # A protocol v1 bearer token too: the baseline of the v2 variants.
        run([str(GW), "token", "new", "--v1", "--kind", "agent", "--id", "bench-v1", "--tokens", str(t / "agents.toml"), "--out", str(t / "agent-v1.token")])
        # `SALLYPORT_BENCH_TUNNEL` ("stream_window = 4194304", ...): the same `[tunnel]` keys
        # for all three roles, to measure a tuning without editing the benchmark.
        (t / "role.toml").write_text(TUNNEL_TOML)
        self.dmz = Proc(f"{name}dmz", [str(GW), "dmz", "-c", str(t / "dmz.toml"), *gw_threads, "--log", "warn,gateway::dmz=info"], t)
        port = int(self.dmz.wait_for(r"dmz gateway listening addr=127\.0\.0\.1:(\d+)").group(1))
        url = f"wss://127.0.0.1:{port}/"
        allow = []
        for p in (iperf_port, echo_port, echo10k_port):
            allow += ["--allow", f"127.0.0.1/32:{p}"]
        self.connector = Proc(f"{name}connector", [str(GW), "connector", "-c", str(t / "role.toml"), "--gateway", url, "--token-file", str(t / "connector.token"),
                                                   "--ca", str(t / "ca.crt"), *gw_threads, "--log", "warn,gateway::connector=info,uplink=info"] + allow, t)
        self.connector.wait_for("connected to the gateway")
        self.fwd_iperf, self.fwd_echo, self.fwd_10k = free_port(), free_port(), free_port()
        self.agent = Proc(f"{name}agent", [str(AGENT), "--threads", "1", "run", "-c", str(t / "role.toml"), "--gateway", url, "--token-file", str(t / "agent.token"), "--ca", str(t / "ca.crt"),
                                    "--socks", "127.0.0.1:0", "--http", "off",
                                    "--forward", f"127.0.0.1:{self.fwd_iperf}=127.0.0.1:{iperf_port}",
                                    "--forward", f"127.0.0.1:{self.fwd_echo}=127.0.0.1:{echo_port}",
                                    "--forward", f"127.0.0.1:{self.fwd_10k}=127.0.0.1:{echo10k_port}",
                                    "--log", "warn,agent=info,uplink=info"], t, env={"HOME": str(t)})
        self.socks = int(self.agent.wait_for(r'front="socks5" addr=127\.0\.0\.1:(\d+)').group(1))
        self.agent.wait_for("connected to the gateway")
        time.sleep(0.3)
        self.procs = [self.agent, self.dmz, self.connector]
        self.url = url
        self.iperf_port, self.echo_port = iperf_port, echo_port

    def inner_key(self):
        return run([str(self.gw), "inner-key", "-c", str(self.tmp / "dmz.toml")]).stdout.strip()

    def variant(self, name, args, conf="", token="agent.token"):
        """One more agent on the same DMZ and connector, with its own forwards."""
        t = self.tmp
        AGENT = self.agent_bin
        cfg = t / f"{name}.toml"
        cfg.write_text(conf)
        fi, fe = free_port(), free_port()
        a = Proc(f"agent-{name}", [str(AGENT), "run", "-c", str(cfg), "--gateway", self.url, "--token-file", str(t / token),
                                  "--ca", str(t / "ca.crt"), "--socks", "off", "--http", "off",
                                  "--forward", f"127.0.0.1:{fi}=127.0.0.1:{self.iperf_port}",
                                  "--forward", f"127.0.0.1:{fe}=127.0.0.1:{self.echo_port}",
                                  "--log", "warn,agent=info,uplink=info"] + args, t, env={"HOME": str(t)})
        a.wait_for("connected to the gateway")
        return a, fi, fe

    def stop(self):
        for p in self.procs:
            p.stop()


class NginxChain:
    """Three nginx processes: plain -> TLS -> TLS -> plain, each `worker_processes 1`; with
    `master=False` also `master_process off` (one process each, as in the independent harness).
    `target_port` may be a list: one such chain per target in the same three processes, entered
    at `self.ports` (`self.port` is the first)."""

    def __init__(self, tmp, target_port, name="nginx", master=True):
        t = Path(tmp) / name
        t.mkdir()
        run([str(BIN / "sallyport-gateway"), "cert", "--name", "127.0.0.1", "--out", str(t)])
        targets = target_port if isinstance(target_port, list) else [target_port]
        # hops[i][k]: where process i listens for target k; hop 3 is the target itself.
        hops = [[free_port() for _ in targets] for _ in range(3)] + [targets]
        self.ports = hops[0]
        self.port = self.ports[0]
        mod = "/usr/lib/nginx/modules/ngx_stream_module.so"
        load = f"load_module {mod};" if os.path.exists(mod) else ""
        self.procs = []
        for i in range(3):
            ssl_in, ssl_out = i > 0, i < 2
            d = t / f"n{i}"
            d.mkdir()
            servers = "".join(f"""
  server {{
    listen 127.0.0.1:{listen}{' ssl' if ssl_in else ''};
    {f'ssl_certificate {t}/gateway.crt; ssl_certificate_key {t}/gateway.key;' if ssl_in else ''}
    proxy_pass 127.0.0.1:{up};
    {'proxy_ssl on;' if ssl_out else ''}
    tcp_nodelay on;
  }}""" for listen, up in zip(hops[i], hops[i + 1]))
            conf = f"""{load}
worker_processes 1; daemon off;{'' if master else ' master_process off;'} pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 20000; }}
stream {{{servers}
}}
"""
            (d / "nginx.conf").write_text(conf)
            self.procs.append(Proc(f"{name}{i}", ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")], t))
        for i, p in enumerate(self.procs):
            for port in hops[i]:
                wait_listening(port, p)

    def stop(self):
        for p in self.procs:
            p.stop()


class Rathole:
    def __init__(self, tmp, target_port):
        t = Path(tmp) / "rathole"
        t.mkdir()
        ctl, self.port = free_port(), free_port()
        (t / "s.toml").write_text(f"""[server]
bind_addr = "127.0.0.1:{ctl}"
default_token = "bench"
[server.transport]
type = "websocket"
[server.transport.websocket]
tls = false
[server.services.iperf]
bind_addr = "127.0.0.1:{self.port}"
""")
        (t / "c.toml").write_text(f"""[client]
remote_addr = "127.0.0.1:{ctl}"
default_token = "bench"
[client.transport]
type = "websocket"
[client.transport.websocket]
tls = false
[client.services.iperf]
local_addr = "127.0.0.1:{target_port}"
""")
        self.procs = [Proc("rathole-s", ["rathole", "--server", str(t / "s.toml")], t),
                      Proc("rathole-c", ["rathole", "--client", str(t / "c.toml")], t)]
        time.sleep(1.5)

    def stop(self):
        for p in self.procs:
            p.stop()


class WstunnelPeer:
    """wstunnel's reverse shape: a client listening (-L) -> the server (wss) -> the server's own
    reverse listener -> a client that dialled out (-R) -> the target. `binary`: a wstunnel
    executable (from the environment variable WSTUNNEL: wstunnel is not on crates.io);
    `threads`: TOKIO_WORKER_THREADS of each of its three processes (0 or None: its default).
    Used by both modes: the default one's optional `wstunnel wss` chain and the independent
    harness's peer (bench/independent.py)."""

    def __init__(self, tmp, binary, iperf_port, echo_port, threads):
        t = Path(tmp) / "wstunnel"
        t.mkdir()
        run([str(BIN / "sallyport-gateway"), "cert", "--name", "127.0.0.1", "--out", str(t)])
        self.bin, self.t = binary, t
        self.env = {"TOKIO_WORKER_THREADS": str(threads)} if threads else {}
        port = free_port()
        self.url = f"wss://127.0.0.1:{port}"
        server = Proc("wst-server", [binary, "server", self.url, "--tls-certificate", str(t / "gateway.crt"),
                                     "--tls-private-key", str(t / "gateway.key"), "--log-lvl", "WARN"], t, env=self.env)
        wait_listening(port, server)
        self.rev_iperf, self.rev_echo = free_port(), free_port()
        reverse = Proc("wst-reverse", [binary, "client", "-R", f"tcp://127.0.0.1:{self.rev_iperf}:127.0.0.1:{iperf_port}",
                                       "-R", f"tcp://127.0.0.1:{self.rev_echo}:127.0.0.1:{echo_port}", self.url,
                                       "--log-lvl", "WARN"], t, env=self.env)
        wait_listening(self.rev_iperf, server)
        wait_listening(self.rev_echo, server)
        self.port, self.echo = free_port(), free_port()
        forward = Proc("wst-forward", [binary, "client", "-L", f"tcp://127.0.0.1:{self.port}:127.0.0.1:{self.rev_iperf}",
                                       "-L", f"tcp://127.0.0.1:{self.echo}:127.0.0.1:{self.rev_echo}", self.url,
                                       "--log-lvl", "WARN"], t, env=self.env)
        wait_listening(self.port, forward)
        wait_listening(self.echo, forward)
        self.socks, self.procs = None, [forward, server, reverse]

    def cold_start(self):
        """A fresh wstunnel client (-L): its start to the first byte echoed through its forward."""
        fwd = free_port()
        t0 = time.perf_counter()
        c = Proc(f"wst-cold-{time.monotonic_ns()}", [self.bin, "client", "-L", f"tcp://127.0.0.1:{fwd}:127.0.0.1:{self.rev_echo}",
                                                     self.url, "--log-lvl", "WARN"], self.t, env=self.env)
        try:
            return first_echo(fwd, t0, c)
        finally:
            c.stop()

    def stop(self):
        for p in self.procs:
            p.stop()


def wstunnel_binary():
    """The wstunnel executable named by the environment variable WSTUNNEL (a path, or a name on
    PATH), None when it is unset or empty; exits with one line when it names nothing executable."""
    wst = os.environ.get("WSTUNNEL")
    if not wst:
        return None
    found = shutil.which(wst)
    if not found:
        sys.exit(f"bench: WSTUNNEL={wst!r} is not an executable file (unset it, or point it at a wstunnel binary)")
    return found


def version(binary):
    """`wstunnel --version`'s line (e.g. `wstunnel-cli 10.6.2`), or the binary's name."""
    try:
        return subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout.strip() or Path(binary).name
    except (OSError, subprocess.TimeoutExpired):
        return Path(binary).name


# ----------------------------------------------------------------------------------------------
# Measurements

def iperf(port, seconds, reverse=False, parallel=1):
    """One iperf3 test: (Gbit/s, bytes received), or (None, 0) when it failed twice. A failed
    try (nonzero exit, an error or no `sum_received` in its JSON, a timeout) is retried once after
    a second, then recorded as a failure: it never ends the run."""
    args = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J", "-P", str(parallel)]
    if reverse:
        args.append("-R")
    for attempt in range(2):
        why = None
        try:
            code, out = Child(args, timeout=seconds + 20).run()
            j = json.loads(out)
            if code != 0 or "error" in j:
                why = f"exit {code}: {j.get('error', '')}"
            else:
                s = j["end"]["sum_received"]
                return s["bits_per_second"] / 1e9, s["bytes"]
        except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError, OSError) as e:
            why = repr(e)
        print(f"  iperf3 to port {port}{' -R' if reverse else ''}{f' -P {parallel}' if parallel > 1 else ''} failed "
              f"(attempt {attempt + 1} of 2): {why}", file=sys.stderr)
        time.sleep(1)
    return None, 0


def first_echo(port, t0, proc, timeout=20):
    """Milliseconds from t0 to the first byte echoed through 127.0.0.1:port (tried every
    millisecond until it works), or None."""
    end = time.time() + timeout
    while time.time() < end and proc.p.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(b"x")
                if s.recv(1) == b"x":
                    return (time.perf_counter() - t0) * 1000
        except OSError:
            pass
        time.sleep(0.001)
    print(f"  cold start: no echo through {proc.name}", file=sys.stderr)
    return None


def fmt(x, spec=".2f"):
    """A figure for a table cell: `failed` when the measurement failed."""
    return "failed" if x is None or x != x else format(x, spec)


def latency(port, n, socks_target=None):
    """connect + 1-byte echo + close, n times; returns (median ms, p99 ms), or (None, None) when
    a connection failed (said on stderr; the run goes on)."""
    times = latency_times(port, n, socks_target)
    if times is None:
        return None, None
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def latency_times(port, n, socks_target=None):
    """connect + 1-byte echo + close, n times: each one's ms, or None when a connection failed
    (said on stderr; the run goes on)."""
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if socks_target:
                    socks5_connect(s, *socks_target)
                s.sendall(b"x")
                if s.recv(1) != b"x":
                    raise RuntimeError("echo failed")
            times.append((time.perf_counter() - t0) * 1000)
    except (OSError, RuntimeError) as e:
        print(f"  new connections to port {port} failed after {len(times)}: {e!r}", file=sys.stderr)
        return None
    return times


def socks5_connect(s, host, port):
    """The SOCKS5 greeting (no auth) and CONNECT to host:port on socket s, up to the reply."""
    s.sendall(b"\x05\x01\x00")
    if len(s.recv(2)) != 2:
        raise RuntimeError("socks closed")
    hb = host.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(hb)]) + hb + port.to_bytes(2, "big"))
    r = b""
    while len(r) < 10:
        chunk = s.recv(10 - len(r))
        if not chunk:
            raise RuntimeError("socks closed")
        r += chunk
    if r[1] != 0:
        raise RuntimeError(f"socks reply {r[1]}")


async def open_many(port, n, measure):
    """Opens n connections through a forward, echoes 1 byte on each, calls `measure()` while
    all are open, then closes them."""
    conns, ok = [], 0
    sem = asyncio.Semaphore(512)

    async def one():
        nonlocal ok
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
                w.write(b"x")
                await w.drain()
                if await asyncio.wait_for(r.readexactly(1), 60) == b"x":
                    ok += 1
                conns.append(w)
            except Exception:
                pass

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    took = time.perf_counter() - t0
    await asyncio.sleep(1)
    measured = measure()
    for w in conns:
        w.close()
    await asyncio.sleep(1)
    return ok, took, measured


async def echo10k_server(port, ready, host="127.0.0.1"):
    async def handle(r, w):
        try:
            while True:
                b = await r.read(65536)
                if not b:
                    break
                w.write(b)
                await w.drain()
        except Exception:
            pass
        w.close()

    srv = await asyncio.start_server(handle, host, port, backlog=4096)
    ready.set()
    async with srv:
        await srv.serve_forever()


def rotated(names, rnd):
    """`names` in the order of round `rnd` (from 0): rotated by one each round, so that no chain
    always runs right after the same one, or first in a round."""
    k = rnd % len(names)
    return names[k:] + names[:k]


def med(xs):
    xs = [x for x in xs if x is not None and x == x]  # a failed sample is None (or nan)
    return statistics.median(xs) if xs else float("nan")


def ratio_of(x, y):
    """x / y, or None when either failed."""
    if x is None or y is None or x != x or y != y or not y:
        return None
    return x / y


def vs(xs, ys):
    """`xs` against `ys`, measured in the same rounds: the ratio of the medians, then the
    per-round ratios (min–max) in brackets."""
    per = [q for q in map(ratio_of, xs, ys) if q is not None]
    span = f" ({min(per):.2f}–{max(per):.2f})" if per else ""
    return f"{fmt(ratio_of(med(xs), med(ys)))}×{span}"


def per_round(xs, ys):
    """Per-round ratios x/y as text, and their list (None where one failed)."""
    rs = [ratio_of(x, y) for x, y in zip(xs, ys)]
    return " ".join(fmt(r) for r in rs), rs


def target_lines(header, targets):
    """The targets table: `header` (its first column's title), then one row per (what, value,
    met): `met` a bool (yes / **no**) or a text said as it is."""
    lines = [f"| {header} | value | met |", "|---|---:|---|"]
    for what, value, met in targets:
        said = met if isinstance(met, str) else ("yes" if met else "**no**")
        lines.append(f"| {what} | {fmt(value)} | {said} |")
    return lines


def failures(xs):
    """` (n failed)` when some samples of `xs` failed."""
    n = sum(1 for x in xs if x is None or x != x)
    return f" ({n} failed)" if n else ""


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--echo-server":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        asyncio.run(echo10k_server(int(sys.argv[2]), threading.Event()))
        return
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--mode", choices=["interleaved", "independent"], default="interleaved")
    mode, rest = pre.parse_known_args()
    if mode.mode == "independent":
        import independent
        return independent.main(rest)
    sys.argv[1:] = rest
    ap = argparse.ArgumentParser(description="Interleaved rounds on long-lived processes (the default mode); "
                                             "--mode independent: bench/independent.py",
                                 epilog="Environment: WSTUNNEL=/path/to/wstunnel adds the optional `wstunnel wss` chain "
                                        "(wstunnel is not on crates.io), measured in the same rounds, with TOKIO_WORKER_THREADS "
                                        "= BENCH_THREADS like the gateway roles; BENCH_THREADS: worker threads of the DMZ and "
                                        "the connector (default 1; 0: their default).")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--latency-n", type=int, default=300)
    ap.add_argument("--streams", type=int, default=10000)
    ap.add_argument("--idle-seconds", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.md"))
    ap.add_argument("--only", action="append", default=[],
                    help="with --variants: only this variant (repeatable; v1 ws is always there as the baseline)")
    ap.add_argument("--start-n", dest="start_n", type=int, default=15,
                    help="session starts timed per protocol version (v1 bearer, v2)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also a second chain with the release binaries in DIR (e.g. another branch's), "
                         "measured in the same rounds: `sallyport (baseline)`")
    ap.add_argument("--variants", action="store_true",
                    help="also the inner channel and the HTTP fallback transport (one agent each)")
    ap.add_argument("--smoke", action="store_true",
                    help="CI: one round of 1 s tests, small counts, the debug binaries; figures printed, never asserted; "
                         "fails only when a started process is left behind")
    ap.add_argument("--bin-dir", help="the Sallyport binaries to measure (default target/release; target/debug with --smoke)")
    a = ap.parse_args()
    global BIN
    if a.smoke:
        a.rounds, a.seconds, a.latency_n, a.streams, a.idle_seconds, a.start_n = 1, 1, 30, 200, 2, 2
        if a.out == ap.get_default("out"):
            a.out = str(ROOT / "target" / "bench-smoke.md")
    BIN = Path(a.bin_dir) if a.bin_dir else (ROOT / "target" / "debug" if a.smoke else REL)
    wst_bin = wstunnel_binary()  # before anything starts: a wrong WSTUNNEL ends the run in one line

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    tmp = tempfile.mkdtemp(prefix=f"sallyport-bench-{MARK}-")
    iperf_port, echo_port, echo10k_port = free_port(), free_port(), free_port()
    iperf_srv = Proc("iperf3", ["iperf3", "-s", "-p", str(iperf_port), "-B", "127.0.0.1"], tmp)
    echo_server_thread(echo_port)
    # The 10k-stream echo server runs in its own process: client and server sockets together
    # would exceed the open-file limit of one process (20,000 here).
    echo10k = Proc("echo10k", [sys.executable, __file__, "--echo-server", str(echo10k_port)], tmp)
    time.sleep(0.5)

    sp = Sallyport(tmp, iperf_port, echo_port, echo10k_port)
    idle_rss = sp.agent.rss_mib()
    nginx = NginxChain(tmp, iperf_port)
    rathole = None
    if subprocess.run(["sh", "-c", "command -v rathole"], capture_output=True).returncode == 0:
        rathole = Rathole(tmp, iperf_port)
    # Its processes are registered (Proc) like every other: stop_all ends them on every exit path.
    wst = WstunnelPeer(tmp, wst_bin, iperf_port, echo_port, THREADS) if wst_bin else None

    chains = {"direct": iperf_port, "sallyport": sp.fwd_iperf, "nginx chain": nginx.port}
    if wst:
        chains["wstunnel wss"] = wst.port
    broken_step()
    base = None
    if a.baseline:
        (Path(tmp) / "baseline").mkdir()
        base = Sallyport(Path(tmp) / "baseline", iperf_port, echo_port, echo10k_port, bindir=Path(a.baseline))
        chains["sallyport (baseline)"] = base.fwd_iperf
    if rathole:
        chains["rathole ws (2 hops)"] = rathole.port
    procs = {"sallyport": sp.procs, "nginx chain": nginx.procs}
    if wst:
        procs["wstunnel wss"] = wst.procs
    if base:
        procs["sallyport (baseline)"] = base.procs
    variants = {}
    if a.variants:
        key = sp.inner_key()
        inner = ["--gateway-inner-key", key]
        v1 = "agent-v1.token"
        for name, args, conf, token in [
            ("v1 ws (bearer)", [], "", v1),
            ("v2 ws sealed", [], "[tunnel]\ninner = \"always\"\n", "agent.token"),
            ("v2 http stream sealed", ["--transport", "http"], "", "agent.token"),
            ("v2 http poll sealed", ["--transport", "http"], "[tunnel]\nhttp_mode = \"poll\"\n", "agent.token"),
            ("v1 ws + inner", inner, "", v1),
            ("v1 http stream, no inner", ["--transport", "http"], "", v1),
            ("v1 http stream + inner", inner + ["--transport", "http"], "", v1),
        ]:
            if a.only and name not in a.only and name != "v1 ws (bearer)":
                continue
            slug = re.sub(r"[^a-z0-9]+", "-", name)
            agent, fi, fe = sp.variant(slug, args, conf, token)
            variants[name] = (agent, fi, fe)
            chains[f"sallyport {name}"] = fi
            procs[f"sallyport {name}"] = [agent, sp.dmz, sp.connector]
    if rathole:
        procs["rathole ws (2 hops)"] = rathole.procs
    res = {c: {"up": [], "down": [], "p8": [], "cpu_gb": []} for c in chains}

    print(f"running {a.rounds} interleaved rounds of {a.seconds}s tests...", file=sys.stderr)
    for rnd in range(a.rounds):
        order = rotated(list(chains), rnd)
        for name in order:
            port = chains[name]
            ps = procs.get(name, [])
            c0 = sum(p.cpu() for p in ps)
            gbps, nbytes = iperf(free_port() if BREAK == "iperf" and name == "nginx chain" else port, a.seconds)
            c1 = sum(p.cpu() for p in ps)
            res[name]["up"].append(gbps)
            if ps:
                # None for a failed upload: the list stays one entry per round, so that
                # per-round ratios (vs) pair the same rounds.
                res[name]["cpu_gb"].append((c1 - c0) / (nbytes / 1e9) if nbytes else None)
            res[name]["down"].append(iperf(port, a.seconds, reverse=True)[0])
            res[name]["p8"].append(iperf(port, a.seconds, parallel=8)[0])
        print(f"  round {rnd + 1} ({', '.join(order)}): " + ", ".join(f"{n} {fmt(res[n]['up'][-1])}" for n in chains), file=sys.stderr)
    load_mem = sum(p.hwm_mib() for p in sp.procs)
    per_proc_cpu, per_proc_faults = {}, {}
    for p in sp.procs:
        per_proc_cpu[p.name], per_proc_faults[p.name] = p.cpu(), p.minflt()
    _, nb = iperf(sp.fwd_iperf, a.seconds)
    for p in sp.procs:
        per_proc_cpu[p.name] = (p.cpu() - per_proc_cpu[p.name]) / (nb / 1e9) if nb else float("nan")
        per_proc_faults[p.name] = (p.minflt() - per_proc_faults[p.name]) / (nb / 1e9) if nb else float("nan")

    # Latency, interleaved in blocks.
    lat = {"direct": [], "sallyport forward": [], "sallyport socks5": [], "nginx chain": []}
    nginx_echo = NginxChain(tmp, echo_port, "nginx-echo")
    for _ in range(3):
        lat["direct"].append(latency(echo_port, a.latency_n // 3))
        lat["sallyport forward"].append(latency(sp.fwd_echo, a.latency_n // 3))
        lat["sallyport socks5"].append(latency(sp.socks, a.latency_n // 3, socks_target=("127.0.0.1", echo_port)))
        lat["nginx chain"].append(latency(nginx_echo.port, a.latency_n // 3))
        for name, (_, _, fe) in variants.items():
            lat.setdefault(f"sallyport {name} forward", []).append(latency(fe, a.latency_n // 3))
    nginx_echo.stop()
    lat = {k: (med([x[0] for x in v]), med([x[1] for x in v])) for k, v in lat.items() if v}

    # Session start, v1 bearer against v2: `sallyport doctor` times TCP + TLS + upgrade (+ the
    # v2 handshake) + the tunnel hello for one way out; interleaved, a.start_n each.
    start = {"v1 (bearer)": [], "v2": []}
    for _ in range(a.start_n):
        for label, tok in (("v1 (bearer)", "agent-v1.token"), ("v2", "agent.token")):
            # One failed sample is skipped, never the end of the run.
            try:
                _, out = Child([str(sp.agent_bin), "doctor", "--gateway", sp.url, "--token-file", str(Path(tmp) / tok),
                                "--ca", str(Path(tmp) / "ca.crt"), "--proxy", "direct"], timeout=60, env={"HOME": str(tmp)}).run()
            except (subprocess.TimeoutExpired, OSError):
                continue
            m = re.search(r"ok in ([0-9.]+) (ms|s)", out)
            if m:
                start[label].append(float(m.group(1)) * (1000.0 if m.group(2) == "s" else 1.0))

    # 10,000 concurrent streams through one agent session.
    before = {p.name: p.rss_mib() for p in sp.procs}
    ok, took, after = asyncio.run(open_many(sp.fwd_10k, a.streams, lambda: {p.name: p.rss_mib() for p in sp.procs}))
    time.sleep(2)
    base_streams = None
    if base:
        b0 = {p.name: p.rss_mib() for p in base.procs}
        bok, btook, b1 = asyncio.run(open_many(base.fwd_10k, a.streams, lambda: {p.name: p.rss_mib() for p in base.procs}))
        base_streams = (bok, btook, b0, b1)
        time.sleep(2)

    # Idle agent.
    sw0 = sp.agent.ctx_switches()
    c0 = sp.agent.cpu()
    time.sleep(a.idle_seconds)
    wake_per_min = (sp.agent.ctx_switches() - sw0) * 60 / a.idle_seconds
    idle_cpu = sp.agent.cpu() - c0

    for agent, _, _ in variants.values():
        agent.stop()
    for x in ([sp, nginx] + ([rathole] if rathole else []) + ([wst] if wst else []) + ([base] if base else [])):
        x.stop()
    iperf_srv.stop()
    echo10k.stop()

    d = res["direct"]
    lines = []
    lines.append(f"Machine: {os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
                 f"{a.rounds} interleaved rounds of {a.seconds} s, the order rotated each round, medians"
                 + (f"; {version(wst_bin)}, {THREADS or 'default'} worker(s) per process" if wst else "") + ".")
    lines.append("")
    lines.append("| chain | 1 stream up Gbit/s | 1 stream down | 8 streams | CPU s/GB (all processes) |")
    lines.append("|---|---:|---:|---:|---:|")
    for n in chains:
        r = res[n]
        def ratio(k):
            if med(r[k]) != med(r[k]):
                return "failed"
            return f"{fmt(med(r[k]))} ({fmt(ratio_of(med(r[k]), med(d[k])))}× direct){failures(r[k])}"
        cpu = fmt(med(r['cpu_gb'])) if r["cpu_gb"] else "–"
        lines.append(f"| {n} | {ratio('up')} | {ratio('down')} | {ratio('p8')} | {cpu} |")
    ng = res["nginx chain"]
    s = res["sallyport"]
    if variants:
        # The baseline: v1's plain WebSocket (bearer token), the transport before v2.
        base_name = "sallyport v1 ws (bearer)"
        b = res[base_name]
        lines.append("")
        lines.append("| transport (vs v1 plain WebSocket, same run: ratio of medians; per-round ratios min–max) | 1 stream up | 1 stream down | 8 streams |")
        lines.append("|---|---:|---:|---:|")

        def cell(r, k):
            return vs(r[k], b[k])
        rows = ["sallyport"] + [f"sallyport {n}" for n in variants if f"sallyport {n}" != base_name]
        for name in rows:
            r = res[name]
            label = "v2 outer (default: exporter matches)" if name == "sallyport" else name.removeprefix("sallyport ")
            lines.append(f"| {label} | " + " | ".join(cell(r, k) for k in ("up", "down", "p8")) + " |")
    lines.append("")
    lines.append(f"sallyport vs nginx chain (ratio of medians, per-round min–max): up {vs(s['up'], ng['up'])}, down {vs(s['down'], ng['down'])}, "
                 f"8 streams {vs(s['p8'], ng['p8'])}, CPU per GB {vs(s['cpu_gb'], ng['cpu_gb'])}; CPU per GB by process: "
                 + ", ".join(f"{k} {fmt(v)}" for k, v in per_proc_cpu.items())
                 + "; page faults per GB by process (fresh pages, each zeroed by the kernel): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in per_proc_faults.items()))
    if wst:
        w = res["wstunnel wss"]
        lines.append("")
        lines.append(f"sallyport vs wstunnel wss (ratio of medians, per-round min–max): up {vs(s['up'], w['up'])}, "
                     f"down {vs(s['down'], w['down'])}, 8 streams {vs(s['p8'], w['p8'])}, CPU per GB {vs(s['cpu_gb'], w['cpu_gb'])}")
    lines.append("")
    lines += target_lines("target (issue 21), this run: ratio of medians; worst = the lowest per-round ratio",
                          targets(res, wst is not None))
    lines.append("")
    lines.append("| session start (doctor: TCP + TLS + upgrade + handshake + hello, loopback) | median ms | samples |")
    lines.append("|---|---:|---:|")
    for k, v in start.items():
        lines.append(f"| {k} | {fmt(med(v), '.1f')} | {len(v)} |")
    lines.append("")
    lines.append("| new connection (connect + 1-byte echo + close) | median ms | p99 ms | median vs direct |")
    lines.append("|---|---:|---:|---:|")
    for k, (m, p) in lat.items():
        lines.append(f"| {k} | {fmt(m, '.3f')} | {fmt(p, '.3f')} | {fmt(ratio_of(m, lat['direct'][0]), '.1f')}× |")
    lines.append("")
    per_stream = {k: (after[k] - before[k]) * 1024 / max(ok, 1) for k in after}
    lines.append(f"| {a.streams} concurrent streams, one agent session | value |")
    lines.append("|---|---:|")
    lines.append(f"| success | {ok}/{a.streams} ({100.0 * ok / a.streams:.1f} %) |")
    lines.append(f"| time to open all (each with a 1-byte echo) | {took:.2f} s |")
    for k in after:
        lines.append(f"| {k} resident with all open | {after[k]:.1f} MiB ({per_stream[k]:.1f} KiB per stream) |")
    if base_streams:
        bok, btook, b0, b1 = base_streams
        lines.append(f"| baseline ({a.baseline}): success, time | {bok}/{a.streams}, {btook:.2f} s |")
        for k in b1:
            lines.append(f"| baseline {k} resident with all open | {b1[k]:.1f} MiB ({(b1[k] - b0[k]) * 1024 / max(bok, 1):.1f} KiB per stream) |")
    if base:
        r, b = res["sallyport"], res["sallyport (baseline)"]
        lines.append("")
        lines.append("| sallyport vs baseline, same run (ratio of medians; per-round min–max) | 1 stream up | 1 stream down | 8 streams | CPU s/GB |")
        lines.append("|---|---:|---:|---:|---:|")

        lines.append("| sallyport / baseline | " + " | ".join(vs(r[k], b[k]) for k in ("up", "down", "p8", "cpu_gb")) + " |")
    lines.append("")
    lines.append("| other | value |")
    lines.append("|---|---:|")
    lines.append(f"| memory under the 8-stream load, three processes (peak RSS) | {load_mem:.1f} MiB |")
    lines.append(f"| idle agent resident (fresh, one session) | {idle_rss:.1f} MiB |")
    lines.append(f"| idle agent wake-ups (context switches) per minute | {wake_per_min:.0f} |")
    lines.append(f"| idle agent CPU over {a.idle_seconds} s | {idle_cpu:.3f} s |")
    write_table(lines, a.out)


def targets(res, with_wstunnel):
    """The issue's targets for `sallyport` in the interleaved rounds: (what, value, met) rows for
    target_lines. Each median is the ratio of the medians (as in the `vs` lines), each worst round
    the lowest per-round ratio."""
    s, ng = res["sallyport"], res["nginx chain"]
    out = []
    for key, what in (("up", "1 stream up"), ("down", "1 stream down"), ("p8", "8 streams")):
        m = ratio_of(med(s[key]), med(ng[key]))
        out.append((f"{what}: median ≥ 1.1× nginx chain", m, m is not None and m >= 1.1))
        per = [r for r in per_round(s[key], ng[key])[1] if r is not None]
        worst = min(per) if per else None
        out.append((f"{what}: worst round ≥ 1.0× nginx chain", worst, worst is not None and worst >= 1.0))
        if with_wstunnel:
            m = ratio_of(med(s[key]), med(res["wstunnel wss"][key]))
            out.append((f"{what}: median ≥ 1.0× wstunnel wss", m, m is not None and m >= 1.0))
    m = ratio_of(med(s["cpu_gb"]), med(ng["cpu_gb"]))
    out.append(("CPU per GB ≤ 0.85× nginx chain (median)", m, m is not None and m <= 0.85))
    return out


def write_table(lines, out):
    """Prints the result table and writes it to `out`."""
    table = "\n".join(lines)
    print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(table + "\n")
    print(f"\nwritten to {out}", file=sys.stderr)


# A deliberately broken step, for bench/selfcheck.sh: `raise` (an exception once every chain is
# up), `hang` (waits there for a signal), `iperf` (the nginx chain's upload test goes to a port
# nobody listens on: a failed cell), `leak` (a process the registry does not know: the run must
# name it and fail).
BREAK = os.environ.get("BENCH_BREAK", "")


class BrokenStep(BaseException):
    """The deliberate failure of BENCH_BREAK=raise: a BaseException, so that no `except
    Exception` of a measurement takes it for a failed sample."""


def broken_step():
    if BREAK == "raise":
        raise BrokenStep("BENCH_BREAK=raise: a deliberately broken step")
    if BREAK == "leak":
        spawn(["sleep", "600"])  # not registered: the leftover check must name it
    if BREAK == "hang":
        print("BENCH_BREAK=hang: every chain is up, waiting for a signal", file=sys.stderr, flush=True)
        time.sleep(3600)


def _on_signal(sig, _frame):
    """The first SIGINT/SIGTERM/SIGHUP ends the run through the `finally` of run_guarded (which
    ends every started process); later ones are ignored so that nothing interrupts that."""
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    raise SystemExit(128 + sig)


def run_guarded(main):
    """Runs `main` so that every process started is ended: on return, on an exception, on
    Ctrl-C and on SIGTERM/SIGHUP. Exits 1 naming any process of this run still alive after that."""
    import atexit
    atexit.register(stop_all)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        main()
    finally:
        stop_all()
        # Only the benchmark itself looks: its helpers (echo servers, clients) run this module too.
        left = [] if os.environ.get("SALLYPORT_BENCH_CHILD") else leftovers()
        if left:
            named = []
            for pid in left:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
                    named.append(f"{pid} {cmd}")
                except FileNotFoundError:
                    named.append(str(pid))
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            print(f"bench: processes left behind (now killed): {'; '.join(named)}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    # One copy of this module's state (the process registry, the mark): bench/independent.py
    # imports it as `run`, so the script runs that module rather than a second `__main__` copy.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as this
    this.run_guarded(this.main)
