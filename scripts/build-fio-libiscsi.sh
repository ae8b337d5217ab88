#!/usr/bin/env bash
# Builds fio with its libiscsi engine (not compiled into Debian's fio) from
# Debian's source package, into target/fio-libiscsi/fio. Idempotent: exits
# early when that binary already exists and has the engine.
#
#   scripts/build-fio-libiscsi.sh
#   target/fio-libiscsi/fio --ioengine=libiscsi \
#       --filename='iscsi\://127.0.0.1\:3260/<iqn>/0' --rw=randwrite --bs=4k ...
#
# Needs root (or sudo) for apt: adds a deb-src entry for the configured
# Debian suites if none exists, installs libiscsi-dev and build tools.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/target/fio-libiscsi"
bin="$out/fio"

if [ -x "$bin" ] && "$bin" --enghelp 2>/dev/null | grep -qx '[[:space:]]*libiscsi'; then
    echo "build-fio-libiscsi: $bin already built with the libiscsi engine"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

if ! grep -rqs '^Types:.*deb-src\|^deb-src ' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "build-fio-libiscsi: adding a deb-src entry for Debian's source packages"
    suites=$(. /etc/os-release && echo "$VERSION_CODENAME $VERSION_CODENAME-updates")
    # Use the mirror this machine's apt already uses for binary packages.
    uri=$(grep -rhs '^URIs:' /etc/apt/sources.list.d/*.sources | head -n1 | awk '{print $2}')
    if [ -z "$uri" ]; then
        uri=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | head -n1 | awk '{print $2}')
    fi
    [ -n "$uri" ] || { echo "build-fio-libiscsi: no apt source found to derive a deb-src entry from" >&2; exit 1; }
    $SUDO tee /etc/apt/sources.list.d/deltamirror-deb-src.sources >/dev/null <<SRC
Types: deb-src
URIs: $uri
Suites: $suites
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    $SUDO apt-get update -qq
fi

$SUDO apt-get install -y -qq libiscsi-dev build-essential pkg-config dpkg-dev zlib1g-dev >/dev/null

mkdir -p "$out/src"
cd "$out/src"
srcdir=$(find . -maxdepth 1 -type d -name 'fio-*' | head -n1)
if [ -z "$srcdir" ]; then
    apt-get source -qq fio
    srcdir=$(find . -maxdepth 1 -type d -name 'fio-*' | head -n1)
fi
[ -n "$srcdir" ] || { echo "build-fio-libiscsi: apt-get source fio produced no source tree" >&2; exit 1; }
cd "$srcdir"
./configure --enable-libiscsi --disable-native >"$out/configure.log" 2>&1 || {
    echo "build-fio-libiscsi: configure failed; see $out/configure.log" >&2; exit 1; }
grep -q 'iscsi engine.*yes' "$out/configure.log" || {
    echo "build-fio-libiscsi: configure did not enable libiscsi; see $out/configure.log" >&2; exit 1; }
make -j"$(nproc)" >"$out/make.log" 2>&1 || {
    echo "build-fio-libiscsi: make failed; see $out/make.log" >&2; exit 1; }
cp fio "$bin"
"$bin" --enghelp | grep -qx '[[:space:]]*libiscsi' || {
    echo "build-fio-libiscsi: built fio lacks the libiscsi engine" >&2; exit 1; }
echo "build-fio-libiscsi: built $bin ($("$bin" --version))"
