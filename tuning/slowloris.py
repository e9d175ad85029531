#!/usr/bin/env python3
"""Slowloris against ringmta: does a normal client keep its service while
thousands of connections trickle bytes?

    tuning/slowloris.py [--conns 10000] [--seconds 20] [--interval 5] [-- ringmta flags]

Builds release, starts ringmta on loopback (temporary spool and Maildir, local
delivery on, its default limits), then:

1. baseline: ringmta-loadgen from 127.0.0.1 (20 sessions of 10 x 4 KiB
   messages in a closed loop) for --seconds;
2. attack: --conns connections from many source addresses (127.1.x.y, so the
   per-IP limit does not stop them: a botnet), a third each trickling a
   command line, a DATA body (after EHLO/MAIL/RCPT/DATA) and a TLS
   ClientHello on the implicit-TLS port, one byte per --interval seconds per
   connection; a connection the server closes is opened again;
3. the same loadgen run while the attack holds its connections;
4. the baseline again once the attacker has stopped.

The attacker is `ringmta-slowloris` (loadgen/src/slowloris.rs): one thread
on epoll, so that it takes as little as it can of the 2 cores it shares with
the server (a real attack runs elsewhere).

It prints and writes tuning/results/<date>/slowloris.md: the normal client's
msg/s and end-of-data p99 with and without the attack, their ratio against
the mean of the two runs without it (target: within 10 %), ringmta's RSS (VmRSS now, VmHWM peak) and what the attack saw
(connections open, closed by the server, refused).
"""

import argparse
import datetime
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RINGMTA = os.path.join(ROOT, "target", "release", "ringmta")
LOADGEN = os.path.join(ROOT, "target", "release", "ringmta-loadgen")
ATTACKER = os.path.join(ROOT, "target", "release", "ringmta-slowloris")


# ------------------------------------------------------------ orchestrator --

def rss_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


def cpu_s(pid):
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_ringmta(tmp, extra):
    cmd = [RINGMTA, "--smtp", "127.0.0.1:0", "--submission", "none",
           "--smtps", "127.0.0.1:0", "--spool-dir", os.path.join(tmp, "spool"),
           "--maildir", os.path.join(tmp, "maildir"), "--hostname", "mx.test",
           "--admin", "none"] + extra
    log = open(os.path.join(tmp, "ringmta.log"), "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    ports = {}
    deadline = time.time() + 20
    while len(ports) < 2 and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        _, _, kind, addr = line.split()
        ports[kind] = int(addr.rsplit(":", 1)[1])
    if len(ports) < 2:
        proc.kill()
        sys.exit(f"ringmta did not start; see {tmp}/ringmta.log")
    return proc, ports["smtp"], ports["smtps"]


def loadgen(port, seconds, tmp, name):
    path = os.path.join(tmp, f"{name}.json")
    subprocess.run([LOADGEN, "--target", f"127.0.0.1:{port}", "--quiet", "--json", path,
                    "--concurrency", "20", "--messages-per-session", "10", "--size", "4k",
                    "--duration", str(seconds)],
                   check=True, stdout=subprocess.DEVNULL, timeout=seconds + 120)
    with open(path) as f:
        res = json.load(f)
    return {"msgs_per_s": res["messages"]["per_s"],
            "p99_ms": res["latency_us"]["end_of_data"]["p99"] / 1000,
            "accepted": res["messages"]["accepted"],
            "errors": res["errors"]["total"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("flags", nargs="*", help="extra ringmta flags (after --)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.conns + 1000:
        sys.exit(f"RLIMIT_NOFILE hard limit {hard} is too low for {args.conns} connections")

    subprocess.run(["cargo", "build", "--release", "-q", "-p", "ringmta", "-p", "loadgen"],
                   cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="ringmta-slowloris-")
    proc, smtp, smtps = start_ringmta(tmp, args.flags)
    try:
        c0 = cpu_s(proc.pid)
        base = loadgen(smtp, args.seconds, tmp, "baseline")
        cpu_base = cpu_s(proc.pid) - c0
        rss_base = rss_kib(proc.pid)
        att = subprocess.Popen([ATTACKER, "--conns", str(args.conns),
                                "--interval", str(args.interval),
                                "--smtp-port", str(smtp), "--smtps-port", str(smtps)],
                               stdout=subprocess.PIPE, text=True)
        ready = json.loads(att.stdout.readline())
        rss_attack_start = rss_kib(proc.pid)
        c0, a0 = cpu_s(proc.pid), cpu_s(att.pid)
        under = loadgen(smtp, args.seconds, tmp, "attack")
        cpu_under, cpu_att = cpu_s(proc.pid) - c0, cpu_s(att.pid) - a0
        rss_attack = rss_kib(proc.pid)
        att.send_signal(signal.SIGTERM)
        seen = json.loads(att.stdout.readline())
        att.wait(timeout=60)
        # Baseline again, the attack's connections gone: the mean of the two
        # is what the attack run is compared with (the spool and Maildir
        # grow from run to run).
        time.sleep(2)
        c0 = cpu_s(proc.pid)
        after = loadgen(smtp, args.seconds, tmp, "after")
        cpu_after = cpu_s(proc.pid) - c0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    rate0 = (base["msgs_per_s"] + after["msgs_per_s"]) / 2
    p99_0 = (base["p99_ms"] + after["p99_ms"]) / 2
    ratio_rate = under["msgs_per_s"] / rate0 if rate0 else 0
    ratio_p99 = under["p99_ms"] / p99_0 if p99_0 else 0
    now = datetime.datetime.now()
    lines = [
        f"# Slowloris {now.isoformat(timespec='seconds')}", "",
        f"Command: `tuning/slowloris.py {' '.join(sys.argv[1:])}` ({os.cpu_count()} cores, loopback; "
        f"ringmta defaults with local Maildir delivery"
        f"{', flags ' + ' '.join(args.flags) if args.flags else ''}).", "",
        f"Normal client: ringmta-loadgen from 127.0.0.1, 20 concurrent sessions x 10 messages of "
        f"4 KiB, {args.seconds} s per run. Attack: {args.conns} connections from "
        f"{(args.conns + 49) // 50} addresses (127.1.x.y, 50 each), a third each trickling a "
        f"command, a DATA body and a TLS ClientHello, one byte every ~{args.interval:g} s per "
        "connection, reopened when closed (`ringmta-slowloris`, one thread, epoll). The attacker "
        "runs on the same 2 cores.", "",
        "| run | msg/s | end-of-data p99 ms | accepted | errors |",
        "|---|---|---|---|---|",
        f"| without attack | {base['msgs_per_s']:.0f} | {base['p99_ms']:.2f} | {base['accepted']} | {base['errors']} |",
        f"| under attack | {under['msgs_per_s']:.0f} | {under['p99_ms']:.2f} | {under['accepted']} | {under['errors']} |",
        f"| without attack, after it | {after['msgs_per_s']:.0f} | {after['p99_ms']:.2f} | {after['accepted']} | {after['errors']} |",
        f"| ratio (attack / mean without) | {ratio_rate:.2f} | {ratio_p99:.2f} | | |", "",
        f"ringmta RSS: {rss_base['VmRSS'] / 1024:.0f} MiB before the attack, "
        f"{rss_attack_start['VmRSS'] / 1024:.0f} MiB with the attack's connections open, "
        f"{rss_attack['VmRSS'] / 1024:.0f} MiB after the second run; peak (VmHWM) "
        f"{rss_attack['VmHWM'] / 1024:.0f} MiB.", "",
        f"CPU seconds during each {args.seconds} s run: ringmta {cpu_base:.1f} without the attack, "
        f"{cpu_under:.1f} under it, {cpu_after:.1f} after it; the attacker process {cpu_att:.1f} (on the same 2 cores: "
        "what it takes is not available to ringmta or the load generator).", "",
        f"Attack: {ready['open']} connections open when the second run started; over the run "
        f"{seen['opened']} opened, {seen['closed_by_server']} closed by the server, "
        f"{seen['refused_421']} refused with 421, {seen['connect_failed']} connects failed, "
        f"{seen['bytes_sent']} bytes trickled.", "",
    ]
    text = "\n".join(lines)
    print(text)
    out = os.path.join(ROOT, "tuning", "results", now.strftime("%Y-%m-%d"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "slowloris.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
