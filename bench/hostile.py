#!/usr/bin/env python3
"""Sallyport under attack (issue 13): a DMZ gateway with its DEFAULT limits (TLS), a connector
and an internal HTTP service on loopback. One address (127.0.0.2, `sp-attack`) attacks at the
highest rate the default limits allow (`handshakes_per_ip` = 20/s, `handshake_burst` 64), mixing stalled
fallback bodies, slowloris heads, pre-auth inner-channel floods, and a PING flood from an
authenticated session that never reads. Meanwhile a legitimate agent (127.0.0.1) is started
fresh, connects and moves 20 MiB through SOCKS5 (hash-checked), and is stopped: `--rounds`
times under attack and as many times without, interleaved in the same run (A Q, Q A, A Q, ...).

    bench/hostile.sh                 # installs curl if missing, builds release, runs this
    bench/hostile.sh --rounds 5 --alone 0

Per round: success, connect time (process start -> its "connected to the gateway" log line, by
the line's own timestamp), the first request through SOCKS (time since process start, and
curl's own time_total), a TLS /healthz probe from 127.0.0.1 just before the agent starts, and
the 20 MiB transfer time. Also the DMZ's resident memory and CPU, and the attacker's achieved
rates. With `--alone N`, each attack is also played alone for N rounds.

Writes the table to bench/results/hostile.md and prints it. Nothing here asserts: a failed
sample is recorded and the run goes on. Every process started is ended (own process groups).
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REL = ROOT / "target" / "release"
GW = REL / "sallyport-gateway"
AGENT = REL / "sallyport"
ATTACK = REL / "sp-attack"
TESTSVC = REL / "sp-testsvc"
GOAL_CONNECT_S = 2.0
KINDS = ["body", "slowloris", "inner", "ping"]

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the one process registry: bench/run.py)


def spawn(args, log_path, env=None, stdout=None):
    """A child through bench/run.py's registry (its own process group, marked, dies with the
    benchmark, ended on every exit path), stderr to `log_path`."""
    log_path = Path(log_path)
    return bench.Proc(log_path.stem, args, log_path.parent, env=env, stdout=stdout)


def stop(p, grace=3.0):
    p.stop(grace)


def wait_for(p, pattern, timeout):
    """The first match of `pattern` in p's log, and when it was seen; None on timeout/exit."""
    try:
        return p.wait_for(pattern, timeout), time.time()
    except RuntimeError:
        return None


# One reader of /proc and one `run` for every benchmark: bench/run.py's.
status_kb, run = bench.status_of, bench.run


def log_ts(line):
    """The UTC timestamp tracing puts first on a log line, as epoch seconds."""
    m = re.match(r"\s*(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z", line)
    if not m:
        return None
    text = m.group(1)
    if "." in text:
        head, frac = text.split(".")
        text = f"{head}.{frac[:6]}"
        fmt = "%Y-%m-%dT%H:%M:%S.%f"
    else:
        fmt = "%Y-%m-%dT%H:%M:%S"
    return datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.timezone.utc).timestamp()


def curl(args, timeout):
    """(ok, time_total or None, stderr)"""
    try:
        r = subprocess.run(["curl", "-sS", "--max-time", str(timeout), "-w", "%{time_total}"] + args,
                           capture_output=True, text=True, timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return False, None, "timeout"
    try:
        t = float(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else None
    except ValueError:
        t = None
    return r.returncode == 0, t, r.stderr.strip()[-300:]


class Setup:
    def __init__(self, tmp, plain):
        self.tmp = t = Path(tmp)
        self.plain = plain
        run([str(GW), "cert", "--name", "127.0.0.1", "--out", str(t)])
        run([str(GW), "token", "new", "--kind", "agent", "--id", "alice-laptop", "--name", "alice",
             "--tokens", str(t / "agents.toml"), "--out", str(t / "legit.token")])
        run([str(GW), "token", "new", "--kind", "agent", "--id", "mallory", "--name", "mallory",
             "--tokens", str(t / "agents.toml"), "--out", str(t / "rogue.token")])
        run([str(GW), "token", "new", "--kind", "connector", "--id", "site-a", "--route", "*.internal:*",
             "--tokens", str(t / "connectors.toml"), "--out", str(t / "connector.token")])
        tls = "" if plain else 'tls_cert = "gateway.crt"\ntls_key = "gateway.key"\n'
        # No [limits]: the defaults are what is measured.
        (t / "dmz.toml").write_text(f'listen = "127.0.0.1:0"\n{tls}agent_tokens = "agents.toml"\n'
                                    f'connector_tokens = "connectors.toml"\n')
        self.svc = spawn([str(TESTSVC), "http", "127.0.0.1:0"], t / "svc.log")
        m = wait_for(self.svc, r"listening addr=127\.0\.0\.1:(\d+)", 10)
        if not m:
            raise RuntimeError("sp-testsvc did not start: " + self.svc.log_path.read_text())
        self.svc_port = int(m[0].group(1))
        dmz_args = [str(GW), "dmz", "-c", str(t / "dmz.toml")] + (["--plain"] if plain else [])
        self.dmz = spawn(dmz_args, t / "dmz.log")
        m = wait_for(self.dmz, r"dmz gateway listening addr=127\.0\.0\.1:(\d+)", 20)
        if not m:
            raise RuntimeError("dmz did not start: " + self.dmz.log_path.read_text()[-3000:])
        self.port = int(m[0].group(1))
        self.url = f"{'ws' if plain else 'wss'}://127.0.0.1:{self.port}/"
        self.connector = spawn([str(GW), "connector", "--gateway", self.url, "--token-file", str(t / "connector.token"),
                                "--ca", str(t / "ca.crt"), "--host", "backend.internal=127.0.0.1",
                                "--allow", f"backend.internal:{self.svc_port}", "--allow", f"127.0.0.1/32:{self.svc_port}"],
                               t / "connector.log")
        if not wait_for(self.connector, "connected to the gateway", 20):
            raise RuntimeError("connector did not connect: " + self.connector.log_path.read_text()[-3000:])
        time.sleep(0.5)


def attacker(setup, kinds, seconds, rate, burst, idx, ping_sessions=1):
    t = setup.tmp
    args = [str(ATTACK), "run", "--gateway", f"127.0.0.1:{setup.port}", "--source", "127.0.0.2",
            "--token-file", str(t / "rogue.token"), "--duration", str(seconds), "--rate", str(rate),
            "--burst", str(burst), "--kinds", ",".join(kinds), "--ping-sessions", str(ping_sessions)]
    args += ["--plain"] if setup.plain else ["--ca", str(t / "ca.crt")]
    out = open(t / f"attack-{idx}.json", "w")
    p = spawn(args, t / f"attack-{idx}.log", stdout=out)
    p.out_file, p.out_path = out, t / f"attack-{idx}.json"
    return p


def attacker_result(p):
    """Stops the attacker (SIGTERM: it prints its counts) and reads them."""
    stop(p, grace=5)
    p.out_file.close()
    try:
        return json.loads(p.out_path.read_text().strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None


def legit_round(setup, idx, nbytes, want_sha, connect_timeout=20):
    """Starts a fresh agent, measures, moves nbytes, stops it. Never raises."""
    t = setup.tmp
    r = {"ok": False, "connect_s": None, "first_req_s": None, "first_req_curl_s": None,
         "healthz_s": None, "transfer_s": None, "error": None}
    if setup.plain:
        probe = ["-o", "/dev/null", f"http://127.0.0.1:{setup.port}/healthz"]
    else:
        probe = ["--cacert", str(t / "ca.crt"), "-o", "/dev/null", f"https://127.0.0.1:{setup.port}/healthz"]
    ok, tt, err = curl(probe, 10)
    r["healthz_s"] = tt if ok else None
    home = t / f"home-{idx}"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    for k in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]:
        os.environ.pop(k, None)
    t0 = time.time()
    agent = spawn([str(AGENT), "run", "--gateway", setup.url, "--token-file", str(t / "legit.token"),
                   "--ca", str(t / "ca.crt"), "--socks", "127.0.0.1:0", "--http", "off", "--log", "info"],
                  t / f"agent-{idx}.log", env=env)
    try:
        m = wait_for(agent, r'front="socks5" addr=127\.0\.0\.1:(\d+)', connect_timeout)
        if not m:
            r["error"] = "no SOCKS port"
            return r
        socks = f"127.0.0.1:{m[0].group(1)}"
        base = f"http://backend.internal:{setup.svc_port}"
        ok, tt, err = curl(["-o", "/dev/null", "--socks5-hostname", socks, base + "/"], connect_timeout)
        if ok:
            r["first_req_s"], r["first_req_curl_s"] = time.time() - t0, tt
        m = wait_for(agent, r"(?m)^.*connected to the gateway.*$", connect_timeout)
        if m:
            at = log_ts(m[0].group(0))
            r["connect_s"] = (at - t0) if at is not None else (m[1] - t0)
        if not ok:
            r["error"] = f"first request failed: {err}"
            return r
        if r["connect_s"] is None:
            r["error"] = "never logged connected"
            return r
        out = t / f"transfer-{idx}.bin"
        ok, tt, err = curl(["-o", str(out), "--socks5-hostname", socks, f"{base}/bytes/{nbytes}"], 120)
        if not ok:
            r["error"] = f"transfer failed: {err}"
            return r
        h = hashlib.sha256()
        with open(out, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out.unlink()
        if h.hexdigest() != want_sha:
            r["error"] = "hash mismatch"
            return r
        r["transfer_s"] = tt
        r["ok"] = True
        return r
    except Exception as e:  # a benchmark never dies on one sample
        r["error"] = f"{type(e).__name__}: {e}"
        return r
    finally:
        stop(agent)


med = bench.med  # the median of the samples that did not fail


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def fmt(x, unit="", nd=3):
    return "–" if x is None or x != x else f"{x:.{nd}f}{unit}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20, help="rounds under attack (and as many quiet)")
    ap.add_argument("--mib", type=int, default=20)
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of attack before the agent starts")
    ap.add_argument("--rate", type=float, default=20.0, help="attack connections per second (default: handshakes_per_ip)")
    ap.add_argument("--burst", type=int, default=64)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--ping-sessions", type=int, default=1,
                    help="PING-flooding sessions of the attacker's token (sessions_per_agent_token allows 16)")
    ap.add_argument("--alone", type=int, default=2, help="rounds of each attack alone, after the main run")
    ap.add_argument("--plain", action="store_true", help="the DMZ without TLS (as behind a TLS-terminating balancer)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "hostile.md"))
    a = ap.parse_args()

    for b in (GW, AGENT, ATTACK, TESTSVC):
        if not b.exists():
            sys.exit(f"missing {b}: run bench/hostile.sh (it builds the release binaries)")
    kinds = [k for k in a.kinds.split(",") if k]
    tmp = tempfile.mkdtemp(prefix="sallyport-hostile-")
    nbytes = a.mib * 1024 * 1024
    want = run([str(ATTACK), "pattern-sha256", str(nbytes)]).stdout.strip()
    s = Setup(tmp, a.plain)
    dmz_pid = s.dmz.p.pid
    rss0 = status_kb(dmz_pid, "VmRSS") / 1024
    print(f"DMZ on {s.url} (default limits, {'plain' if a.plain else 'TLS'}), pid {dmz_pid}, {rss0:.1f} MiB resident; "
          f"logs in {tmp}", file=sys.stderr)

    results = {"attacked": [], "quiet": []}
    attacks = []
    dmz_cpu = {"attacked": 0.0, "quiet": 0.0}
    dmz_wall = {"attacked": 0.0, "quiet": 0.0}
    rss_max = rss0
    idx = 0

    def one(mode, kinds_now, label):
        nonlocal idx, rss_max
        idx += 1
        c0, w0 = s.dmz.cpu(), time.time()
        att = None
        if mode == "attacked":
            att = attacker(s, kinds_now, a.warmup + 120, a.rate, a.burst, idx, a.ping_sessions)
            time.sleep(a.warmup)
        r = legit_round(s, idx, nbytes, want)
        if att is not None:
            rss_max = max(rss_max, status_kb(dmz_pid, "VmRSS") / 1024)
            res = attacker_result(att)
            r["attack"] = res
        dmz_cpu_s = s.dmz.cpu() - c0
        wall = time.time() - w0
        r["dmz_cpu_share"] = dmz_cpu_s / wall if wall > 0 else None
        print(f"  {label:>14} {idx:3d}: {'ok ' if r['ok'] else 'FAIL'} connect {fmt(r['connect_s'], ' s')}, "
              f"first request {fmt(r['first_req_s'], ' s')}, {a.mib} MiB in {fmt(r['transfer_s'], ' s')}, "
              f"healthz {fmt(r['healthz_s'], ' s')}, DMZ CPU {fmt(r['dmz_cpu_share'], '', 2)}"
              + (f"  [{r['error']}]" if r["error"] else "")
              + (f"  attack: {r['attack']['conn_per_s_after_burst']:.1f} conn/s, {r['attack']['pings_per_s']:.0f} PING/s"
                 if r.get("attack") else ""),
              file=sys.stderr)
        if mode == "attacked" and not r.get("attack"):
            print(f"    attacker gave no counts: {att.log_path.read_text(errors='replace')[-500:]}", file=sys.stderr)
        # Let the gateway drop the attacker's connections before the next round.
        time.sleep(1.0)
        return r, dmz_cpu_s, wall

    print(f"{a.rounds} attacked and {a.rounds} quiet rounds, interleaved (A Q, Q A, ...)", file=sys.stderr)
    for i in range(a.rounds):
        order = ["attacked", "quiet"] if i % 2 == 0 else ["quiet", "attacked"]
        for mode in order:
            r, c, w = one(mode, kinds, mode)
            results[mode].append(r)
            dmz_cpu[mode] += c
            dmz_wall[mode] += w
    alone = {}
    for k in kinds if a.alone > 0 else []:
        alone[k] = [one("attacked", [k], f"{k} alone")[0] for _ in range(a.alone)]
    rss1 = status_kb(dmz_pid, "VmRSS") / 1024
    hwm = status_kb(dmz_pid, "VmHWM") / 1024
    dmz_alive = s.dmz.p.poll() is None
    bench.stop_all()

    # ------------------------------------------------------------------------------------------
    A, Q = results["attacked"], results["quiet"]

    def col(rs, k):
        return [r[k] for r in rs if r["ok"]]

    def goal_ok(r):
        return r["ok"] and r["connect_s"] is not None and r["connect_s"] <= GOAL_CONNECT_S

    lines = []
    lines.append(f"Machine: {os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}; "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; DMZ {'plain' if a.plain else 'TLS'}, default limits "
                 f"and threads; {a.rounds} attacked + {a.rounds} quiet rounds interleaved, {a.mib} MiB each; "
                 f"attack: {','.join(kinds)} ({a.ping_sessions} PING session{'s' if a.ping_sessions > 1 else ''}) at {a.rate:g} conn/s (burst {a.burst}) from 127.0.0.2, "
                 f"{a.warmup:g} s before each agent start.")
    lines.append("")
    lines.append("| | under attack | quiet | attacked / quiet (medians) | per-round ratio (median) |")
    lines.append("|---|---:|---:|---:|---:|")

    def ratio_pairs(k):
        rs = [x[k] / y[k] for x, y in zip(A, Q) if x["ok"] and y["ok"] and x[k] and y[k]]
        return med(rs)

    lines.append(f"| success (connected, first request, {a.mib} MiB hash-checked) | {sum(r['ok'] for r in A)}/{len(A)} | "
                 f"{sum(r['ok'] for r in Q)}/{len(Q)} | | |")
    lines.append(f"| goal met (success and connect ≤ {GOAL_CONNECT_S:g} s) | {sum(goal_ok(r) for r in A)}/{len(A)} | "
                 f"{sum(goal_ok(r) for r in Q)}/{len(Q)} | | |")
    rows = [
        ("connect, process start → \"connected\" log line: median s", "connect_s", med),
        ("connect: p90 s", "connect_s", lambda x: pct(x, 0.9)),
        ("connect: max s", "connect_s", lambda x: max(x) if x else float("nan")),
        ("first request through SOCKS, since process start: median s", "first_req_s", med),
        ("first request: max s", "first_req_s", lambda x: max(x) if x else float("nan")),
        ("first request, curl time_total: median s", "first_req_curl_s", med),
        ("TLS /healthz probe from 127.0.0.1 (curl time_total): median s", "healthz_s", med),
        ("healthz probe: max s", "healthz_s", lambda x: max(x) if x else float("nan")),
        (f"{a.mib} MiB transfer (curl time_total): median s", "transfer_s", med),
        (f"{a.mib} MiB transfer: max s", "transfer_s", lambda x: max(x) if x else float("nan")),
    ]
    for name, k, f in rows:
        xa, xq = f(col(A, k)), f(col(Q, k))
        is_med = f is med
        ratio = f"{xa / xq:.2f}×" if xq and xq == xq and xa == xa else "–"
        lines.append(f"| {name} | {fmt(xa)} | {fmt(xq)} | {ratio} | {f'{ratio_pairs(k):.2f}×' if is_med else ''} |")
    lines.append(f"| DMZ CPU (share of one core over the round) | {dmz_cpu['attacked'] / max(dmz_wall['attacked'], 1e-9):.2f} | "
                 f"{dmz_cpu['quiet'] / max(dmz_wall['quiet'], 1e-9):.2f} | | |")
    lines.append("")
    ats = [r["attack"] for r in A if r.get("attack")]
    lines.append("| attacker (per attacked round, median) | value |")
    lines.append("|---|---:|")
    if ats:
        lines.append(f"| new connections attempted / s (whole round, opening burst of {a.burst} included) | {med([x['conn_per_s'] for x in ats]):.1f} |")
        lines.append(f"| new connections attempted / s after the burst | {med([x['conn_per_s_after_burst'] for x in ats]):.1f} |")
        lines.append(f"| established (TLS done) / s, burst included | {med([x['established_per_s'] for x in ats]):.1f} |")
        lines.append(f"| refused (closed during TLS: rate limit) per round | {med([x['refused'] for x in ats]):.0f} |")
        lines.append(f"| held until the gateway closed them: mean s | {med([x['mean_held_s'] for x in ats]):.2f} |")
        lines.append(f"| inner hellos answered 200 (pending sessions created) per round | {med([x['inner_created'] for x in ats]):.0f} |")
        lines.append(f"| PINGs sent / s (one session, never reads) | {med([x['pings_per_s'] for x in ats]):,.0f} |")
        lines.append(f"| PING sessions ended by the gateway per round | {med([x['ping_session_failed'] for x in ats]):.0f} |")
        lines.append(f"| round length with the attack on: median s | {med([x['seconds'] for x in ats]):.1f} |")
    else:
        lines.append("| (no attacker counts) | |")
    lines.append("")
    lines.append("| DMZ memory | value |")
    lines.append("|---|---:|")
    lines.append(f"| resident at the start | {rss0:.1f} MiB |")
    lines.append(f"| resident at the end | {rss1:.1f} MiB |")
    lines.append(f"| resident, highest sampled under attack | {rss_max:.1f} MiB |")
    lines.append(f"| peak resident (VmHWM) | {hwm:.1f} MiB |")
    lines.append(f"| alive at the end | {'yes' if dmz_alive else 'NO'} |")
    if alone:
        lines.append("")
        lines.append(f"| each attack alone ({a.alone} round{'s' if a.alone > 1 else ''}) | success | connect s (max) | "
                     f"first request s (max) | {a.mib} MiB s (median) | DMZ CPU | attacker conn/s after the burst | PING/s |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for k, rs in alone.items():
            ats_k = [r["attack"] for r in rs if r.get("attack")]
            lines.append(f"| {k} | {sum(r['ok'] for r in rs)}/{len(rs)} | "
                         f"{fmt(max([r['connect_s'] for r in rs if r['connect_s'] is not None], default=float('nan')))} | "
                         f"{fmt(max([r['first_req_s'] for r in rs if r['first_req_s'] is not None], default=float('nan')))} | "
                         f"{fmt(med(col(rs, 'transfer_s')))} | {fmt(med([r['dmz_cpu_share'] for r in rs]), '', 2)} | "
                         f"{fmt(med([x['conn_per_s_after_burst'] for x in ats_k]), '', 1)} | {fmt(med([x['pings_per_s'] for x in ats_k]), '', 0)} |")
    fails = [(i + 1, r["error"]) for i, r in enumerate(A) if not r["ok"]] + \
            [(i + 1, "quiet: " + str(r["error"])) for i, r in enumerate(Q) if not r["ok"]]
    if fails:
        lines.append("")
        lines.append("Failures: " + "; ".join(f"round {i}: {e}" for i, e in fails))
    lines.append("")
    lines.append("Per round (attacked | quiet), connect s / first request s / transfer s:")
    lines.append("")
    for i, (x, y) in enumerate(zip(A, Q)):
        lines.append(f"    {i + 1:2d}  {fmt(x['connect_s'])} / {fmt(x['first_req_s'])} / {fmt(x['transfer_s'])}   |   "
                     f"{fmt(y['connect_s'])} / {fmt(y['first_req_s'])} / {fmt(y['transfer_s'])}")
    table = "\n".join(lines)
    print(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(table + "\n")
    (Path(tmp) / "rounds.json").write_text(json.dumps({"attacked": A, "quiet": Q, "alone": alone}, indent=1))
    print(f"\nwritten to {a.out}; raw rounds in {tmp}/rounds.json", file=sys.stderr)


if __name__ == "__main__":
    bench.run_guarded(main)
