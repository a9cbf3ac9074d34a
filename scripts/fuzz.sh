#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (see fuzz/README.md) for a number of
# inputs each, one libFuzzer process per target (no -jobs/-workers: one
# core), and prints per target the inputs run, exec/s, wall time, corpus and
# coverage, and any crash, panic or hang found.
#
#   scripts/fuzz.sh                       # 10 000 000 inputs for each target
#   scripts/fuzz.sh 100000                # a quick run
#   scripts/fuzz.sh 1000000 reply_framing # one target
#
# Environment:
#   FUZZ_SANITIZER  none (default) or address. The fuzzed code has no
#                   unsafe; `address` needs -Zsanitizer, which this script
#                   allows on the stable toolchain with RUSTC_BOOTSTRAP=1.
#   FUZZ_MAX_LEN    longest input libFuzzer makes (default 4096).
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a hang
#                   (default 10).
#   FUZZ_NICE       niceness of the fuzzer (default 10).
#   FUZZ_ARGS       more libFuzzer arguments (e.g. "-seed=1").
#
# The seeds are read from fuzz/corpus/<target>/ (kept in git, made by
# fuzz/seed.py); what libFuzzer adds goes to fuzz/work/<target>/ and crashes
# to fuzz/artifacts/<target>/ (both ignored by git). Exit status 1 if any
# target crashed.
set -euo pipefail

runs=${1:-10000000}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request_framing reply_framing)
sanitizer=${FUZZ_SANITIZER:-none}
max_len=${FUZZ_MAX_LEN:-4096}
timeout=${FUZZ_TIMEOUT:-10}
niceness=${FUZZ_NICE:-10}
read -r -a extra <<<"${FUZZ_ARGS:-}"

cd "$(dirname "$0")/../fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
# cargo fuzz itself needs no nightly feature with --sanitizer none; the
# sanitizers are -Z flags, which the stable compiler takes only with this.
if [ "$sanitizer" != none ]; then
    export RUSTC_BOOTSTRAP=1
fi

# Release build with debug assertions and overflow checks (cargo fuzz's
# default), coverage instrumentation and libFuzzer's comparison tracing.
mkdir -p work
for target in "${targets[@]}"; do
    echo "fuzz.sh: building $target" >&2
    if ! nice -n "$niceness" cargo fuzz build --sanitizer "$sanitizer" "$target" >"work/build-$target.log" 2>&1; then
        cat "work/build-$target.log" >&2
        exit 1
    fi
done

failed=0
summary=()
for target in "${targets[@]}"; do
    mkdir -p "work/$target" "artifacts/$target"
    log="work/$target.log"
    echo "fuzz.sh: $target: $runs inputs (log: fuzz/$log)" >&2
    start=$(date +%s)
    status=0
    nice -n "$niceness" cargo fuzz run --sanitizer "$sanitizer" "$target" \
        "work/$target" "corpus/$target" -- \
        -runs="$runs" -max_len="$max_len" -timeout="$timeout" \
        -print_final_stats=1 -print_pcs=0 "${extra[@]}" >"$log" 2>&1 || status=$?
    wall=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\) corp: \([^ ]*\).*/cov \1, ft \2, corpus \3/p' <<<"$last")
    files=$(find "work/$target" -type f | wc -l)
    line="$target: ${execs:-?} inputs in ${wall}s (${rate:-?} exec/s), $cov; fuzz/work/$target: $files files"
    if [ "$status" -ne 0 ] || grep -qE '^==[0-9]+== ?ERROR|deadly signal|panicked at|ALARM: working on the last Unit' "$log"; then
        failed=1
        crash=$(grep -oE "(Test unit written to|artifact_prefix.*; Test unit written to) [^ ]+" "$log" | tail -1 || true)
        panic=$(grep -m1 -A2 'panicked at' "$log" || true)
        line="$line
  CRASH (exit $status): ${crash:-see fuzz/$log}
$(sed 's/^/    /' <<<"$panic")
  minimize: cd fuzz && cargo fuzz tmin --sanitizer $sanitizer $target <artifact>"
    else
        line="$line; no crash"
    fi
    summary+=("$line")
    echo "$line" >&2
done

echo
echo "== fuzz summary ($runs inputs per target, sanitizer $sanitizer) =="
printf '%s\n' "${summary[@]}"
exit "$failed"
