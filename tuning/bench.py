#!/usr/bin/env python3
"""The benchmark driver behind tuning/run-bench.sh (see there)."""
import argparse
import datetime
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# RINGMTA_BIN: another build to measure (e.g. an older commit's, for a
# before/after table in one run).
RINGMTA = os.environ.get("RINGMTA_BIN") or os.path.join(ROOT, "target", "release", "ringmta")
LOADGEN = os.path.join(ROOT, "target", "release", "ringmta-loadgen")
TICK = os.sysconf("SC_CLK_TCK")
# Where the servers keep their spools and Maildirs (--workdir; default: $TMPDIR).
WORKDIR = None

# name, loadgen flags. Sizes follow the issue: connect-heavy (1 message of
# 1 KiB per session, 50 concurrent), persistent (100 messages of 10 KiB per
# session, 20 concurrent), large (1 MiB messages, 10 concurrent).
WORKLOADS = [
    ("connect-heavy", ["--concurrency", "50", "--messages-per-session", "1", "--size", "1024"]),
    ("persistent", ["--concurrency", "20", "--messages-per-session", "100", "--size", "10240"]),
    ("large", ["--concurrency", "10", "--messages-per-session", "1", "--size", "1048576"]),
    # STARTTLS on every session (one TLS handshake per message): sessions/s
    # is TLS handshakes/s. smtp-sink has no TLS and sits this one out.
    ("starttls", ["--concurrency", "50", "--messages-per-session", "1", "--size", "1024",
                  "--starttls"]),
]

TLS_WORKLOADS = {"starttls"}


def make_cert(directory):
    """One self-signed certificate that every server in the run uses."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=mx.test",
                    "-keyout", key, "-out", cert], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.chmod(directory, 0o755)
    os.chmod(key, 0o644)
    return cert, key


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def descendants(pid):
    """pid and all its live descendants."""
    out = [pid]
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(d))
        except OSError:
            pass
    stack = [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def cpu_seconds(pids):
    """utime+stime of the processes plus their reaped children."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])
        except OSError:
            pass
    return total / TICK


def peak_rss_kib(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class Ringmta:
    name = "ringmta"
    note = ("durable: fdatasync before every 250 (group commit), intake only "
            "(`--no-delivery`): what is measured is accepting mail")

    tls = True

    def __init__(self, extra, cert, relay_to=None):
        self.extra = extra
        self.cert = cert
        self.relay_to = relay_to

    def start(self):
        self.dir = tempfile.mkdtemp(prefix="ringmta-bench-", dir=WORKDIR)
        self.log = open(os.path.join(self.dir, "stderr.log"), "w+")
        self.proc = subprocess.Popen(
            [RINGMTA, "--smtp", "127.0.0.1:0", "--spool-dir", self.dir + "/spool",
             "--hostname", "mx.test", "--max-conns-per-ip", "0", "--log", "info",
             "--submission", "none", "--smtps", "none",
             "--tls-cert", self.cert[0], "--tls-key", self.cert[1]]
            + (["--relay-host", f"127.0.0.1:{self.relay_to}", "--relay-network", "127.0.0.0/8"]
               if self.relay_to else ["--no-delivery"])
            # The admin listener stays on (the default), on a free port so
            # that runs side by side do not fight over 9525.
            + ([] if "--admin" in self.extra else ["--admin", "127.0.0.1:0"])
            # Inbound verification (on by default) would ask the system's
            # DNS for every message; --auth measures it against a local one.
            + ([] if "--inbound-auth" in self.extra else ["--inbound-auth", "off"])
            + self.extra,
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        self.port = int(line.split()[-1].rsplit(":", 1)[1])
        self.pid = self.proc.pid
        return self.port

    def pids(self):
        return [self.pid]

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # Group commit: each shard logs its fdatasync and message counts.
        self.log.seek(0)
        commits = messages = 0
        for line in self.log:
            m = re.search(r"commits\S*=(\d+).*messages\S*=(\d+)", re.sub(r"\x1b\[[0-9;]*m", "", line))
            if m and "shard stopped" in line:
                commits += int(m.group(1))
                messages += int(m.group(2))
        self.per_sync = messages / commits if commits else float("nan")
        # Relay mode: each shard logs accept-to-delivery percentiles.
        self.log.seek(0)
        self.latency = []
        for line in self.log:
            if "delivery latency" in line:
                m = re.search(r"delivered=(\d+).*p50_ms=(\d+).*p99_ms=(\d+)", line)
                if m:
                    self.latency.append(tuple(int(x) for x in m.groups()))
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class SmtpSink:
    name = "smtp-sink"
    tls = False
    note = "Postfix test server, writes nothing (the no-work ceiling)"

    def start(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{self.port}", "1024"],
            stdout=subprocess.DEVNULL)
        wait_port(self.port)
        self.pid = self.proc.pid
        return self.port

    def pids(self):
        return [self.pid]

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Postfix:
    """A private Postfix instance: own config and queue under /tmp, smtpd on a
    free loopback port, every transport `discard:` so it accepts, queues
    durably (cleanup fsyncs each queue file) and drops."""
    name = "postfix"
    note = "Postfix smtpd+cleanup+qmgr, queue files fsynced, then discarded"
    tls = True

    def __init__(self, cert, relay_to=None):
        self.cert = cert
        self.relay_to = relay_to

    def start(self):
        self.dir = tempfile.mkdtemp(prefix="ringmta-bench-postfix-", dir=WORKDIR)
        etc, queue, data = (os.path.join(self.dir, d) for d in ("etc", "queue", "data"))
        for d in (etc, queue, data):
            os.makedirs(d)
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        if self.relay_to:
            transports = (f"relayhost = [127.0.0.1]:{self.relay_to}\n"
                          "smtp_tls_security_level = none\n"
                          "default_destination_concurrency_limit = 20\n")
        else:
            transports = "local_transport = discard:\ndefault_transport = discard:\nrelay_transport = discard:"
        with open(os.path.join(etc, "main.cf"), "w") as f:
            f.write(f"""compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = pf.test
mydestination = localhost
mynetworks = 127.0.0.0/8
{transports}
smtpd_tls_cert_file = {self.cert[0]}
smtpd_tls_key_file = {self.cert[1]}
smtpd_tls_security_level = may
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = 200
maillog_file = /dev/stdout
alias_maps =
alias_database =
local_recipient_maps =
""")
        with open("/etc/postfix/master.cf") as f:
            master = f.read()
        master = master.replace(
            "smtp      inet  n       -       y       -       -       smtpd",
            f"127.0.0.1:{self.port} inet  n       -       n       -       -       smtpd")
        with open(os.path.join(etc, "master.cf"), "w") as f:
            f.write(master)
        # maillog_file must be under maillog_file_prefixes (/var, /dev/stdout):
        # Postfix logs to its stdout, kept in a file here like a real maillog.
        self.maillog = open(os.path.join(self.dir, "maillog"), "w")
        self.proc = subprocess.Popen(["postfix", "-c", etc, "start-fg"],
                                     stdout=self.maillog, stderr=subprocess.STDOUT)
        wait_port(self.port)
        self.pid = self.proc.pid
        return self.port

    def pids(self):
        return descendants(self.pid)

    def delivery_delays(self):
        """Accept-to-delivery delays (s) of delivered messages, from the log."""
        try:
            with open(os.path.join(self.dir, "maillog"), errors="replace") as f:
                return [float(m.group(1)) for line in f if "status=sent" in line
                        for m in [re.search(r"delay=([0-9.]+)", line)] if m]
        except OSError:
            return []

    def stop(self):
        self.delays = self.delivery_delays()
        subprocess.run(["postfix", "-c", os.path.join(self.dir, "etc"), "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for p in descendants(self.pid):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_loadgen(port, flags, seconds, json_path):
    cmd = [LOADGEN, "--target", f"127.0.0.1:{port}", "--quiet", "--json", json_path] + flags
    if seconds is not None:
        cmd += ["--duration", str(seconds)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=(seconds or 300) + 120)
    with open(json_path) as f:
        return json.load(f)


def sink_count(path):
    """The last `mesg=N` smtp-sink -c printed."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 200))
            tail = f.read().decode(errors="replace")
    except OSError:
        return 0
    counts = re.findall(r"mesg=(\d+)", tail)
    return int(counts[-1]) if counts else 0


def relay_bench(args, cert, out):
    """loadgen -> MTA -> smtp-sink: end-to-end messages/s and how long the
    queue takes to drain after intake stops, ringmta against Postfix
    relaying to the same sink in the same run."""
    n = 5000 if args.quick else 20000
    rows = []
    for kind in ("ringmta", "postfix"):
        if kind not in args.only.split(","):
            continue
        if kind == "postfix" and not (shutil.which("postfix") and os.geteuid() == 0):
            continue
        sink_port = free_port()
        sink_out = os.path.join(out, "raw", f"relay-sink-{kind}.out")
        sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{sink_port}", "1024"],
                                stdout=open(sink_out, "w"), stderr=subprocess.DEVNULL)
        wait_port(sink_port)
        srv = Ringmta(args.ringmta_flags, cert, sink_port) if kind == "ringmta" else Postfix(cert, sink_port)
        port = srv.start()
        try:
            t0 = time.time()
            res = run_loadgen(port, ["--sessions", str(n // 10), "--concurrency", "50",
                                     "--messages-per-session", "10", "--size", "4096",
                                     "--rcpt-to", "rcpt{n}@relay.example"],
                              None, os.path.join(out, "raw", f"relay-{kind}.json"))
            t_intake = time.time() - t0
            accepted = res["messages"]["accepted"]
            deadline = time.time() + 300
            while sink_count(sink_out) < accepted and time.time() < deadline:
                time.sleep(0.05)
            t_all = time.time() - t0
            delivered = sink_count(sink_out)
        finally:
            srv.stop()
            sink.kill()
            sink.wait()
        if kind == "ringmta":
            lat = srv.latency
            p50 = max((x[1] for x in lat), default=float("nan"))
            p99 = max((x[2] for x in lat), default=float("nan"))
        else:
            d = sorted(srv.delays)
            p50 = d[len(d) // 2] * 1000 if d else float("nan")
            p99 = d[min(len(d) - 1, int(len(d) * 0.99))] * 1000 if d else float("nan")
        rows.append((kind, accepted, delivered, accepted / t_intake, delivered / t_all, t_all - t_intake,
                     p50, p99))
        print(f"relay {kind:8} accepted {accepted} delivered {delivered} "
              f"end-to-end {delivered / t_all:.0f} msg/s", file=sys.stderr)
    lines = ["# Relay benchmark", "",
             f"Command: `tuning/run-bench.sh {' '.join(sys.argv[1:])}`: loadgen sends {n} messages "
             "of 4 KiB (10 per session, 50 concurrent) for a non-local domain; the MTA relays each "
             "to one smtp-sink (smarthost / relayhost) on loopback, which counts what it receives.",
             f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.", "",
             "| MTA | accepted | delivered to the sink | intake msg/s | end-to-end msg/s | "
             "drain after intake (s) | accept-to-delivery p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, acc, dlv, intake, e2e, drain, p50, p99 in rows:
        lines.append(f"| {kind} | {acc} | {dlv} | {intake:.0f} | {e2e:.0f} | {drain:.1f} | "
                     f"{p50:.0f} | {p99:.0f} |")
    lines += ["", "Accept-to-delivery latency: ringmta's own histogram (per shard, the larger "
              "shown); Postfix's `delay=` of each delivery in its log (10 ms resolution)."]
    if len(rows) == 2 and rows[1][4]:
        lines += ["", f"End-to-end ratio ringmta / Postfix: {rows[0][4] / rows[1][4]:.2f}×"]
    path = os.path.join(out, "relay-summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


# smtp-source (Postfix's, no pipelining) workloads for --smtp-source: name,
# messages, smtp-source flags. connect-heavy: one 1 KiB message per session,
# 50 sessions at once; persistent: 20 sessions that stay connected (-d) and
# send 10 KiB messages until 10,000 are sent.
SOURCE_WORKLOADS = [
    ("connect-heavy", 5000, ["-s", "50", "-l", "1024"]),
    ("persistent", 10000, ["-s", "20", "-d", "-l", "10240"]),
]


class RingmtaDefaults:
    """ringmta as `cargo run --release` starts it (the embedded defaults:
    spool and Maildir under the working directory, one shard per core but one),
    moved off the default ports so runs do not collide; `extra` adds flags."""
    tls = False

    def __init__(self, name, extra, note):
        self.name, self.extra, self.note = name, extra, note

    def start(self):
        self.dir = tempfile.mkdtemp(prefix="ringmta-bench-", dir=WORKDIR)
        self.log = open(os.path.join(self.dir, "stderr.log"), "w")
        self.proc = subprocess.Popen(
            [RINGMTA, "--smtp", "127.0.0.1:0", "--submission", "none", "--smtps", "none",
             "--admin", "127.0.0.1:0"] + self.extra,
            cwd=self.dir, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        self.port = int(line.split()[-1].rsplit(":", 1)[1])
        self.pid = self.proc.pid
        return self.port

    def pids(self):
        return [self.pid]

    def delivered(self):
        """Messages in the Maildirs (new/ and cur/) under ./var/maildir."""
        n = 0
        for root, _dirs, files in os.walk(os.path.join(self.dir, "var", "maildir")):
            if os.path.basename(root) in ("new", "cur"):
                n += len(files)
        return n

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        # Removed after the last run: thousands of files deleted now would
        # make the next run's file creations slower (ext4 without a journal
        # skips recently deleted inodes when it allocates one).
        LEFTOVERS.append(self.dir)


LEFTOVERS = []


def drop_caches():
    """Every run starts from the same cache state (as root): on an ext4
    without a journal (this VM's), creating a file costs from 30 µs to over
    700 µs depending on how many inodes earlier runs freed whose inode
    table blocks are still cached (`recently_deleted`, `perf`), so the
    Maildir and Postfix figures otherwise depend on the order of the runs."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass
    # And from a quiet disk: the removal of an earlier run's files goes on
    # in the background (this file system is mounted with `discard`).
    def writes():
        with open("/proc/diskstats") as f:
            # writes completed, I/Os in progress, discards completed
            return sum(sum(int(x) for x in (l.split()[7], l.split()[11], (l.split() + ["0"] * 15)[14]))
                       for l in f if len(l.split()) > 11)
    deadline = time.time() + 60
    last = writes()
    while time.time() < deadline:
        time.sleep(1)
        now = writes()
        if now == last:
            break
        last = now


def children_cpu():
    """CPU seconds of the children waited for so far (smtp-source)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_smtp_source(port, n, flags, rcpt):
    t0 = time.time()
    subprocess.run(["smtp-source", "-m", str(n), "-f", "sender@example.org", "-t", rcpt]
                   + flags + [f"127.0.0.1:{port}"], check=True, timeout=600,
                   stdout=subprocess.DEVNULL)
    return time.time() - t0


def source_bench(args, cert, out):
    """Postfix's smtp-source against the defaults, the whole path: intake
    only, local Maildir delivery, relaying to a counting smtp-sink; Postfix
    (discarding, and relaying to the same kind of sink) and smtp-sink alone
    in the same run. Times run from the first connection until the last
    message is where it goes (the Maildir, the sink)."""
    # The defaults, and --shards 1 and 2 where they differ from them (one
    # shard per core but one: 1 on 2 cores, where 2 is the other choice).
    # BENCH_DEFAULT_SHARDS: what an older build (RINGMTA_BIN) picks by
    # default, for a before/after run (one per core before 2026-12-02).
    default_shards = int(os.environ.get("BENCH_DEFAULT_SHARDS") or max(1, (os.cpu_count() or 1) - 1))
    shard_sets = [[]] + [["--shards", str(n)] for n in (1, 2) if n != default_shards]
    rows = []
    # Inbound verification is on by default on the relay/MX port: its DNS
    # is a local dnsmasq, as an operator's would be a local caching
    # resolver, with SPF (pass for loopback) and DMARC p=none for the
    # sender's domain.
    # (start_dnsmasq answers .test with a TTL of 300 s; the sender's
    # domain and its parent, where the DMARC tree walk looks, too.)
    dns, dns_port = start_dnsmasq(["--local=/example.org/", "--local=/org/",
                                   "--txt-record=example.org,v=spf1 ip4:127.0.0.0/8 -all",
                                   "--txt-record=_dmarc.example.org,v=DMARC1; p=none"])
    dns_flags = ["--dns-server", f"127.0.0.1:{dns_port}"] if dns else ["--inbound-auth", "off"]
    workloads = [w for w in SOURCE_WORKLOADS
                 if args.workloads is None or w[0] in args.workloads.split(",")]
    for wl, n, flags in workloads:
        configs = [("smtp-sink", None, None)]
        for shards in shard_sets:
            tag = " ".join(shards) or f"defaults ({default_shards} shard{'s' if default_shards > 1 else ''})"
            configs += [
                (f"ringmta {tag} --no-delivery", shards + ["--no-delivery"] + args.ringmta_flags, "intake"),
                (f"ringmta {tag}, local Maildir", shards + args.ringmta_flags, "maildir"),
                (f"ringmta {tag}, relay to sink", shards + args.ringmta_flags, "relay"),
            ]
        if shutil.which("postfix") and os.geteuid() == 0 and "postfix" in args.only.split(","):
            configs += [("postfix (queue + discard)", None, "postfix"),
                        ("postfix, relay to sink", None, "postfix-relay")]
        for name, extra, kind in configs:
            drop_caches()
            sink = sink_out = None
            if kind in ("relay", "postfix-relay") or kind is None:
                sink_port = free_port()
                sink_out = os.path.join(out, "raw", f"source-{wl}-{len(rows)}-sink.out")
                sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c",
                                         f"127.0.0.1:{sink_port}", "1024"],
                                        stdout=open(sink_out, "w"), stderr=subprocess.DEVNULL)
                wait_port(sink_port)
            rcpt = "rcpt@localhost"
            if kind is None:
                srv, port = None, sink_port
            elif kind in ("intake", "maildir", "relay"):
                if kind == "relay":
                    extra = extra + ["--relay-host", f"127.0.0.1:{sink_port}",
                                     "--relay-network", "127.0.0.0/8"]
                    rcpt = "rcpt@relay.example"
                srv = RingmtaDefaults(name, extra + dns_flags, "")
                port = srv.start()
            else:
                srv = Postfix(cert, sink_port if kind == "postfix-relay" else None)
                port = srv.start()
                if kind == "postfix-relay":
                    rcpt = "rcpt@relay.example"
            pids = srv.pids() if srv else [sink.pid]
            try:
                before = cpu_seconds(pids)
                sink_before = cpu_seconds([sink.pid]) if sink and srv else 0
                client_before = children_cpu()
                t0 = time.time()
                t_intake = run_smtp_source(port, n, flags, rcpt)
                client_cpu = children_cpu() - client_before
                deadline = time.time() + 300
                if kind in ("relay", "postfix-relay"):
                    count = lambda: sink_count(sink_out)
                elif kind == "maildir":
                    count = srv.delivered
                else:
                    count = lambda: n
                while count() < n and time.time() < deadline:
                    time.sleep(0.02)
                t_all = time.time() - t0
                done = count()
                pids = srv.pids() if srv else pids
                cpu = cpu_seconds(pids) - before
                sink_cpu = cpu_seconds([sink.pid]) - sink_before if sink and srv else 0
            finally:
                if srv:
                    srv.stop()
                if sink:
                    sink.kill()
                    sink.wait()
            rows.append((wl, name, n, done, n / t_intake, done / t_all, cpu * 1000 / n,
                         client_cpu * 1000 / n, sink_cpu * 1000 / n, kind))
            print(f"{wl:14} {name:34} intake {n / t_intake:6.0f}  whole path {done / t_all:6.0f} msg/s"
                  f"  ({done}/{n})  {cpu * 1000 / n:.3f} CPU-s/1k", file=sys.stderr)
    lines = ["# smtp-source benchmark: the defaults, the whole path", "",
             f"Command: `tuning/run-bench.sh {' '.join(sys.argv[1:])}` "
             f"({os.cpu_count()} cores, loopback). Client: Postfix's `smtp-source` "
             "(no pipelining). ringmta runs on its embedded defaults (spool and Maildir under "
             "its working directory, one shard per core but one unless `--shards` says), only moved to free "
             "ports. Whole path = messages where they go (Maildir files, or counted by the "
             "sink) ÷ time from the first connection until the last one got there. Inbound "
             "verification (SPF, DKIM, DMARC, ARC: on by default) asks a local dnsmasq, which "
             "serves SPF and DMARC p=none for the sender's domain (its cache then answers). "
             "Each run starts after `sync` and `echo 3 > /proc/sys/vm/drop_caches` (as root), "
             "once no disk write has completed for a second.",
             f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.", "",
             "| workload | server | delivered | intake msg/s | whole path msg/s | vs smtp-sink "
             "| CPU s / 1k msgs |", "|---|---|---|---|---|---|---|"]
    for wl, _n, _f in workloads:
        sink_rate = next((r[5] for r in rows if r[0] == wl and r[1] == "smtp-sink"), None)
        for r in rows:
            if r[0] != wl:
                continue
            ratio = f"{r[5] / sink_rate:.2f}×" if sink_rate else "-"
            lines.append(f"| {wl} | {r[1]} | {r[3]}/{r[2]} | {r[4]:.0f} | {r[5]:.0f} | {ratio} | {r[6]:.3f} |")
    lines += ["", "CPU: utime+stime of the server's processes (Postfix: all of its processes; "
              "the relay sink's own CPU is not counted), from the first connection until the "
              "last message arrived."]
    lines += targets(rows, workloads)
    if dns:
        dns.kill()
        dns.wait()
    for d in LEFTOVERS:
        shutil.rmtree(d, ignore_errors=True)
    path = os.path.join(out, "source-summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def targets(rows, workloads):
    """Issue 15's targets against this run's rows, and where one is missed
    the CPU arithmetic of this box: smtp-source, the server and (relaying)
    the next hop's smtp-sink share its cores, so `cores / CPU per message`
    of the three together is the most the path can do here."""
    cores = os.cpu_count() or 1
    out = ["", "## Targets", "",
           f"Ceiling: {cores} cores ÷ the CPU per message of smtp-source + the server "
           "(+ the relay's sink), all measured in the row's run; as a ratio to smtp-sink's rate.", "",
           "| workload | server | target | measured | met | CPU ms/msg: client + server (+ sink) | ceiling here |",
           "|---|---|---|---|---|---|---|"]
    for wl, _n, _f in workloads:
        wrows = [r for r in rows if r[0] == wl]
        sink = next((r for r in wrows if r[9] is None), None)
        if not sink:
            continue
        sink_rate = sink[5]
        out.append(f"| {wl} | smtp-sink alone | | {sink_rate:.0f} msg/s | | "
                   f"{sink[7]:.3f} + {sink[6]:.3f} = {sink[7] + sink[6]:.3f} | |")
        pf_relay = next((r for r in wrows if r[9] == "postfix-relay"), None)
        for r in wrows:
            kind = r[9]
            if kind not in ("intake", "maildir", "relay"):
                continue
            goal = 1.0 if kind == "intake" else 0.8
            ratio = r[5] / sink_rate
            cpu = r[7] + r[6] + r[8]
            ceiling = cores * 1000 / cpu if cpu else float("inf")
            parts = f"{r[7]:.3f} + {r[6]:.3f}" + (f" + {r[8]:.3f}" if kind == "relay" else "")
            out.append(f"| {wl} | {r[1]} | ≥ {goal:.1f}× smtp-sink | {ratio:.2f}× | "
                       f"{'yes' if ratio >= goal else 'no'} | {parts} = {cpu:.3f} | "
                       f"{ceiling:.0f} msg/s = {ceiling / sink_rate:.2f}× |")
            if kind != "intake":
                pace = r[5] / r[4]
                out.append(f"| {wl} | {r[1]} | delivery keeps pace (whole path ≥ 0.9 × intake) | "
                           f"{pace:.2f} | {'yes' if pace >= 0.9 else 'no'} | | |")
            if kind == "relay" and pf_relay:
                x = r[5] / pf_relay[5]
                out.append(f"| {wl} | {r[1]} | ≥ 5× Postfix relay | {x:.1f}× | "
                           f"{'yes' if x >= 5 else 'no'} | | |")
    return out


AUTH_DOMAIN = "bench.test"


def start_dnsmasq(records):
    """dnsmasq answering for .test from `records` on a free loopback port
    (cacheable answers), or None when it is not installed."""
    dnsmasq = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None)
    if not dnsmasq:
        return None, None
    port = free_port()
    proc = subprocess.Popen(
        [dnsmasq, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
         "--listen-address=127.0.0.1", "--user=root", "--pid-file", "--log-facility=-",
         "--local=/test/", "--local-ttl=300", f"--port={port}"] + records,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, port


def auth_bench(args, cert, out, seconds):
    """Intake with inbound verification on against the same run with it
    off: loadgen DKIM-signs every message (RSA-2048, the usual key) from
    bench.test, whose SPF, DKIM key and DMARC p=reject a local dnsmasq
    serves; both servers get the same signed messages."""
    work = tempfile.mkdtemp(prefix="ringmta-bench-auth-")
    key = os.path.join(work, "bench.pem")
    gen = subprocess.run([RINGMTA, "dkim-keygen", "--domain", AUTH_DOMAIN, "--selector", "bench",
                          "--algorithm", args.auth_key, "--out", key],
                         check=True, capture_output=True, text=True)
    record = "".join(gen.stdout.split('"')[1::2])
    chunks = [record[i:i + 255] for i in range(0, len(record), 255)]
    dns, dns_port = start_dnsmasq([
        f"--txt-record={AUTH_DOMAIN},v=spf1 ip4:127.0.0.0/8 -all",
        f"--txt-record=loadgen.{AUTH_DOMAIN},v=spf1 ip4:127.0.0.0/8 -all",
        f"--txt-record=_dmarc.{AUTH_DOMAIN},v=DMARC1; p=reject",
        f"--txt-record=bench._domainkey.{AUTH_DOMAIN}," + ",".join(chunks),
    ])
    if dns is None:
        sys.exit("--auth needs dnsmasq (apt-get install dnsmasq-base)")
    try:
        off = Ringmta(args.ringmta_flags + ["--inbound-auth", "off"], cert)
        off.name = "verify-off"
        on = Ringmta(args.ringmta_flags + ["--inbound-auth", "on",
                                           "--dns-server", f"127.0.0.1:{dns_port}"], cert)
        on.name = "verify-on"
        on.note = off.note = Ringmta.note
        sign = ["--dkim-key", f"{AUTH_DOMAIN}:bench:{key}",
                "--mail-from", "loadgen{n}@" + AUTH_DOMAIN, "--helo", "loadgen." + AUTH_DOMAIN]
        wanted = (args.workloads or "connect-heavy,persistent").split(",")
        rows = {}
        for wl, flags in WORKLOADS:
            if wl not in wanted:
                continue
            for srv in (off, on):
                port = srv.start()
                try:
                    before = cpu_seconds(srv.pids())
                    res = run_loadgen(port, flags + sign, seconds,
                                      os.path.join(out, "raw", f"auth-{wl}-{srv.name}.json"))
                    cpu = cpu_seconds(srv.pids()) - before
                finally:
                    srv.stop()
                m = summarize(res)
                m["cpu_s_per_1k_msgs"] = cpu * 1000 / m["messages"] if m["messages"] else float("nan")
                rows[(wl, srv.name)] = m
                print(f"{wl:14} {srv.name:10} {m['msgs_per_s']:9.0f} msg/s  "
                      f"p99 {m['eod_p99_ms']:.2f} ms  errors {m['errors']}", file=sys.stderr)
    finally:
        dns.kill()
        dns.wait()
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"# Inbound verification cost {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"Command: `tuning/run-bench.sh {' '.join(sys.argv[1:])}` "
             f"({seconds} s per run, loopback, {os.cpu_count()} cores; loadgen signs every message "
             f"with a {args.auth_key} key, its cost is the same in both runs).", "",
             "| workload | verification | msg/s | p50 ms | p99 ms | ringmta CPU s / 1k msgs | errors |",
             "|---|---|---|---|---|---|---|"]
    for wl, _ in WORKLOADS:
        for name in ("verify-off", "verify-on"):
            m = rows.get((wl, name))
            if m:
                lines.append(f"| {wl} | {name[7:]} | {m['msgs_per_s']:.0f} | {m['eod_p50_ms']:.2f} | "
                             f"{m['eod_p99_ms']:.2f} | {m['cpu_s_per_1k_msgs']:.3f} | {m['errors']} |")
    lines += ["", "| workload | msg/s on ÷ off | CPU per message on ÷ off |", "|---|---|---|"]
    for wl, _ in WORKLOADS:
        a, b = rows.get((wl, "verify-on")), rows.get((wl, "verify-off"))
        if a and b and b["msgs_per_s"] and b["cpu_s_per_1k_msgs"]:
            lines.append(f"| {wl} | {a['msgs_per_s'] / b['msgs_per_s']:.2f} | "
                         f"{a['cpu_s_per_1k_msgs'] / b['cpu_s_per_1k_msgs']:.2f} |")
    path = os.path.join(out, "auth-summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {path}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5 s per run instead of 15 s")
    ap.add_argument("--only", default="ringmta,smtp-sink,postfix")
    ap.add_argument("--out", default=None, help="results directory")
    ap.add_argument("--relay", action="store_true",
                    help="end-to-end relay benchmark (loadgen -> MTA -> smtp-sink) instead")
    ap.add_argument("--smtp-source", action="store_true",
                    help="Postfix's smtp-source against the defaults, whole path (intake, "
                         "Maildir, relay to a sink), Postfix and smtp-sink in the same run")
    ap.add_argument("--workdir", default=None,
                    help="directory (file system) for the servers' spools and Maildirs")
    ap.add_argument("--workloads", default=None,
                    help="comma-separated subset: connect-heavy,persistent,large,starttls")
    ap.add_argument("--auth", action="store_true",
                    help="intake with inbound verification (SPF/DKIM/DMARC/ARC) on vs off, "
                         "DKIM-signed messages, a local dnsmasq as DNS")
    ap.add_argument("--auth-key", default="rsa", choices=["rsa", "ed25519"],
                    help="--auth: the signing key's algorithm")
    ap.add_argument("ringmta_flags", nargs="*", help="extra flags for ringmta")
    args = ap.parse_args()
    global WORKDIR
    WORKDIR = args.workdir
    seconds = 5 if args.quick else 15
    wanted = args.only.split(",")
    cert_dir = tempfile.mkdtemp(prefix="ringmta-bench-cert-")
    cert = make_cert(cert_dir)
    out = args.out or os.path.join(ROOT, "tuning", "results", datetime.date.today().isoformat())
    os.makedirs(os.path.join(out, "raw"), exist_ok=True)
    if args.smtp_source:
        source_bench(args, cert, out)
        shutil.rmtree(cert_dir, ignore_errors=True)
        return
    if args.auth:
        auth_bench(args, cert, out, seconds)
        shutil.rmtree(cert_dir, ignore_errors=True)
        return
    if args.relay:
        relay_bench(args, cert, out)
        shutil.rmtree(cert_dir, ignore_errors=True)
        return
    servers = []
    if "ringmta" in wanted:
        servers.append(Ringmta(args.ringmta_flags, cert))
    if "smtp-sink" in wanted and shutil.which("smtp-sink"):
        servers.append(SmtpSink())
    if "postfix" in wanted and shutil.which("postfix") and os.geteuid() == 0:
        servers.append(Postfix(cert))
    out = args.out or os.path.join(ROOT, "tuning", "results", datetime.date.today().isoformat())
    os.makedirs(os.path.join(out, "raw"), exist_ok=True)

    rows = {}
    workloads = [w for w in WORKLOADS if args.workloads is None or w[0] in args.workloads.split(",")]
    for wl, flags in workloads:
        for srv in servers:
            if wl in TLS_WORKLOADS and not srv.tls:
                continue
            port = srv.start()
            try:
                before = cpu_seconds(srv.pids())
                res = run_loadgen(port, flags, seconds,
                                  os.path.join(out, "raw", f"{wl}-{srv.name}.json"))
                pids = srv.pids()
                cpu = cpu_seconds(pids) - before
                rss = peak_rss_kib(pids)
            finally:
                srv.stop()
            m = summarize(res)
            m["per_sync"] = getattr(srv, "per_sync", None)
            m["cpu_s_per_1k_msgs"] = cpu * 1000 / m["messages"] if m["messages"] else float("nan")
            m["peak_rss_kib"] = rss
            rows[(wl, srv.name)] = m
            print(f"{wl:14} {srv.name:10} {m['msgs_per_s']:9.0f} msg/s  "
                  f"p99 {m['eod_p99_ms']:.2f} ms  errors {m['errors']}", file=sys.stderr)
    write_summary(out, servers, rows, seconds, args)
    shutil.rmtree(cert_dir, ignore_errors=True)


def summarize(res):
    """Pick the figures the summary needs out of loadgen's --json."""
    lat = res["latency_us"]["end_of_data"]
    return {
        "messages": res["messages"]["accepted"],
        "msgs_per_s": res["messages"]["per_s"],
        "sessions_per_s": res["sessions"]["per_s"],
        "eod_p50_ms": lat["p50"] / 1000,
        "eod_p99_ms": lat["p99"] / 1000,
        "eod_p999_ms": lat["p999"] / 1000,
        "errors": res["errors"]["total"],
    }


def write_summary(out, servers, rows, seconds, args):
    lines = [f"# Benchmark summary {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"Command: `tuning/run-bench.sh {' '.join(sys.argv[1:])}` "
             f"({seconds} s per run, loopback, {os.cpu_count()} cores).", ""]
    load = os.getloadavg()
    lines.append(f"Load average when the run ended: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
                 "(other work on the machine makes fdatasync slower and figures noisier).")
    lines.append("")
    for srv in servers:
        lines.append(f"* **{srv.name}**: {srv.note}")
    lines += ["", "Latency is the end-of-data reply (the durability latency), "
              "measured by ringmta-loadgen from the intended send time.", ""]
    lines.append("| workload | server | msg/s | sessions/s | p50 ms | p99 ms | p999 ms | "
                 "CPU s / 1k msgs | peak RSS MiB | msgs per fdatasync | errors |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for wl, _ in WORKLOADS:
        for srv in servers:
            m = rows.get((wl, srv.name))
            if not m:
                continue
            lines.append(
                f"| {wl} | {srv.name} | {m['msgs_per_s']:.0f} | {m['sessions_per_s']:.0f} | "
                f"{m['eod_p50_ms']:.2f} | {m['eod_p99_ms']:.2f} | {m['eod_p999_ms']:.2f} | "
                f"{m['cpu_s_per_1k_msgs']:.3f} | {m['peak_rss_kib'] / 1024:.1f} | "
                f"{'-' if m['per_sync'] is None else format(m['per_sync'], '.1f')} | {m['errors']} |")
    lines += ["", "Ratios (ringmta msg/s ÷ peer msg/s, same run):", ""]
    peers = [s.name for s in servers if s.name != "ringmta"]
    lines.append("| workload | " + " | ".join(f"vs {p}" for p in peers) + " |")
    lines.append("|---|" + "---|" * len(peers))
    for wl, _ in WORKLOADS:
        r = rows.get((wl, "ringmta"))
        cells = []
        for p in peers:
            q = rows.get((wl, p))
            cells.append(f"{r['msgs_per_s'] / q['msgs_per_s']:.2f}×" if r and q and q["msgs_per_s"] else "-")
        lines.append(f"| {wl} | " + " | ".join(cells) + " |")
    path = os.path.join(out, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
