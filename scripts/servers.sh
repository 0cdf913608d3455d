# Sourced by scripts/test and .ci/run: makes sure every server the tests talk to is
# installed and running, and exports where it listens. Idempotent: servers already
# running are reused.
#
# Servers and how they are provided:
#   PostgreSQL  127.0.0.1:5432, trust auth, database `test`  (provided by the machine)
#   Redis       127.0.0.1:6379                                (provided by the machine)
#   etcd        Debian's etcd-server, free loopback port       (scripts/etcd.sh)
#   Kafka       tansu 0.6 from crates.io, free loopback port  (scripts/tansu.sh)
#
# Build tools some crates need (protoc for etcd-client, cmake for librdkafka) are
# installed here too, before anything is compiled.

servers_log_dir="${MICRO_SERVERS_DIR:-/var/tmp/micro-servers}"
servers_scripts_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Installs Debian packages that are missing, updating the package lists only if needed.
apt_install() {
    local missing=()
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$package")
    done
    ((${#missing[@]} == 0)) && return 0
    local sudo=()
    ((EUID == 0)) || sudo=(sudo)
    echo "servers.sh: installing ${missing[*]}" >&2
    if ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; then
        "${sudo[@]}" apt-get update &&
            DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

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
    apt_install protobuf-compiler libprotobuf-dev cmake curl ca-certificates prometheus
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
    # The independent gRPC client of the shop's ProductService tests (PyPI's grpcio).
    python3 -c "import grpc, grpc_tools" 2>/dev/null || python3 -m pip install --quiet grpcio grpcio-tools >>"$servers_log_dir/pip.log" 2>&1 || echo "warning: installing grpcio failed; the shop's grpc test will fail" >&2

    local script
    for script in etcd tansu; do
        if [[ -f "$servers_scripts_dir/$script.sh" ]]; then
            # shellcheck source=/dev/null
            source "$servers_scripts_dir/$script.sh"
            "${script}_up"
        fi
    done
}
