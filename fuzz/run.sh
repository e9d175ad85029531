#!/usr/bin/env bash
# Runs every cargo-fuzz target in turn, one at a time, for SECONDS_PER_TARGET
# wall-clock seconds each (default 60), and prints the executions and the CPU
# time each used.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Environment:
#   FUZZ_BUDGET=wall|cpu     default wall; cpu: SECONDS_PER_TARGET is the
#                            fuzzer's own CPU time (user + system), so a run
#                            at low priority on a busy machine still fuzzes
#                            that long (stopped with SIGINT, which libFuzzer
#                            ends cleanly with exit 72 and its final stats).
#   SANITIZER=none|address   default none: src/smtp has no `unsafe`, and
#                            without ASan the targets run about twice as fast.
#   FUZZ_TOOLCHAIN=nightly   toolchain for cargo-fuzz; default nightly if
#                            rustup has one, else stable with RUSTC_BOOTSTRAP=1.
#
# Corpora grow in fuzz/corpus/<target> (not committed); fuzz/seeds/<target>
# is read as well. A crash leaves its input in fuzz/artifacts/<target>/ and
# makes the script exit non-zero; keep it under fuzz/regressions/.
set -euo pipefail

cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(parse_command data_receiver session bdat_receiver reply_parser proxy_header outbound_tls)
fi
sanitizer=${SANITIZER:-none}

if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    cargo=(cargo "+$FUZZ_TOOLCHAIN")
elif rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    cargo=(cargo +nightly)
else
    # cargo-fuzz passes -Z flags; stable rustc accepts them with this set.
    export RUSTC_BOOTSTRAP=1
    cargo=(cargo)
fi
command -v cargo-fuzz >/dev/null || {
    echo "cargo-fuzz missing: cargo install cargo-fuzz" >&2
    exit 2
}

# Build first, so compile time is not counted as fuzzing time. -a: debug
# assertions and overflow checks on.
"${cargo[@]}" fuzz build -a --sanitizer "$sanitizer"
triple=$(rustc -vV | sed -n 's/^host: //p')
bindir=target/$triple/release

hz=$(getconf CLK_TCK)
# Children's user+system CPU ticks of this shell (fields 16 and 17 of stat).
child_ticks() {
    local stat
    stat=$(cat /proc/$$/stat)
    stat=${stat##*) }
    set -- $stat
    echo $((${14} + ${15}))
}

mkdir -p target/run-logs
status=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    max_len=4096
    [ "$t" = session ] && max_len=16384
    log=target/run-logs/$t.log
    echo "== $t: ${secs}s, sanitizer=$sanitizer, log $log"
    before=$(child_ticks)
    rc=0
    if [ "${FUZZ_BUDGET:-wall}" = cpu ]; then
        "$bindir/$t" -dict=smtp.dict -max_len="$max_len" \
            -timeout=10 -print_final_stats=1 \
            -artifact_prefix="artifacts/$t/" "corpus/$t" "seeds/$t" >"$log" 2>&1 &
        pid=$!
        while kill -0 "$pid" 2>/dev/null; do
            stat=$(cat "/proc/$pid/stat" 2>/dev/null) || break
            stat=${stat##*) }
            set -- $stat
            if [ $(((${12} + ${13}) / hz)) -ge "$secs" ]; then
                kill -INT "$pid"
                break
            fi
            sleep 5
        done
        wait "$pid" || rc=$?
        # 72: interrupted at the end of its budget, not a crash.
        [ "$rc" -eq 72 ] && rc=0
    else
        "$bindir/$t" -max_total_time="$secs" -dict=smtp.dict -max_len="$max_len" \
            -timeout=10 -print_final_stats=1 \
            -artifact_prefix="artifacts/$t/" "corpus/$t" "seeds/$t" >"$log" 2>&1 || rc=$?
    fi
    after=$(child_ticks)
    cpu=$(awk -v t=$((after - before)) -v hz="$hz" 'BEGIN { printf "%.2f", t / hz / 60 }')
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    corpus=$(ls "corpus/$t" | wc -l)
    line="$t: ${runs:-?} executions, ${cpu} CPU-minutes, corpus $corpus files"
    if [ "$rc" -ne 0 ]; then
        status=1
        line="$line, CRASH (exit $rc): $(grep -o 'artifacts/[^ ]*' "$log" | tail -1)"
        grep -m1 -A4 'panicked at' "$log" || tail -20 "$log"
    fi
    echo "$line"
    summary+=("$line")
done
echo
printf '%s\n' "${summary[@]}"
exit $status
