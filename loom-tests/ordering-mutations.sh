#!/usr/bin/env bash
# Weakens each memory ordering of the ring protocol (and removes each of the reader's
# hostile-producer checks) one at a time, in a private copy of the committed tree, runs
# the loom models against it, and expects at least one model to fail. Prints one table
# row per change: the models that failed and the first failure message.
#
#   loom-tests/ordering-mutations.sh            # every change (47 min on a busy 2-core machine)
#   loom-tests/ordering-mutations.sh 1 4        # only changes 1 and 4
#
# Exits non-zero if a change is not caught by any model, or if a change no longer
# applies (its line was edited: update the pattern here). The working tree is never
# touched: each change is made to a fresh `git archive` of HEAD under a temporary
# directory, built in target/loom-mutations (shared between runs, so dependencies are
# built once).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
# Shared by every run (dependencies are built once); each change's test log is kept
# here as change-N.log.
target="$repo/target/loom-mutations"
mkdir -p "$target"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Change N: its name, the file, the text to find there (exactly once) and its
# replacement.
change() {
  case "$1" in
    1) name="Writer::write_and_publish (push, try_push): write position store Release -> Relaxed"
       file=ring/src/writer.rs
       find="position.store(next, Ordering::Release)"
       replace="position.store(next, Ordering::Relaxed)" ;;
    2) name="Writer::publish (flush): write position store Release -> Relaxed"
       file=ring/src/writer.rs
       find="self.region.write_pos().store(self.write, Ordering::Release)"
       replace="self.region.write_pos().store(self.write, Ordering::Relaxed)" ;;
    3) name="Reader::available: write position load Acquire -> Relaxed"
       file=ring/src/reader.rs
       find="self.region.write_pos().load(Ordering::Acquire)"
       replace="self.region.write_pos().load(Ordering::Relaxed)" ;;
    4) name="Reader::drain: read position store Release -> Relaxed"
       file=ring/src/reader.rs
       find="self.region.read_pos().store(self.read, Ordering::Release)"
       replace="self.region.read_pos().store(self.read, Ordering::Relaxed)" ;;
    5) name="Writer::refresh: read position load Acquire -> Relaxed"
       file=ring/src/writer.rs
       find="self.cached_read = self.region.read_pos().load(Ordering::Acquire)"
       replace="self.cached_read = self.region.read_pos().load(Ordering::Relaxed)" ;;
    6) name="reader's out-of-range check removed"
       file=ring/src/reader.rs
       find="if available > self.capacity {"
       replace="if false && available > self.capacity {" ;;
    7) name="reader's moved-back check removed"
       file=ring/src/reader.rs
       find="if write.wrapping_sub(self.last_write) > u64::MAX / 2 {"
       replace="if false && write.wrapping_sub(self.last_write) > u64::MAX / 2 {" ;;
    8) name="quarantine not sticky (checked afresh every drain)"
       file=ring/src/reader.rs
       find="if let Some(violation) = self.quarantine {"
       replace="if let Some(violation) = self.quarantine.filter(|_| false) {" ;;
    9) name="Writer::write_run (push_all, push_with): write position store Release -> Relaxed"
       file=ring/src/writer.rs
       find="position.store(write, Ordering::Release)"
       replace="position.store(write, Ordering::Relaxed)" ;;
    *) return 1 ;;
  esac
}
changes=9

selected=("$@")
if [ ${#selected[@]} -eq 0 ]; then
  selected=($(seq 1 "$changes"))
fi

printf '| # | change | models failed | first failure |\n| --- | --- | --- | --- |\n'
survivors=0
for n in "${selected[@]}"; do
  change "$n" || { echo "no change $n (1 to $changes)" >&2; exit 2; }
  tree="$work/tree-$n"
  mkdir -p "$tree"
  git -C "$repo" archive HEAD | tar -x -C "$tree"
  count=$(grep -cF -- "$find" "$tree/$file" || true)
  if [ "$count" != 1 ]; then
    printf '| %s | %s | pattern found %s times in %s: update this script | |\n' "$n" "$name" "$count" "$file"
    survivors=$((survivors + 1))
    continue
  fi
  # A literal substitution (quoted pattern and replacement); the file's last newline,
  # which $(cat) drops, is put back.
  text=$(cat "$tree/$file")
  printf '%s\n' "${text/"$find"/"$replace"}" >"$tree/$file"
  if grep -qF -- "$find" "$tree/$file"; then
    printf '| %s | %s | the change did not apply | |\n' "$n" "$name"
    survivors=$((survivors + 1))
    continue
  fi
  log="$target/change-$n.log"
  (cd "$tree" && RUSTFLAGS="--cfg telemetry_loom" nice -n 19 cargo test --locked \
    -p telemetry-loom-tests --release --target-dir "$target" --no-fail-fast -- --test-threads=1) >"$log" 2>&1 || true
  failed=$( (grep -E '^test .* \.\.\. FAILED$' "$log" || true) |
    sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | sort -u | paste -sd ',' | sed 's/,/, /g')
  # The message under the first "panicked at" line: loom's causality report or the
  # model's failed assertion.
  first=$( (grep -m1 -A1 'panicked at' "$log" || true) | tail -n 1 | cut -c1-120 |
    sed 's/|/\\|/g')
  if grep -qE '^error(\[|:)' "$log" && [ -z "$failed" ]; then
    printf '| %s | %s | did not compile | %s |\n' "$n" "$name" "$(grep -m1 -E '^error' "$log")"
    survivors=$((survivors + 1))
  elif [ -z "$failed" ]; then
    printf '| %s | %s | **none: not caught** | |\n' "$n" "$name"
    survivors=$((survivors + 1))
  else
    printf '| %s | %s | %s | %s |\n' "$n" "$name" "$failed" "$first"
  fi
  rm -rf "$tree"
done
if [ "$survivors" -gt 0 ]; then
  echo "$survivors change(s) not caught or not applied" >&2
  exit 1
fi
echo "every change was caught by at least one loom model"
