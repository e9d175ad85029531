#!/usr/bin/env bash
# Postfix's smtp-source against ringmta (1 and 2 shards, pinned and not) and
# against Postfix's smtp-sink, in one run on loopback.
#
#   tuning/smtp-source-compare.sh [MESSAGES] [SESSIONS] [SIZE]
#
# ringmta fdatasyncs every message before its 250; smtp-sink writes nothing
# (the no-work ceiling). Prints a markdown table; bounded by timeouts.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${1:-20000}
SESSIONS=${2:-50}
SIZE=${3:-1024}
command -v smtp-source >/dev/null || { echo "smtp-source missing (apt-get install postfix)" >&2; exit 1; }
cargo build --release -q -p ringmta
BIN=target/release/ringmta
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run_source() { # port -> msg/s
  local port=$1 start end
  start=$(date +%s.%N)
  timeout 300 smtp-source -s "$SESSIONS" -m "$MESSAGES" -l "$SIZE" \
    -f sender@example.org -t rcpt@localhost "127.0.0.1:$port"
  end=$(date +%s.%N)
  python3 -c "print(f'{$MESSAGES/($end-$start):.0f}')"
}

echo "| server | shards | pin | msg/s | durable |"
echo "|---|---|---|---|---|"
for shards in 1 2; do
  for pin in no yes; do
    spool="$WORK/spool-$shards-$pin"
    flags=(--smtp 127.0.0.1:0 --spool-dir "$spool" --shards "$shards" --hostname mx.test
           --max-conns-per-ip 0 --log warn --submission none --smtps none --admin none --no-delivery)
    [ "$pin" = yes ] && flags+=(--pin)
    "$BIN" "${flags[@]}" > "$WORK/out" &
    pid=$!
    for _ in $(seq 100); do grep -q listening "$WORK/out" 2>/dev/null && break; sleep 0.1; done
    port=$(awk '/listening smtp / {split($4,a,":"); print a[2]}' "$WORK/out")
    rate=$(run_source "$port")
    stored=$("$BIN" queue --spool-dir "$spool" count | awk '{print $1}')
    kill -TERM "$pid"; wait "$pid" || true
    echo "| ringmta | $shards | $pin | $rate | durable, group commit ($stored stored) |"
  done
done
port=$(free_port)
timeout 600 smtp-sink -u nobody -c "127.0.0.1:$port" 1024 > "$WORK/sink.out" &
sink=$!
sleep 0.5
rate=$(run_source "$port")
kill "$sink" 2>/dev/null; wait "$sink" 2>/dev/null || true
echo "| smtp-sink | - | - | $rate | writes nothing |"
