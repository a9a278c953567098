#!/usr/bin/env bash
# The cluster-core benchmark of docs/benchmarks.md: three `kinesin server`
# processes on loopback (RF=3, fsync on), then
#   1. maximum append throughput of 1 KiB records (closed loop),
#   2. latency at half that rate (open loop),
#   3. idle CPU and RSS with 1,000 shard groups per node.
# Usage: [KINESIN_BENCH_TLS=1] bench/core.sh [duration-seconds] [skip-idle]   (needs `make build` first)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-/var/cache/kinesin/target}
K=$TARGET/release/kinesin
DUR=${1:-20}
WORK=$(mktemp -d /tmp/kinesin-bench.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
# The internal port (Raft, and the bench's gRPC client) is plaintext unless
# KINESIN_BENCH_TLS=1: then mutual TLS with the test certificates.
if [ "${KINESIN_BENCH_TLS:-}" = 1 ]; then
  F=$PWD/tests/fixtures/internal-tls
  export KINESIN_INTERNAL_TLS_CA=$F/ca.crt KINESIN_INTERNAL_TLS_CERT=$F/node.crt KINESIN_INTERNAL_TLS_KEY=$F/node.key
else
  export KINESIN_INSECURE_INTERNAL=true
fi

start() {
  local k=$1
  local seeds=""
  [ "$k" -gt 0 ] && seeds="--seeds 127.0.0.1:17451"
  KINESIN_LOG=warn $K server --node-id $((k + 1)) --data-dir "$WORK/node-$k" \
    --listen-api 127.0.0.1:$((17450 + 10 * k)) --listen-grpc 127.0.0.1:$((17451 + 10 * k)) \
    --listen-admin 127.0.0.1:$((17452 + 10 * k)) $seeds >"$WORK/node-$k.log" 2>&1 &
  PIDS+=($!)
}
for k in 0 1 2; do start $k; done
EPS=127.0.0.1:17451,127.0.0.1:17461,127.0.0.1:17471
for _ in $(seq 1 120); do
  if $K cluster info --endpoint 127.0.0.1:17451 2>/dev/null | grep -q '"id": 3'; then break; fi
  sleep 1
done
sleep 3

echo "== 1. max throughput, 1 KiB records, RF=3, fsync on"
$K bench produce --endpoints $EPS --stream tput --shards 8 --record-size 1024 --batch 100 \
  --concurrency 48 --duration-secs "$DUR" --json | tee "$WORK/max.json"
MAX=$(python3 -c "import json,sys; print(int(json.load(open('$WORK/max.json'))['records_per_sec']))")

echo "== 2. latency at half load ($((MAX / 2)) records/s)"
$K bench produce --endpoints $EPS --stream half --shards 8 --record-size 1024 --batch 100 \
  --concurrency 48 --duration-secs "$DUR" --rate $((MAX / 2)) --json

[ "${2:-}" = "skip-idle" ] && exit 0
echo "== 3. idle cost of 1,000 shard groups per node"
$K stream create idle --shards 1000 --endpoint 127.0.0.1:17451
for _ in $(seq 1 300); do
  n=$(curl -s 127.0.0.1:17452/admin/cluster | python3 -c "import json,sys; d=json.load(sys.stdin); print(sum(1 for g in d['groups'] if g['leader'] is not None))")
  [ "$n" -ge 1000 ] && break
  sleep 2
done
sleep 20
for i in 0 1 2; do
  pid=${PIDS[$i]}
  t0=$(awk '{print $14+$15}' /proc/$pid/stat)
  sleep 30
  t1=$(awk '{print $14+$15}' /proc/$pid/stat)
  rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
  hz=$(getconf CLK_TCK)
  python3 -c "print(f'node $((i+1)): {($t1-$t0)/$hz/30*100:.1f}% of one core idle, RSS {$rss/1024:.0f} MiB')"
done
