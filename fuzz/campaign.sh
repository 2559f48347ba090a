#!/usr/bin/env bash
# A recorded fuzzing campaign: each target in turn (one libFuzzer process at a time,
# niced), RUNS executions each (default 10 million) or until MAX_SECONDS (default: no
# limit), from target/fuzz/corpus/<target>/ plus the kept inputs in
# fuzz/regressions/<target>/. Each target's full libFuzzer log goes to
# target/fuzz/campaign/<target>.log; a summary line per target (runs, seconds,
# coverage) is printed as it finishes. A crash stops that target; its input is left in
# target/fuzz/artifacts/<target>/ (minimise it with `cargo fuzz tmin`, keep it in
# fuzz/regressions/<target>/, fix the bug).
#
#   fuzz/campaign.sh                       # every target, stable, no sanitizer
#   MAX_SECONDS=600 fuzz/campaign.sh metricsd_drain
#   SANITIZER=address TOOLCHAIN=nightly fuzz/campaign.sh ring_reader
#   TRACE_COMPARES=0 fuzz/campaign.sh prometheus_roundtrip
#
# TRACE_COMPARES=0 builds without libFuzzer's comparison tracing (`--no-trace-compares`,
# into target/fuzz-ntc): about twice the inputs a second for the targets that turn the
# input into choices (the drain loop, the exporters' round trips), whose comparisons
# with magic values the tracing would otherwise help the fuzzer to pass.
#
# BUILD=0 runs the binaries already in target/fuzz without rebuilding them; BIN=<dir>
# runs those in <dir> instead (a copy, so that a rebuild does not replace them mid-run);
# LOG_DIR=<dir> puts the logs there instead of target/fuzz/campaign/.
set -euo pipefail
cd "$(dirname "$0")/.."

runs="${RUNS:-10000000}"
max_seconds="${MAX_SECONDS:-0}"
sanitizer="${SANITIZER:-none}"
toolchain="${TOOLCHAIN:-stable}"
root="$PWD/target/fuzz"
build_root="$root"
trace_flag=()
if [ "${TRACE_COMPARES:-1}" = 0 ]; then
  build_root="$PWD/target/fuzz-ntc"
  trace_flag=(--no-trace-compares)
fi
dir="${LOG_DIR:-$root/campaign}"
mkdir -p "$dir"

if [ "${BUILD:-1}" != 0 ]; then
  (cd fuzz && cargo "+$toolchain" fuzz build -s "$sanitizer" "${trace_flag[@]}" --target-dir "$build_root")
fi
bin="${BIN:-$build_root/x86_64-unknown-linux-gnu/release}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=($(cd fuzz && cargo fuzz list))
fi
echo "commit $(git rev-parse --short HEAD) (binaries built $(date -u -r "$bin" '+%H:%M UTC')), $(date -u '+%Y-%m-%d %H:%M UTC'), sanitizer $sanitizer, trace compares ${TRACE_COMPARES:-1}, $(rustc "+$toolchain" --version)"
for t in "${targets[@]}"; do
  mkdir -p "$root/corpus/$t" "$root/artifacts/$t"
  log="$dir/$t.log"
  status=0
  nice -n 19 "$bin/$t" -runs="$runs" -max_total_time="$max_seconds" -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$root/artifacts/$t/" \
    "$root/corpus/$t" "fuzz/regressions/$t" >"$log" 2>&1 || status=$?
  # The last status line: coverage (cov) and features (ft) reached.
  done_line=$(grep -E '^#[0-9]+[[:space:]]' "$log" | tail -1 | tr '\t' ' ')
  units=$(grep -E 'stat::number_of_executed_units' "$log" | awk '{print $2}')
  rate=$(grep -E 'stat::average_exec_per_sec' "$log" | awk '{print $2}')
  seconds=$(( ${units:-0} / (${rate:-0} > 0 ? ${rate:-1} : 1) ))
  echo "$t: exit $status, ${units:-?} runs in ${seconds:-?} s, ${done_line:-no final line}"
done
