# Sourced by scripts/test and .ci/run: makes sure every server the tests talk to is
# installed and running, and exports where it listens. Idempotent: servers already
# running are reused.
#
# Servers and how they are provided:
#   PostgreSQL  127.0.0.1:5432, trust auth, database `test`  (provided by the machine)
#   Redis       127.0.0.1:6379                                (provided by the machine)

servers_log_dir="${MICRO_SERVERS_DIR:-/var/tmp/micro-servers}"

wait_for_port() {
    local name=$1 host=$2 port=$3 deadline=$((SECONDS + ${4:-30}))
    until (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "error: $name is not listening on $host:$port" >&2
            return 1
        fi
        sleep 0.2
    done
}

servers_up() {
    mkdir -p "$servers_log_dir"
    # PostgreSQL and Redis come with the machine; start them if they stopped.
    if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null && command -v pg_ctlcluster >/dev/null; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    fi
    if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && command -v redis-server >/dev/null; then
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
            --logfile "$servers_log_dir/redis.log" || true
    fi
    wait_for_port PostgreSQL 127.0.0.1 5432
    wait_for_port Redis 127.0.0.1 6379
    export MICRO_TEST_POSTGRES_URL="${MICRO_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
    export MICRO_TEST_REDIS_URL="${MICRO_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
}
