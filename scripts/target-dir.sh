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

# GiB free on the disk that holds the build output (or would: the nearest
# existing folder above it).
target_free_gib() {
  local on=$CARGO_TARGET_DIR
  while [ ! -d "$on" ]; do on=$(dirname "$on"); done
  df --output=avail -B1G "$on" | tail -1 | tr -d ' '
}
