#!/bin/bash
# fio --ioengine=nbd 4 KiB against deltamirror's nbd_serve example and
# nbdkit, on the same file (on disk, not tmpfs), alternating runs so both
# see the same machine load. Reports IOPS, latency and server CPU per I/O.
#
#   nbd-target/scripts/bench_vs_nbdkit.sh [QD] [RW] [SECS] [ROUNDS]
#
# Needs: fio with the nbd engine, nbdkit, python3; builds the example
# itself. BENCH_DIR (default: a new directory under /var/tmp, on disk) holds
# the 1 GiB image.
set -euo pipefail
cd "$(dirname "$0")/../.."
QD=${1:-32}; RW=${2:-randwrite}; SECS=${3:-5}; ROUNDS=${4:-3}
cargo build --release -q -p nbd-target --example nbd_serve
BIN=${NBD_SERVE:-$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/nbd_serve}
DIR=${BENCH_DIR:-$(mktemp -d /var/tmp/dm-nbdbench.XXXXXX)}
IMG=$DIR/disk.img
mkdir -p "$DIR"
if [ ! -f "$IMG" ]; then
  dd if=/dev/zero of="$IMG" bs=1M count=1024 status=none
fi
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
run() { # pid port label
  local c0 c1 out
  c0=$(cpu_ticks "$1")
  out=$(fio --name=b --ioengine=nbd --uri="nbd://127.0.0.1:$2/vol0" --rw="$RW" --bs=4k \
        --iodepth="$QD" --size=1g --time_based --runtime="$SECS" --output-format=json 2>/dev/null)
  c1=$(cpu_ticks "$1")
  echo "$out" | python3 -c '
import json, sys
label, ticks, hz = sys.argv[1], int(sys.argv[2]), 100
t = sys.stdin.read(); j = json.loads(t[t.index("{"):])["jobs"][0]
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
d = j["write"] if j["write"]["total_ios"] else j["read"]
p = d["clat_ns"]["percentile"]
print("%-22s %8.0f IOPS  p50 %5.0f us  p99 %6.0f us  server CPU %5.1f us/IO" % (
    label, d["iops"], p["50.000000"] / 1e3, p["99.000000"] / 1e3, ticks / hz * 1e6 / max(ios, 1)))
' "$3" $((c1 - c0))
}
"$BIN" 127.0.0.1:10940 "$IMG" >/dev/null 2>&1 & OURS=$!
nbdkit -f -p 10941 -e vol0 file file="$IMG" & KIT=$!
trap 'kill $OURS $KIT 2>/dev/null || true' EXIT
sleep 1
kill -0 $OURS $KIT
echo "QD$QD $RW ${SECS}s x $ROUNDS, load: $(cut -d' ' -f1-3 /proc/loadavg)"
for _ in $(seq "$ROUNDS"); do
  run $OURS 10940 "deltamirror nbd_serve"
  run $KIT 10941 "nbdkit file"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
