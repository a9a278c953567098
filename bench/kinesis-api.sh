#!/usr/bin/env bash
# Kinesis API benchmark of docs/benchmarks.md: the same client
# (`kinesin bench produce --protocol aws-json`, SigV4-signed JSON over
# HTTP/1.1) against
#   kinesin-3   three `kinesin server` processes on loopback (RF=3, fsync on)
#   kinesalite  (npm kinesalite, single process, in memory)
#   mock        kinesis-mock (npm kinesis-local, single process, in memory)
# plus the native gRPC API of the same Kinesin cluster, to show what the HTTP
# layer costs. Workloads: PutRecords of 500 x 1 KiB (closed loop) and
# PutRecord (batch 1) latency at a fixed rate. Rounds alternate between the
# targets; the table shows medians and the ratio Kinesin/peer.
# Usage: bench/kinesis-api.sh [seconds-per-run] [rounds]   (needs `make build`)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-/var/cache/kinesin/target}
K=$TARGET/release/kinesin
DUR=${1:-10}
ROUNDS=${2:-3}
PEERS=${KINESIN_PEERS_DIR:-/var/cache/kinesin/peers}
WORK=$(mktemp -d /tmp/kinesin-apibench.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

if [ ! -x "$PEERS/node_modules/.bin/kinesalite" ] || [ ! -x "$PEERS/node_modules/.bin/kinesis-local" ]; then
  echo "installing kinesalite and kinesis-local into $PEERS"
  mkdir -p "$PEERS"
  (cd "$PEERS" && npm install --no-audit --no-fund kinesalite kinesis-local >/dev/null)
fi

for k in 0 1 2; do
  seeds=""
  [ "$k" -gt 0 ] && seeds="--seeds 127.0.0.1:18451"
  KINESIN_LOG=warn KINESIN_INSECURE_INTERNAL=true $K server --node-id $((k + 1)) --data-dir "$WORK/node-$k" \
    --listen-api 127.0.0.1:$((18450 + 10 * k)) --listen-grpc 127.0.0.1:$((18451 + 10 * k)) \
    --listen-admin 127.0.0.1:$((18452 + 10 * k)) $seeds >"$WORK/node-$k.log" 2>&1 &
  PIDS+=($!)
done
"$PEERS/node_modules/.bin/kinesalite" --port 18600 --createStreamMs 0 >"$WORK/kinesalite.log" 2>&1 &
PIDS+=($!)
# kinesis-mock reads server.json from its working directory.
(cd "$PEERS/node_modules/kinesis-local" && KINESIS_MOCK_PLAIN_PORT=18700 KINESIS_MOCK_TLS_PORT=18701 \
  LOG_LEVEL=WARN exec node main.js) >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 120); do
  if $K cluster info --endpoint 127.0.0.1:18451 2>/dev/null | grep -q '"id": 3' \
    && curl -s -o /dev/null 127.0.0.1:18600 && curl -s -o /dev/null 127.0.0.1:18700; then break; fi
  sleep 1
done
sleep 3

declare -A EP=(
  [kinesin-3]="--protocol aws-json --endpoints 127.0.0.1:18450,127.0.0.1:18460,127.0.0.1:18470"
  [kinesin-3-grpc]="--protocol grpc --endpoints 127.0.0.1:18451,127.0.0.1:18461,127.0.0.1:18471"
  [kinesalite]="--protocol aws-json --endpoints 127.0.0.1:18600"
  [mock]="--protocol aws-json --endpoints 127.0.0.1:18700"
)
ORDER=(kinesin-3 kinesalite mock kinesin-3-grpc)

run() { # target workload round
  local t=$1 w=$2 r=$3 out="$WORK/$1-$2-$3.json" extra
  case $w in
    ingest) extra="--record-size 1024 --batch 500 --concurrency 16" ;;
    putrecord) extra="--record-size 1024 --batch 1 --concurrency 16 --rate 400" ;;
  esac
  # shellcheck disable=SC2086
  $K bench produce ${EP[$t]} --stream "api-$w" --shards 4 $extra --duration-secs "$DUR" --json \
    2>/dev/null >"$out" || echo '{"records_per_sec":0,"errors":-1,"batch_latency_ms":{"p50":0,"p99":0}}' >"$out"
  echo "$t $w round $r: $(python3 -c "import json; d=json.load(open('$out')); print(int(d['records_per_sec']), 'rec/s', 'p50', d['batch_latency_ms']['p50'], 'p99', d['batch_latency_ms']['p99'], 'errors', d['errors'])")"
}

for r in $(seq 1 "$ROUNDS"); do
  for w in ingest putrecord; do
    for t in "${ORDER[@]}"; do run "$t" "$w" "$r"; done
  done
done

python3 - "$WORK" "$ROUNDS" <<'PY'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
targets = ["kinesin-3", "kinesin-3-grpc", "kinesalite", "mock"]
def med(t, w, f):
    vals = []
    for r in range(1, rounds + 1):
        d = json.load(open(f"{work}/{t}-{w}-{r}.json"))
        vals.append(f(d))
    return statistics.median(vals)
print()
print(f"{'workload':<34}" + "".join(f"{t:>16}" for t in targets) + f"{'vs kinesalite':>15}{'vs mock':>10}")
rows = [
    ("ingest 500x1KiB records/s", "ingest", lambda d: d["records_per_sec"]),
    ("PutRecord @400/s p50 ms", "putrecord", lambda d: d["batch_latency_ms"]["p50"]),
    ("PutRecord @400/s p99 ms", "putrecord", lambda d: d["batch_latency_ms"]["p99"]),
]
for name, w, f in rows:
    vals = {t: med(t, w, f) for t in targets}
    ratio = lambda p: (vals["kinesin-3"] / vals[p]) if vals[p] else float("nan")
    print(f"{name:<34}" + "".join(f"{vals[t]:>16.1f}" for t in targets) + f"{ratio('kinesalite'):>15.2f}{ratio('mock'):>10.2f}")
PY
