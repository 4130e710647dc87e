#!/usr/bin/env bash
# Build the container image's context in target/image: regmirror linked statically against glibc
# (+crt-static; names resolved by hickory-dns, so glibc's NSS modules are never loaded), the CA
# bundle for TLS towards upstreams, the default configuration and the Containerfile. Then
#   docker build -t regmirror target/image
# builds the image without network and without pulling a base image.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(rustc -vV | sed -n 's/^host: //p')
# With an explicit --target, RUSTFLAGS reach only the target's code, not build scripts.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --features static-dns --target "$target"
bin=target/$target/release/regmirror
# Static (static-pie) binaries ask for no program interpreter.
if readelf -lW "$bin" | grep -q 'Requesting program interpreter'; then
    echo "packaging/image.sh: $bin is dynamically linked" >&2
    exit 1
fi
ctx=target/image
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/bin" "$ctx/rootfs/etc/regmirror" "$ctx/rootfs/etc/ssl/certs" \
    "$ctx/state/var/lib/regmirror" "$ctx/state/etc/regmirror/tls"
strip -o "$ctx/rootfs/usr/bin/regmirror" "$bin"
cp packaging/container/mirror.toml "$ctx/rootfs/etc/regmirror/mirror.toml"
cp /etc/ssl/certs/ca-certificates.crt "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
cp packaging/Containerfile "$ctx/Containerfile"
# Readable (and the binary runnable) by the unprivileged user, whatever the builder's umask.
chmod -R u=rwX,go=rX "$ctx/rootfs" "$ctx/state"
echo "$ctx: $(du -sh "$ctx" | cut -f1); build with: docker build -f $ctx/Containerfile -t regmirror $ctx"
