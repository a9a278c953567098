#!/usr/bin/env bash
# Makes room on the build output's disk before `make test` builds, when it
# is short. CI runs on a machine whose target directory keeps the output of
# earlier clones and commits, and a full disk failed a CI run at the fuzz
# build's link (stop 51). Below KINESIN_MIN_FREE_GIB (default 20) GiB free,
# this deletes build output in steps, cheapest to rebuild first, until that
# much is free:
#   1. the incremental caches and the instrumented fuzz build;
#   2. every executable in a deps/ folder that nothing links to: stale test
#      binaries of older builds, and current ones that the build compiles
#      again;
#   3. all of it: the build is then a cold one, as on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/target-dir.sh
. scripts/target-dir.sh
min=${KINESIN_MIN_FREE_GIB:-20}
dir=$CARGO_TARGET_DIR
enough() {
  local have
  have=$(target_free_gib)
  echo "disk-room: ${have} GiB free under $dir (${min} wanted)" >&2
  [ "$have" -ge "$min" ]
}
enough && exit 0
echo "disk-room: deleting the incremental caches and the fuzz build" >&2
rm -rf "$dir"/*/incremental "$dir/fuzz"
enough && exit 0
echo "disk-room: deleting the executables of $dir/*/deps that nothing links to" >&2
find "$dir" -mindepth 2 -maxdepth 3 -path '*/deps/*' -type f ! -name '*.*' \
  -perm -u+x -links 1 -delete
enough && exit 0
echo "disk-room: deleting $dir: the build starts cold" >&2
rm -rf "${dir:?}"
enough || echo "disk-room: still short; the build may fail for want of disk" >&2
