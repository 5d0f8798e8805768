#!/usr/bin/env python3
"""Idle desktops per DMZ instance (issue 21): what an idle agent session costs the DMZ.

    bench/idle.sh                          # builds release, runs this
    bench/idle.sh --steps 1000,2000 --idle 120
    bench/idle.sh --gateway-bin old=/path/to/old/sallyport-gateway   # compare builds, same run

For each gateway binary (this build's, plus any `--gateway-bin LABEL=PATH`, in turn): a fresh
release DMZ (TLS, default threads) and a connector on loopback; the DMZ's resident memory
(VmRSS) with the connector only; then `sp-idle` (one process, real agent sessions: TLS,
upgrade, protocol v2 handshake, hello) brings the count to each step, and the DMZ's VmRSS is
read after a settling pause. KiB per session = (RSS at the step - RSS before) / sessions.
At the last step the sessions stay idle for `--idle` seconds (only the tunnel's PING/PONG
every 20 s each way) and the DMZ's CPU time over that span gives CPU per idle session per
minute. Nothing is asserted. Every process started is ended on every exit path.

Writes bench/results/idle.md and prints it.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REL = ROOT / "target" / "release"
sys.path.insert(0, str(ROOT / "bench"))
import run as bench  # noqa: E402  (bench/run.py: the process registry, ended on every exit path)


def rss_kib(proc):
    return bench.status_of(proc.p.pid, "VmRSS")


def measure(label, gw, t, steps, idle, settle, threads, burst, quiet_wait):
    """One gateway binary: RSS before and at each step, CPU over `idle` s at the last one, RSS
    after one burst per session (`burst` bytes echoed; 0: none), `settle` s after it and again
    `quiet_wait` s later (0: not again)."""
    d = t / label
    d.mkdir()
    bench.run([str(gw), "cert", "--name", "127.0.0.1", "--out", str(d)])
    bench.run([str(gw), "token", "new", "--kind", "agent", "--id", "desk", "--tokens", str(d / "agents.toml"),
         "--out", str(d / "agent.token")])
    bench.run([str(gw), "token", "new", "--kind", "connector", "--id", "site", "--route", "127.0.0.1/32:*",
         "--tokens", str(d / "connectors.toml"), "--out", str(d / "connector.token")])
    # One token for every session (per-token state is counted once, not per session): its
    # session limit, its rate of new streams (every session's burst opens one at once) and the
    # address's handshake rate are raised, nothing else.
    (d / "dmz.toml").write_text(f"""listen = "127.0.0.1:0"
tls_cert = "gateway.crt"
tls_key = "gateway.key"
agent_tokens = "agents.toml"
connector_tokens = "connectors.toml"
[limits]
sessions_per_agent_token = 100000
opens_per_token = 100000.0
handshakes_per_ip = 100000.0
max_connections = {max(steps) + 1000}
""")
    targs = ["--threads", str(threads)] if threads else []
    dmz = bench.Proc("dmz", [str(gw), "dmz", "-c", str(d / "dmz.toml"), "--log", "warn,gateway::dmz=info"] + targs, d)
    port = int(dmz.wait_for(r"dmz gateway listening addr=127\.0\.0\.1:(\d+)").group(1))
    url = f"wss://127.0.0.1:{port}/"
    echo = bench.Proc("echo", [str(REL / "sp-testsvc"), "echo", "127.0.0.1:0"], d)
    echo_port = int(echo.wait_for(r"listening addr=127\.0\.0\.1:(\d+)").group(1))
    conn = bench.Proc("connector", [str(gw), "connector", "--gateway", url, "--token-file", str(d / "connector.token"),
                                    "--ca", str(d / "ca.crt"), "--allow", f"127.0.0.1/32:{echo_port}",
                                    "--log", "warn,uplink=info"], d)
    conn.wait_for("connected to the gateway")
    time.sleep(settle)
    base = rss_kib(dmz)
    # Baseline CPU of the DMZ with no agent session (timers, the token file reload).
    c0, w0 = dmz.cpu(), time.time()
    time.sleep(10)
    base_cpu_per_min = (dmz.cpu() - c0) / (time.time() - w0) * 60
    client = bench.Proc("sp-idle", [str(REL / "sp-idle"), "--gateway", url, "--token-file", str(d / "agent.token"),
                                    "--ca", str(d / "ca.crt"), "--steps", ",".join(map(str, steps)),
                                    "--max-seconds", str(int(idle) + 600)]
                        + (["--burst-to", f"127.0.0.1:{echo_port}", "--burst", str(burst)] if burst else []),
                        d, pipes=True)
    rows = []
    for i, n in enumerate(steps):
        line = client.p.stdout.readline()
        if not line:
            raise RuntimeError("sp-idle ended early:\n" + client.log_path.read_text()[-2000:])
        st = json.loads(line)
        time.sleep(settle)
        rss = rss_kib(dmz)
        row = {"sessions": st["sessions"], "alive": st["alive"], "failed": st["failed"],
               "up_s": st["took_s"], "rss_kib": rss,
               "kib_per_session": (rss - base) / max(1, st["sessions"])}
        if i == len(steps) - 1:
            c0, w0 = dmz.cpu(), time.time()
            time.sleep(idle)
            span = time.time() - w0
            used = dmz.cpu() - c0
            row["idle_s"] = span
            row["cpu_s"] = used
            per_min = (used / span * 60 - base_cpu_per_min)
            row["cpu_ms_per_session_min"] = per_min / max(1, st["sessions"]) * 1000
            row["rss_after_idle_kib"] = rss_kib(dmz)
        rows.append(row)
        print(f"  {label}: {json.dumps(row)}", flush=True)
        client.p.stdin.write("next\n")
        client.p.stdin.flush()
    after = None
    if burst:
        b = json.loads(client.p.stdout.readline() or "{}")
        time.sleep(settle)
        rss = rss_kib(dmz)
        n = rows[-1]["sessions"]
        after = {"ok": b.get("ok"), "failed": b.get("failed"), "took_s": b.get("took_s"), "rss_kib": rss,
                 "kib_per_session": (rss - base) / max(1, n)}
        if b.get("failed"):
            print(f"  {label}: {b['failed']} bursts failed; sp-idle said:\n" + client.log_path.read_text()[-1500:],
                  file=sys.stderr, flush=True)
        if quiet_wait:
            time.sleep(quiet_wait)
            rss = rss_kib(dmz)
            after.update({"quiet_rss_kib": rss, "quiet_kib_per_session": (rss - base) / max(1, n)})
        print(f"  {label} after a burst of {burst} bytes per session: {json.dumps(after)}", flush=True)
        client.p.stdin.write("next\n")
        client.p.stdin.flush()
    client.p.stdin.close()
    client.p.wait(30)
    end = json.loads(client.p.stdout.readlines()[-1])
    for p in (client, conn, echo, dmz):
        p.stop()
    return {"label": label, "base_kib": base, "base_cpu_s_per_min": base_cpu_per_min, "rows": rows,
            "alive_at_end": end.get("alive"), "after_burst": after}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="1000,2000", help="sessions in total after each step")
    ap.add_argument("--idle", type=float, default=90, help="seconds of idle at the last step (CPU)")
    ap.add_argument("--settle", type=float, default=3, help="seconds before each RSS reading")
    ap.add_argument("--burst", type=int, default=256 * 1024,
                    help="bytes each session echoes after the last step, then RSS again (0: no burst)")
    ap.add_argument("--quiet-wait", type=float, default=35,
                    help="seconds after the burst's first RSS reading before a second one: the gateway gives freed "
                         "memory back at its first 15 s quiet check after a transfer (0: no second reading)")
    ap.add_argument("--threads", type=int, default=0, help="DMZ worker threads (0: its default)")
    ap.add_argument("--gateway-bin", action="append", default=[], metavar="LABEL=PATH",
                    help="another sallyport-gateway to measure in the same run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "idle.md"))
    a = ap.parse_args()
    steps = sorted(int(s) for s in a.steps.split(","))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(steps) + 1024
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want), hard))
        except (ValueError, OSError):
            pass
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fit = [s for s in steps if s + 1024 <= soft]
    if fit != steps:
        print(f"open-file limit {soft}: steps {sorted(set(steps) - set(fit))} left out", flush=True)
        steps = fit or [max(1, soft - 1024)]
    bins = [("this build", REL / "sallyport-gateway")]
    for spec in a.gateway_bin:
        label, _, path = spec.partition("=")
        bins.append((label, Path(path)))
    results = []
    with tempfile.TemporaryDirectory(prefix="sp-idle-") as tmp:
        for i, (label, gw) in enumerate(bins):
            results.append(measure(f"{i}", gw, Path(tmp), steps, a.idle, a.settle, a.threads, a.burst,
                                   a.quiet_wait))
            results[-1]["label"] = label
    out = ["# Idle sessions", "",
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, loopback, "
           f"release build, one agent token, DMZ threads: {a.threads or 'default'}.", "",
           "| gateway | sessions | up in | DMZ RSS before | DMZ RSS | KiB / session | CPU ms / session / min | 50,000 sessions |",
           "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            cpu = f"{row['cpu_ms_per_session_min']:.3f}" if "cpu_ms_per_session_min" in row else ""
            gb = row["kib_per_session"] * 50000 / 1024 / 1024
            failed = f" ({row['failed']} failed)" if row["failed"] else ""
            out.append(f"| {r['label']} | {row['sessions']}{failed} | {row['up_s']:.1f} s | {r['base_kib'] / 1024:.1f} MiB "
                       f"| {row['rss_kib'] / 1024:.1f} MiB | {row['kib_per_session']:.1f} | {cpu} | {gb:.2f} GiB |")
    if a.burst:
        out += ["", f"After one burst per session ({a.burst} bytes echoed through the connector), idle again:", "",
                f"| gateway | sessions | bursts ok | DMZ RSS, {a.settle:g} s after | KiB / session "
                f"| DMZ RSS, {a.settle + a.quiet_wait:g} s after | KiB / session | 50,000 sessions, the latter |",
                "|---|---|---|---|---|---|---|---|"]
        for r in results:
            b = r["after_burst"]
            if b:
                last = b.get("quiet_kib_per_session", b["kib_per_session"])
                gb = last * 50000 / 1024 / 1024
                quiet = (f"{b['quiet_rss_kib'] / 1024:.1f} MiB | {b['quiet_kib_per_session']:.1f}"
                         if "quiet_rss_kib" in b else "– | –")
                out.append(f"| {r['label']} | {r['rows'][-1]['sessions']} | {b['ok']} | {b['rss_kib'] / 1024:.1f} MiB "
                           f"| {b['kib_per_session']:.1f} | {quiet} | {gb:.2f} GiB |")
    text = "\n".join(out) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    bench.run_guarded(main)
