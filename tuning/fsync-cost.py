#!/usr/bin/env python3
"""What one write + fdatasync costs on this disk, appending vs overwriting
preallocated space (the question behind segment preallocation).

    tuning/fsync-cost.py [DIR] [N]

Writes N (default 500) 10 KiB records with an fdatasync after each, three
ways, twice, in DIR (default target/fsynctest, on the build disk).
"""
import os
import sys
import time

d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "target", "fsynctest")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 500
os.makedirs(d, exist_ok=True)
buf = b"x" * 10240


def run(name, prealloc):
    p = os.path.join(d, name)
    fd = os.open(p, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    if prealloc == "zeroed":
        os.write(fd, b"\0" * (n * len(buf) + 4096))
        os.fsync(fd)
    elif prealloc == "fallocate":
        os.posix_fallocate(fd, 0, n * len(buf) + 4096)
        os.fsync(fd)
    t = time.time()
    for i in range(n):
        os.pwrite(fd, buf, i * len(buf))
        os.fdatasync(fd)
    el = time.time() - t
    os.close(fd)
    os.unlink(p)
    print(f"{prealloc:10} {el / n * 1e6:8.0f} us per 10 KiB write + fdatasync")


for _ in range(2):
    run("a", "append")
    run("z", "zeroed")
    run("f", "fallocate")
print(f"load average: {os.getloadavg()}")
