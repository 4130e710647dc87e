#!/usr/bin/env bash
# Build the Debian package: target/debian/regmirror_VERSION-1_ARCH.deb.
# Needs cargo-deb (`cargo install --locked cargo-deb`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
mkdir -p target/deb
# The unit in systemd/ is for a binary installed by hand under /usr/local/bin.
sed 's#/usr/local/bin/regmirror#/usr/bin/regmirror#' systemd/regmirror.service >target/deb/regmirror.service
grep -q '^ExecStart=/usr/bin/regmirror ' target/deb/regmirror.service
rm -rf target/deb/man && mkdir -p target/deb/man
target/release/regmirror man target/deb/man
gzip -9n target/deb/man/*.1
cargo deb --no-build --locked --strip "$@"
