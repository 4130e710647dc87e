#!/usr/bin/env bash
# Run every test regmirror has: the dependency policy (cargo deny), unit and integration tests
# (cargo test), the fuzz targets briefly (cargo fuzz, nightly), then the end-to-end suite with
# real clients (docker, containerd, podman, skopeo). Installs the Debian packages and cargo tools
# the tests use when they are missing (Debian packages need root and apt-get). REGMIRROR_E2E=skip
# skips the tests that need real clients and root.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(docker-registry skopeo podman docker.io containerd umoci nginx-light prometheus iproute2 openssl curl systemd sslscan python3-venv)

install_missing() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "tests/run.sh: missing packages: ${missing[*]}" >&2
    echo "  install them as root (apt-get install ${missing[*]}), or set REGMIRROR_E2E=skip to skip the tests with real clients" >&2
    return 1
  fi
  echo "== installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # dockerd and containerd must not start as system services: the tests start their own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
}

if [ "${REGMIRROR_E2E:-}" != "skip" ]; then
  install_missing
  # oras-py (PyPI), a real OCI artifact client for the referrers tests, in a venv of its own
  # (Debian's Python refuses system-wide pip installs).
  if [ ! -x target/pyvenv/bin/python3 ] || ! target/pyvenv/bin/python3 -c "import oras.client" 2>/dev/null; then
    python3 -m venv target/pyvenv
    target/pyvenv/bin/python3 -m pip install --quiet --disable-pip-version-check oras
  fi
  export REGMIRROR_PYTHON="$PWD/target/pyvenv/bin/python3"
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

echo "== fuzz targets, ${FUZZ_SECONDS:-15} s each"
cargo_tool cargo-fuzz cargo-fuzz
FUZZ_SECONDS=${FUZZ_SECONDS:-15} bash fuzz/run.sh

if [ "${REGMIRROR_E2E:-}" = "skip" ]; then
  echo "== end-to-end suite skipped (REGMIRROR_E2E=skip)"
  exit 0
fi
echo "== end-to-end suite (real clients)"
cargo build --release
REGMIRROR_BIN="$PWD/target/release/regmirror" bash tests/e2e/run.sh
