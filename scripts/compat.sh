#!/usr/bin/env bash
# The AWS client compatibility suite (tests/compat): boto3 and the AWS CLI
# against real Kinesin node processes that the tests start themselves.
# Creates (once) a Python venv with pinned clients, builds the binary, runs
# pytest, then the API tests once more with a node killed. Usage:
# scripts/compat.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/target-dir.sh
TARGET_DIR="$CARGO_TARGET_DIR"
VENV="${KINESIN_VENV:-$TARGET_DIR/compat-venv}"
# awscli and boto3 pin matching botocore releases; keep the pair together.
# moto's S3 server is what Firehose delivers to in the tests; cramjam reads
# the Snappy objects back, pyarrow the Parquet ones.
PACKAGES=(boto3==1.43.11 awscli==1.45.11 pytest==8.4.2 cbor2==5.7.1 "moto[server]==5.2.5" cramjam==2.14.0 pyarrow==26.0.1)
STAMP="$VENV/.kinesin-packages"

need_apt=()
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# The TLS test makes a certificate with openssl and checks ALPN with curl.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# A real Prometheus scrapes a cluster; promtool checks the alert rules.
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || need_apt+=(prometheus)
# The NATS side of bench/compare gets a smoke test against a real server.
command -v nats-server >/dev/null 2>&1 || need_apt+=(nats-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "compat: installing ${need_apt[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "${PACKAGES[*]}" ]; then
  echo "compat: preparing $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PACKAGES[@]}"
  echo "${PACKAGES[*]}" > "$STAMP"
fi

# Built one at a time: together, cargo would unify their dependencies'
# features and build a second variant of the server next to `make build`'s.
cargo build --release --locked -p kinesin-server
cargo build --release --locked -p kinesin-nats-bench
export KINESIN_BIN="$TARGET_DIR/release/kinesin"
export KINESIN_NATS_BENCH="$TARGET_DIR/release/kinesin-nats-bench"
export PATH="$VENV/bin:$PATH"
"$VENV/bin/python" -m pytest -p no:cacheprovider -q tests/compat "$@"
# Degraded mode: the Kinesis API tests again, against the 3-node cluster with
# node 1 killed, through the survivors (a cluster must keep working with a
# node down). Skipped when pytest arguments select a part of the suite.
if [ $# -eq 0 ]; then
  echo "compat: degraded run (node 1 killed)"
  KINESIN_COMPAT_KILL=1 "$VENV/bin/python" -m pytest -p no:cacheprovider -q \
    -m "not own_cluster and not slow" tests/compat/test_kinesis.py tests/compat/test_cbor.py tests/compat/test_sqs.py \
    tests/compat/test_firehose.py
fi
