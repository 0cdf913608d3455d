#!/usr/bin/env bash
# Runs the shop as one process per service on the real servers: etcd for discovery,
# tansu (Kafka) for events (both installed and started by scripts/servers.sh), PostgreSQL
# for users and orders, Redis for carts.
#
# Usage: bash scripts/shop-multiprocess.sh      (Ctrl-C stops every process)
# Data goes to target/shop-multiprocess/; logs to target/shop-multiprocess/<service>.log.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/micro-target}"
source scripts/servers.sh
servers_up

cargo build -p shop --features real-servers
shop="$CARGO_TARGET_DIR/debug/shop"
data="target/shop-multiprocess"
mkdir -p "$data"

export SHOP_DATA_DIR="$data"
# `shop serve` refuses the built-in development secret, and has no services' key built in.
export SHOP_JWT_SECRET="${SHOP_JWT_SECRET:-$(openssl rand -base64 48)}"
export SHOP_IDENTITY_SECRET="${SHOP_IDENTITY_SECRET:-$(openssl rand -base64 48)}"
export SHOP_ETCD_ENDPOINTS="$MICRO_TEST_ETCD_ENDPOINT"
export SHOP_KAFKA_BROKERS="$MICRO_TEST_KAFKA_BROKERS"
export SHOP_POSTGRES_URL="${SHOP_POSTGRES_URL:-$MICRO_TEST_POSTGRES_URL}"
export SHOP_REDIS_URL="${SHOP_REDIS_URL:-$MICRO_TEST_REDIS_URL}"
export SHOP_ETCD_PREFIX="${SHOP_ETCD_PREFIX:-/micro/shop/}"

pids=()
stop() {
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
}
trap stop EXIT INT TERM

for service in user product order cart payment inventory notification gateway; do
    "$shop" serve "$service" >"$data/$service.log" 2>&1 &
    pids+=($!)
done

echo "waiting for the gateway on http://127.0.0.1:8080 ..."
deadline=$((SECONDS + 60))
until curl -fsS http://127.0.0.1:8080/api/products/SKU-1001 >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
        echo "error: the shop did not come up; see $data/*.log" >&2
        exit 1
    fi
    sleep 0.5
done
echo "the shop runs as ${#pids[@]} processes; try: curl http://127.0.0.1:8080/api/products"
wait "${pids[@]}"
