#!/usr/bin/env bash
# Builds release, starts ringmta and the peers it finds installed (Postfix's
# smtp-sink as the no-work ceiling, a local Postfix instance under /tmp as the
# MTA peer), runs the same workloads against each with ringmta-loadgen, and
# writes tuning/results/<date>/summary.md. Loopback only, bounded in time.
#
#   tuning/run-bench.sh [--quick] [--only ringmta,smtp-sink,postfix] [ringmta flags...]
#   tuning/run-bench.sh --smtp-source   # Postfix's smtp-source, the defaults, the whole path
#   tuning/run-bench.sh --relay         # loadgen -> MTA -> smtp-sink
#   tuning/run-bench.sh --auth          # inbound verification on vs off
#   tuning/run-bench.sh --auth [--quick] [--auth-key rsa|ed25519]   (verification on vs off)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p ringmta -p loadgen
exec python3 tuning/bench.py "$@"
