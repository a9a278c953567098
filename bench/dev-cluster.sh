# Sourced by the bench scripts that run 3-node clusters of `$SERVER`.
# `dev_up DATA_DIR LOG` starts `$SERVER dev --nodes 3` (API on 127.0.0.1:7450,
# 7460 and 7470) and waits until its nodes are reachable; `wait_ready GRPC
# LOG` is that wait (at most 120 s, then the end of LOG is printed) for a
# cluster whose node answers at GRPC; `dev_down` stops every `$SERVER dev`
# or `server` process and waits (at most 10 s) until they have exited, so
# that the next cluster can bind the same ports.
DEV=""

wait_ready() {
  local grpc=$1 log=$2
  for _ in $(seq 1 120); do
    if [ "$("$SERVER" cluster nodes --json --endpoint "$grpc" 2>/dev/null | grep -c '"reachable": true')" = 3 ]; then
      return 0
    fi
    sleep 1
  done
  echo "the cluster of $SERVER did not come up; the end of its log:" >&2
  tail -n 20 "$log" >&2
  return 1
}

dev_up() {
  local data=$1 log=$2
  KINESIN_LOG=warn setsid "$SERVER" dev --nodes 3 --data-dir "$data" >"$log" 2>&1 &
  DEV=$!
  wait_ready 127.0.0.1:7451 "$log"
}

dev_down() {
  [ -n "$DEV" ] && kill -TERM -- "-$DEV" 2>/dev/null || true
  # `dev` does not always take its nodes down with it.
  pkill -KILL -f "$SERVER (dev|server)" 2>/dev/null || true
  for _ in $(seq 1 100); do
    pgrep -f "$SERVER (dev|server)" >/dev/null || break
    sleep 0.1
  done
  DEV=""
}
