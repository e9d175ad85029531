#!/usr/bin/env bash
# Cross-checks ringmta-loadgen against Postfix's smtp-source, both driving
# Postfix's smtp-sink on a free loopback port:
#   * loadgen's message count must equal the count smtp-sink reports;
#   * loadgen must deliver at least as many messages/s as smtp-source
#     (compared like for like: one message per session, no pipelining, as
#     smtp-source does; loadgen's default pipelined run is shown too).
#
# Usage: loadgen/crosscheck.sh [MESSAGES] [CONCURRENCY] [REPEATS]
#   defaults 20000 50 3. Each client run is capped at 120 s, so the whole
#   script is bounded. Exit status 0 when both checks pass.
# Needs: smtp-sink and smtp-source (Debian package postfix), cargo.
set -euo pipefail

MESSAGES=${1:-20000}
CONCURRENCY=${2:-50}
REPEATS=${3:-3}
SIZE=1024
LIMIT=120 # seconds, per client run

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
PATH=$PATH:/usr/sbin:/usr/local/sbin
for tool in smtp-sink smtp-source; do
    command -v "$tool" >/dev/null || {
        echo "crosscheck: $tool not found (apt-get install postfix)" >&2
        exit 2
    }
done

LOADGEN=${LOADGEN:-$root/target/release/ringmta-loadgen}
if [[ ! -x $LOADGEN ]]; then
    (cd "$root" && cargo build -p loadgen --release)
fi

tmp=$(mktemp -d)
sink_pid=
cleanup() {
    if [[ -n $sink_pid ]]; then
        kill "$sink_pid" 2>/dev/null || true
        wait "$sink_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local p
    for _ in $(seq 1 50); do
        p=$((10000 + RANDOM % 22000)) # below the ephemeral range
        if ! port_in_use "$p"; then
            echo "$p"
            return
        fi
    done
    echo "crosscheck: no free port found" >&2
    exit 2
}

sink_user=()
[[ $(id -u) == 0 ]] && sink_user=(-u root) # smtp-sink will not keep root

# Starts a fresh smtp-sink (so each run starts counting at zero).
start_sink() {
    port=$(free_port)
    timeout $((LIMIT + 30)) smtp-sink -c "${sink_user[@]}" "127.0.0.1:$port" 1000 >"$tmp/sink.out" 2>&1 &
    sink_pid=$!
    for _ in $(seq 1 100); do
        port_in_use "$port" && return
        sleep 0.05
    done
    echo "crosscheck: smtp-sink did not start" >&2
    exit 2
}

# Stops the sink and prints the messages it counted (last "mesg=N").
stop_sink() {
    sleep 0.3 # let the last QUITs land in the counter
    kill "$sink_pid" 2>/dev/null || true
    wait "$sink_pid" 2>/dev/null || true
    sink_pid=
    tr '\r' '\n' <"$tmp/sink.out" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -1
}

# Runs a command under `time`; prints its wall-clock seconds.
timed() {
    local TIMEFORMAT=%R
    { time timeout "$LIMIT" "$@" >"$tmp/client.out" 2>&1; } 2>"$tmp/time.out" || {
        echo "crosscheck: client failed: $*" >&2
        cat "$tmp/client.out" >&2
        exit 1
    }
    tail -1 "$tmp/time.out"
}

rate() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", n / s }'; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "ringmta-loadgen vs smtp-source -> smtp-sink: $MESSAGES messages of $SIZE bytes," \
    "1 per session, $CONCURRENCY in parallel, $REPEATS repeats, $(nproc) cores"
printf '%-36s %8s %9s %11s %10s\n' client seconds "msg/s" "sink count" "own msg/s"

fail=0
: >"$tmp/source.rates"
: >"$tmp/loadgen.rates"
: >"$tmp/pipelined.rates"
for rep in $(seq 1 "$REPEATS"); do
    start_sink
    secs=$(timed smtp-source -s "$CONCURRENCY" -m "$MESSAGES" -l "$SIZE" -t rcpt@localhost "127.0.0.1:$port")
    count=$(stop_sink)
    r=$(rate "$MESSAGES" "$secs")
    echo "$r" >>"$tmp/source.rates"
    printf '%-36s %8s %9s %11s %10s\n' "smtp-source #$rep" "$secs" "$r" "$count" -

    for pipelining in off on; do
        start_sink
        secs=$(timed "$LOADGEN" --target "127.0.0.1:$port" --sessions "$MESSAGES" \
            --concurrency "$CONCURRENCY" --size "$SIZE" --pipelining "$pipelining" --quiet)
        count=$(stop_sink)
        # The summary line: "messages  <accepted>  <per second>  ...".
        read -r accepted own < <(awk '$1 == "messages" { print $2, $3; exit }' "$tmp/client.out")
        r=$(rate "$accepted" "$secs")
        if [[ $pipelining == off ]]; then
            echo "$r" >>"$tmp/loadgen.rates"
        else
            echo "$r" >>"$tmp/pipelined.rates"
        fi
        printf '%-36s %8s %9s %11s %10s\n' "ringmta-loadgen pipelining $pipelining #$rep" \
            "$secs" "$r" "$count" "$own"
        if [[ $accepted != "$MESSAGES" || $count != "$MESSAGES" ]]; then
            echo "MISMATCH: loadgen reported $accepted messages, smtp-sink counted $count," \
                "expected $MESSAGES" >&2
            fail=1
        fi
    done
done

src=$(median <"$tmp/source.rates")
lg=$(median <"$tmp/loadgen.rates")
lgp=$(median <"$tmp/pipelined.rates")
echo
echo "median msg/s (wall clock, process start to exit):"
echo "  smtp-source                      $src"
echo "  ringmta-loadgen pipelining off   $lg"
echo "  ringmta-loadgen pipelining on    $lgp"
if ((lg < src)); then
    echo "FAIL: ringmta-loadgen (like for like) slower than smtp-source" >&2
    fail=1
fi
if ((fail == 0)); then
    echo "PASS: counts match smtp-sink; ringmta-loadgen at least as fast as smtp-source"
fi
exit "$fail"
