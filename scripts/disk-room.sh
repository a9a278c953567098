#!/usr/bin/env bash
# Makes room on the build output's disk before `make test` builds, when it
# is short. CI runs on a machine whose target directory keeps the output of
# earlier clones and commits, and a full disk failed a CI run at the fuzz
# build's link (stop 51). Below KINESIN_MIN_FREE_GIB (default 20) GiB free,
# this deletes what only costs build time: the incremental caches and the
# instrumented fuzz build (rebuilt by `make fuzz-smoke`; a fresh machine
# builds all of it anyway).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/target-dir.sh
. scripts/target-dir.sh
min=${KINESIN_MIN_FREE_GIB:-20}
have=$(target_free_gib)
if [ "$have" -ge "$min" ]; then
  exit 0
fi
echo "disk-room: ${have} GiB free under $CARGO_TARGET_DIR (below ${min});" \
  "deleting its incremental caches and fuzz build" >&2
rm -rf "$CARGO_TARGET_DIR"/*/incremental "$CARGO_TARGET_DIR/fuzz"
have=$(target_free_gib)
echo "disk-room: ${have} GiB free now" >&2
if [ "$have" -lt "$min" ]; then
  echo "disk-room: still short; the build may fail for want of disk" \
    "(\`cargo clean\` empties $CARGO_TARGET_DIR)" >&2
fi
