#!/usr/bin/env bash
# Installs what building and testing Kinesin needs on a Debian machine, and
# nothing that is already there. Safe to run again.
set -euo pipefail

need_apt=()
# rust-rocksdb generates its bindings with bindgen, which loads libclang's C
# library: libclang.so[.N] or libclang-N.so[.N] (package libclang1-N). Other
# files named libclang* (libclang-cpp.so.N, the C++ interface that a fresh
# machine has) are not it, so only those two forms count.
has_libclang() {
  local dir f
  for dir in ${LIBCLANG_PATH:-} /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib; do
    for f in "$dir"/libclang.so "$dir"/libclang.so.[0-9]* "$dir"/libclang-[0-9]*.so "$dir"/libclang-[0-9]*.so.[0-9]*; do
      [ -e "$f" ] && return 0
    done
  done
  return 1
}
has_libclang || need_apt+=(libclang-dev)
# The linker named in .cargo/config.toml.
command -v mold >/dev/null 2>&1 || need_apt+=(mold)
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
# The chaos harness: network namespaces, veth and bridges (ip), partitions
# and packet loss (nft).
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install Rust (rustup) first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest >/dev/null
fi
