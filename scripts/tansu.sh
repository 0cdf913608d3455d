# Sourced by scripts/servers.sh: installs and starts tansu, an Apache Kafka
# compatible broker from crates.io, and exports MICRO_TEST_KAFKA_BROKERS.
#
#   tansu_up    install tansu 0.6 if missing, start it on a loopback port (or reuse
#               the one running there), wait until it listens, export the address
#               (MICRO_TEST_KAFKA_BROKERS) and the binary (MICRO_TANSU_BIN, for the
#               tests that start brokers of their own); install kafka-python (PyPI)
#               for the interoperability tests.
#   tansu_down  stop the broker tansu_up started.
#
# Storage engine: memory://. It keeps nothing across a broker restart, which
# tests do not need, and it starts in well under a second. Its one quirk (it
# cannot fetch from an offset inside a stored batch) is why the tests that
# resume a consumer from a committed offset publish one record per batch:
# each publish waits for its confirmation before the next is sent.
#
# Tests that restart a broker start their own on the postgres:// engine instead, in a
# database of their own with the tables of scripts/tansu-postgres.sql (tansu does not
# create them): records and committed offsets survive the broker's restart there.
#
# Settings (environment): MICRO_TANSU_ROOT (install root, default
# /var/tmp/tansu), MICRO_TANSU_PORT (default 19092), MICRO_SERVERS_DIR (logs,
# default /var/tmp/micro-servers).

tansu_root="${MICRO_TANSU_ROOT:-/var/tmp/tansu}"
tansu_port="${MICRO_TANSU_PORT:-19092}"
tansu_dir="${MICRO_SERVERS_DIR:-/var/tmp/micro-servers}/tansu"

tansu_listening() {
    (exec 3<>"/dev/tcp/127.0.0.1/$tansu_port") 2>/dev/null
}

tansu_up() {
    mkdir -p "$tansu_dir"
    local bin="$tansu_root/bin/tansu"
    if [[ ! -x "$bin" ]]; then
        echo "tansu.sh: installing tansu 0.6.0 into $tansu_root (about 10 minutes)" >&2
        cargo install tansu --version 0.6.0 --locked --features dynostore,postgres \
            --root "$tansu_root" >"$tansu_dir/install.log" 2>&1 || {
            echo "error: installing tansu failed; see $tansu_dir/install.log" >&2
            return 1
        }
    fi
    if ! tansu_listening; then
        local url="tcp://127.0.0.1:$tansu_port"
        nohup "$bin" broker \
            --listener-url "$url" \
            --advertised-listener-url "$url" \
            --storage-engine "memory://tansu/" \
            >>"$tansu_dir/tansu.log" 2>&1 &
        echo $! >"$tansu_dir/tansu.pid"
        local deadline=$((SECONDS + 30))
        until tansu_listening; do
            if ((SECONDS >= deadline)); then
                echo "error: tansu is not listening on 127.0.0.1:$tansu_port; see $tansu_dir/tansu.log" >&2
                return 1
            fi
            sleep 0.2
        done
    fi
    export MICRO_TEST_KAFKA_BROKERS="127.0.0.1:$tansu_port"
    export MICRO_TANSU_BIN="$bin"
    # The independent client of the interoperability tests (pure Python).
    if ! python3 -c "import kafka" 2>/dev/null; then
        python3 -m pip install --quiet kafka-python >>"$tansu_dir/install.log" 2>&1 ||
            echo "warning: installing kafka-python failed; the interop tests will fail" >&2
    fi
}

tansu_down() {
    if [[ -f "$tansu_dir/tansu.pid" ]]; then
        kill "$(cat "$tansu_dir/tansu.pid")" 2>/dev/null || true
        rm -f "$tansu_dir/tansu.pid"
    fi
}
