#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of what hostile input
# reaches: request bodies, whole requests to a running node, SigV4
# headers, iterators and page tokens, Raft messages, metadata commands,
# shard, queue and delivery stream log entries (fuzz/).
#
# usage: scripts/fuzz.sh [SECONDS [TARGET...]]
#   SECONDS  how long each target runs (default 60)
#   TARGET   the targets to run (default: every one in fuzz/Cargo.toml)
# env: FUZZ_JOBS (parallel fuzzing processes per target, default 1),
#      FUZZ_ARGS (more libFuzzer options).
#
# Needs the workspace's release build first (`make build`): the fuzz build
# links the RocksDB library that build made instead of compiling RocksDB
# again with instrumentation (~15 minutes). The instrumented crates go to
# $CARGO_TARGET_DIR/fuzz. cargo-fuzz runs on this stable toolchain with
# `--sanitizer none`. Crashes land in fuzz/artifacts/<target>/, the corpus
# grows in fuzz/corpus/<target>/ (neither is committed; fuzz/seeds/ is).
# A target with fuzz/dicts/<target>.dict runs with that libFuzzer dictionary.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
seconds=${1:-60}
shift || true
die() { echo "fuzz: $*" >&2; exit 1; }

tools=${KINESIN_TOOLS:-/var/cache/kinesin/tools}
export PATH=$tools/bin:$PATH
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz in $tools"
  cargo install cargo-fuzz --locked --version 0.13.2 --root "$tools"
fi

# shellcheck source=scripts/target-dir.sh
. scripts/target-dir.sh
target=$CARGO_TARGET_DIR
# The newest RocksDB whose build script finished: cargo writes `output`
# beside `out/` at the end, and a build cut short leaves a partial archive.
finished=$(ls -t "$target"/release/build/librocksdb-sys-*/output 2>/dev/null | head -1) ||
  true
rocksdb=${finished%/output}/out
[ -n "$finished" ] && [ -f "$rocksdb/librocksdb.a" ] ||
  die "no RocksDB library under $target: run \`make build\` first"
export ROCKSDB_LIB_DIR=$rocksdb ROCKSDB_STATIC=1
export CARGO_TARGET_DIR=$target/fuzz
# cargo-fuzz adds its instrumentation flags to these; mold links faster.
if command -v mold >/dev/null; then export RUSTFLAGS="-C link-arg=-fuse-ld=mold"; fi

if [ $# -eq 0 ]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^kinesin-fuzz$')
else
  targets=("$@")
fi
# The fuzz workspace resolves from the project's lock file, so that it
# builds the very versions the project does (plus libFuzzer's crates).
cp Cargo.lock fuzz/Cargo.lock
# Each target's binary is 0.5-0.7 GiB. Its name carries a hash of the
# fuzz workspace's path and dependencies, so every clone location and
# dependency change leaves a full set behind: on one machine's shared
# target directory they filled the disk and the link failed. cargo links
# the current binary of each target to fuzz/<triple>/release/<target>;
# an executable (no extension) in deps/ with no second link is stale.
deps=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/deps
if [ -d "$deps" ]; then
  find "$deps" -maxdepth 1 -type f ! -name "*.*" -perm -u+x -links 1 -delete
fi
free_gib=$(target_free_gib)
if [ "$free_gib" -lt 10 ]; then
  echo "fuzz: only ${free_gib} GiB free under $target; the fuzz build needs" \
    "about 8 GiB, so its link may fail for want of disk" >&2
fi
cargo fuzz build --sanitizer none
jobs=()
if [ "${FUZZ_JOBS:-1}" -gt 1 ]; then jobs=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS"); fi
status=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  seeds=() dict=()
  [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
  [ -f "fuzz/dicts/$t.dict" ] && dict=(-dict="fuzz/dicts/$t.dict")
  echo "fuzz: $t for ${seconds}s"
  # The storage targets keep a RocksDB directory for the whole run, which
  # libFuzzer's exit never deletes: give each run its own and remove it.
  TMPDIR=$(mktemp -d "$target/fuzz/tmp.XXXXXX")
  export TMPDIR
  # shellcheck disable=SC2086  # FUZZ_ARGS is a list of options
  if ! cargo fuzz run --sanitizer none "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 "${dict[@]}" "${jobs[@]}" ${FUZZ_ARGS:-}; then
    echo "fuzz: $t FAILED; the input is in fuzz/artifacts/$t/" >&2
    status=1
  fi
  rm -rf "$TMPDIR"
done
exit $status
