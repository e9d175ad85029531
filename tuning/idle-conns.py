#!/usr/bin/env python3
"""Measure ringmta's memory per idle connection.

    tuning/idle-conns.py [N]

Starts target/release/ringmta on a free loopback port, reads its RSS, opens N
connections that each read the banner and say EHLO, then stay idle; reads the
RSS again and prints the difference per connection. Bounded: every socket has
a timeout and the server is stopped at the end.

With PROXY=1 the server runs with --proxy-protocol-from 127.0.0.1/32 and each
connection first sends a PROXY v1 header naming its own client address (as
HAProxy's send-proxy does), so the sessions are the proxied kind.
"""
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
PROXY = os.environ.get("PROXY") == "1"
BIN = os.path.join(os.path.dirname(__file__), "..", "target", "release", "ringmta")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    spool = tempfile.mkdtemp(prefix="ringmta-idle-")
    proc = subprocess.Popen(
        [BIN, "--smtp", "127.0.0.1:0", "--spool-dir", spool, "--hostname", "mx.test",
         "--max-conns-per-ip", "0", "--log", "warn", "--submission", "none", "--smtps", "none",
         "--admin", "none", "--no-delivery"] + (["--proxy-protocol-from", "127.0.0.1/32"] if PROXY else []),
        stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(line.split()[-1].rsplit(":", 1)[1])
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        sel = selectors.DefaultSelector()
        socks = []
        deadline = time.time() + 120
        for i in range(N):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if PROXY:
                s.sendall(b"PROXY TCP4 192.0.2.%d 127.0.0.1 %d 25\r\n" % (i % 250 + 1, 1024 + i % 60000))
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, [b"", 0])
            socks.append(s)
        # Each connection: read the banner, send EHLO, read the reply.
        done = 0
        while done < N and time.time() < deadline:
            for key, _ in sel.select(timeout=1):
                s, st = key.fileobj, key.data
                data = s.recv(4096)
                if not data:
                    raise RuntimeError("server closed a connection")
                st[0] += data
                if st[1] == 0 and st[0].endswith(b"\r\n"):
                    s.sendall(b"EHLO idle.example\r\n")
                    st[0], st[1] = b"", 1
                elif st[1] == 1 and b"\r\n250 " in b"\r\n" + st[0]:
                    sel.unregister(s)
                    done += 1
        if done < N:
            raise RuntimeError(f"only {done} of {N} sessions greeted in time")
        time.sleep(1)
        after = rss_kib(proc.pid)
        per = (after - before) * 1024 / N
        print(f"idle sessions: {N}")
        print(f"ringmta RSS before: {before} KiB, after: {after} KiB")
        print(f"per idle session: {per:.0f} bytes ({per / 1024:.1f} KiB)")
        for s in socks:
            s.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run(["rm", "-rf", spool])


if __name__ == "__main__":
    main()
