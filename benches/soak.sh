#!/usr/bin/env bash
# regmirror soak: 10 minutes of mixed load from 64 concurrent clients, on loopback only.
#
#   benches/soak.sh
#
# Runs ${REGMIRROR_BIN:-target/release/regmirror} (builds nothing) in front of Debian's
# docker-registry seeded with ${SOAK_IMAGES:-200} single-layer images of 256 KiB, with a store
# bound of 24 MiB so pulls keep evicting and refilling, and [auth] on (anonymous pulls, a user
# that pushes). Prints RSS, open file descriptors and error counts each minute, then whether
# staging files or upload sessions were left behind. Not a CI test: a figure for the README.
#
# Environment: SOAK_SECONDS [600], SOAK_CLIENTS [64], SOAK_IMAGES [200], REGMIRROR_BIN.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BIN=$(realpath "${REGMIRROR_BIN:-$REPO/target/release/regmirror}")
SECONDS_TOTAL=${SOAK_SECONDS:-600}
CLIENTS=${SOAK_CLIENTS:-64}
export SOAK_IMAGES=${SOAK_IMAGES:-200}
[ -x "$BIN" ] || { echo "no binary at $BIN: cargo build --release" >&2; exit 1; }
command -v docker-registry >/dev/null || { echo "docker-registry is not installed (apt-get install docker-registry)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/regmirror-soak.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

mapfile -t PORTS < <(python3 "$HERE/benchlib.py" ports 2)
UP_PORT=${PORTS[0]}
RM_PORT=${PORTS[1]}
cat > "$WORK/upstream.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $WORK/upstream
http:
  addr: 127.0.0.1:$UP_PORT
EOF
docker-registry serve "$WORK/upstream.yml" > "$WORK/upstream.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$UP_PORT/v2/" >/dev/null && break; sleep 0.1; done
python3 "$HERE/soak.py" seed "http://127.0.0.1:$UP_PORT" "$SOAK_IMAGES" 256

echo soak | "$BIN" passwd soak --htpasswd "$WORK/htpasswd" >/dev/null
cat > "$WORK/mirror.toml" <<EOF
[server]
listen = "127.0.0.1:$RM_PORT"
[storage]
root = "data"
max_size = "24MiB"
[[upstream]]
name = "docker.io"
url = "http://127.0.0.1:$UP_PORT"
[auth]
htpasswd = "htpasswd"
[[auth.grant]]
users = ["soak"]
repositories = ["private/*"]
access = "push"
[log]
format = "json"
EOF
RUST_LOG=warn "$BIN" serve --config "$WORK/mirror.toml" > "$WORK/regmirror.log" 2>&1 &
RM_PID=$!
pids+=($RM_PID)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$RM_PORT/healthz" >/dev/null && break; sleep 0.1; done

echo "regmirror soak: $CLIENTS clients, ${SECONDS_TOTAL}s, $SOAK_IMAGES images upstream, store bound 24 MiB, binary $BIN"
python3 "$HERE/soak.py" run "http://127.0.0.1:$RM_PORT" "$RM_PID" "$WORK/data" "$SECONDS_TOTAL" "$CLIENTS"
echo "regmirror WARN/ERROR lines: $(grep -c '"level":"\(WARN\|ERROR\)"' "$WORK/regmirror.log" || true)"
