# Sourced by the bench scripts that run `$SERVER dev --nodes 3` (API on
# 127.0.0.1:7450, 7460 and 7470). `dev_up DATA_DIR LOG` starts a cluster and
# waits (at most 120 s) until its three nodes are reachable, printing the end
# of LOG if they are not; `dev_down` stops it and waits (at most 10 s) until
# its processes have exited, so that the next cluster can bind the same ports.
DEV=""

dev_up() {
  local data=$1 log=$2
  KINESIN_LOG=warn setsid "$SERVER" dev --nodes 3 --data-dir "$data" >"$log" 2>&1 &
  DEV=$!
  for _ in $(seq 1 120); do
    if [ "$("$SERVER" cluster nodes --json --endpoint 127.0.0.1:7451 2>/dev/null | grep -c '"reachable": true')" = 3 ]; then
      return 0
    fi
    sleep 1
  done
  echo "the cluster of $SERVER did not come up; the end of its log:" >&2
  tail -n 20 "$log" >&2
  return 1
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
