#!/bin/bash
# Run every fuzz target (cargo-fuzz / libFuzzer, AddressSanitizer) for a
# given time and print libFuzzer's figures for each.
#   bash scripts/fuzz.sh [SECONDS per target, default 600] [TARGET...]
# FUZZ_JOBS targets run at a time (default 2). Needs cargo-fuzz (installed here if
# missing) and runs on the stable toolchain (RUSTC_BOOTSTRAP=1 lets it use
# the sanitizer flags). Corpora grow in fuzz/corpus/<target> (the seeds
# in fuzz/seeds/<target> are committed); crashes land in fuzz/artifacts/<target>.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(cpio_reader plan_json config_toml kernel_cmdline dhcp_packet tool_output signed_plan)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
export RUSTC_BOOTSTRAP=1 CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
# The main workspace's rustflags (crt-static) do not apply: cargo-fuzz sets
# its own.
for t in "${targets[@]}"; do cargo fuzz build "$t" >/dev/null; done
logs=$(mktemp -d)
run() {
    local t=$1
    mkdir -p "corpus/$t"
    cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$secs" -print_final_stats=1 \
        -rss_limit_mb=2048 -max_len=65536 >"$logs/$t.log" 2>&1
    echo "$? $t" >"$logs/$t.rc"
}
running=0
for t in "${targets[@]}"; do
    run "$t" &
    running=$((running + 1))
    if [ "$running" -ge "${FUZZ_JOBS:-2}" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true
fail=0
printf '%-16s %12s %10s %8s %8s %s\n' target execs exec/s cov ft result
for t in "${targets[@]}"; do
    rc=$(cut -d' ' -f1 "$logs/$t.rc" 2>/dev/null || echo 99)
    execs=$(awk '/^stat::number_of_executed_units/ {print $NF}' "$logs/$t.log" | tail -1)
    eps=$(awk '/^stat::average_exec_per_sec/ {print $NF}' "$logs/$t.log" | tail -1)
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$logs/$t.log" | tail -1 || true)
    cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$done_line")
    ft=$(sed -n 's/.*ft: \([0-9]*\).*/\1/p' <<<"$done_line")
    if [ "$rc" = 0 ]; then res=ok; else res="CRASH (see fuzz/artifacts/$t, log $logs/$t.log)"; fail=1; fi
    printf '%-16s %12s %10s %8s %8s %s\n' "$t" "${execs:-?}" "${eps:-?}" "${cov:-?}" "${ft:-?}" "$res"
done
exit $fail
