#!/usr/bin/env bash
# The fault-injection run of the multi-process shop, for as long as you like: the same
# driver as the bounded test `faults::the_shop_loses_nothing_under_faults` (a minute there;
# ignored by the default suite while it is flaky), run for <duration> of faults. The load
# generator runs checkouts, cancels and declines while services are SIGKILLed and restarted, the broker (a tansu of the run's own, on
# PostgreSQL storage) is restarted, and calls to payment and inventory are delayed and
# dropped. It then checks money, stock, sagas, notifications and events from the stores
# and prints its figures; it fails on any invariant violation.
#
# Usage: bash scripts/fault-run.sh <duration> [seed]
#   <duration>  how long faults are injected: 90s, 10m, 1h
#   [seed]      replays a run's choices (each run prints its seed)
# Environment: MICRO_FAULT_PG_TERMINATE=1 also terminates the shop's PostgreSQL
# connections (needs a shop that reconnects); MICRO_FAULT_USERS (default 6) sets the
# load generator's virtual users.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
fi
export MICRO_FAULT_DURATION="$1"
[[ $# -ge 2 ]] && export MICRO_FAULT_SEED="$2"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/micro-target}"
source scripts/servers.sh
servers_up

cargo test -p shop --features real-servers --test it -- \
    --exact faults::the_shop_loses_nothing_under_faults --include-ignored --nocapture
