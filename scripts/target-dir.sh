# Sourced by the scripts: the same build-output default as the Makefile
# (under /var/cache when writable, so that CI runs and fresh clones on one
# machine share it and the binary a script runs is the one `make` built).
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  if [ -w /var/cache ] || [ -w /var/cache/kinesin ]; then
    CARGO_TARGET_DIR=/var/cache/kinesin/target
  else
    CARGO_TARGET_DIR="$PWD/target"
  fi
fi
export CARGO_TARGET_DIR
