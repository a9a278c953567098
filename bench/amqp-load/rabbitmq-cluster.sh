#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, for the SQS comparison in
# docs/benchmarks.md: `rabbitmq-cluster.sh start DIR` starts nodes
# rabbit1..3@localhost (AMQP ports 5672, 5673, 5674) with their data under
# DIR and joins them; `rabbitmq-cluster.sh stop DIR` stops them.
# Needs the Debian package rabbitmq-server (its service is not used).
set -euo pipefail
cmd=${1:?start or stop}
dir=${2:?a data directory}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

node_env() {
    local i=$1
    export RABBITMQ_NODENAME="rabbit$i@localhost"
    export RABBITMQ_NODE_PORT=$((5671 + i))
    export RABBITMQ_DIST_PORT=$((25671 + i))
    export RABBITMQ_MNESIA_BASE="$dir/rabbit$i/mnesia"
    export RABBITMQ_LOG_BASE="$dir/rabbit$i/log"
    export RABBITMQ_PID_FILE="$dir/rabbit$i/pid"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
}

case $cmd in
start)
    # No plugins (the management plugin's port would clash between nodes).
    # A quorum queue declared once all three joined has a member on each.
    echo "[]." > "$dir/enabled_plugins"
    for i in 1 2 3; do
        mkdir -p "$dir/rabbit$i/mnesia" "$dir/rabbit$i/log"
    done
    # Debian's wrapper runs the server as the user rabbitmq.
    if id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq: "$dir"; fi
    for i in 1 2 3; do
        (node_env "$i" && setsid rabbitmq-server </dev/null >"$dir/rabbit$i.out" 2>&1 &)
    done
    for i in 1 2 3; do
        # await_startup refuses a node that has not registered yet.
        for _ in $(seq 1 120); do
            rabbitmqctl -n "rabbit$i@localhost" ping >/dev/null 2>&1 && break
            sleep 1
        done
        rabbitmqctl -n "rabbit$i@localhost" await_startup --timeout 120 >/dev/null
    done
    for i in 2 3; do
        rabbitmqctl -n "rabbit$i@localhost" stop_app >/dev/null
        rabbitmqctl -n "rabbit$i@localhost" join_cluster rabbit1@localhost >/dev/null
        rabbitmqctl -n "rabbit$i@localhost" start_app >/dev/null
    done
    rabbitmqctl -n rabbit1@localhost cluster_status --formatter json |
        python3 -c 'import json, sys; print("running:", *json.load(sys.stdin)["running_nodes"])'
    ;;
stop)
    for i in 1 2 3; do
        rabbitmqctl -n "rabbit$i@localhost" stop >/dev/null 2>&1 || true
    done
    ;;
*)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
