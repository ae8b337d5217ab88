#!/usr/bin/env bash
# The memory soak of issue 10: "RSS at QD128 <= 256 MiB per node (mapped ring
# pages aside) and flat over a 10-minute write soak". It starts a mirrored
# adaptive pair as scripts/bench.sh does (example-config, release binary),
# fills the first 256 MiB, then runs fio 4 KiB randwrite QD128 over NBD for the
# whole duration, and samples each node every 10 s: `rss_bytes` from
# `deltamirror status --json`, RssAnon from /proc/PID/status and the resident
# pages of its ring mapping from /proc/PID/smaps. When the load stops it waits
# for the pair to be in sync and compares the sha256 of the two volume files.
#
# It prints the samples, the max, RssAnon after the warm-up (the first minute)
# against the end, the slope (least squares, MiB/min), IOPS per minute and a
# pass/fail against the aim (the rule is printed with it); writes
# target/bench/soak.json and the Soak section of BENCHMARKS.md (a run of
# 600 s or more; shorter runs: target/bench/BENCHMARKS.md), leaving the other
# sections as they are. Exits 1 on a failed aim, an error or differing images.
#
#   scripts/soak.sh                    # cargo build --release, then 600 s
#   scripts/soak.sh --seconds 60       # a short check
#   scripts/soak.sh --no-build --seconds 600 --sample-seconds 10
#   scripts/soak.sh --out PATH         # the report file whose Soak section to write
#
# Run it on a quiet machine: it measures the nodes, not the machine, but the
# IOPS per minute are only comparable between quiet runs. Needs fio (apt).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

build=1
args=()
for a in "$@"; do
    case "$a" in
        --no-build) build=0 ;;
        -h|--help) exec python3 "$root/scripts/bench/bench.py" --help ;;
        *) args+=("$a") ;;
    esac
done

if ! command -v fio >/dev/null; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
    echo "soak: installing fio"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq fio >/dev/null
fi

if [ "$build" = 1 ]; then
    echo "soak: cargo build --release -p deltamirror"
    cargo build --release -p deltamirror --bins
fi

exec python3 "$root/scripts/bench/bench.py" --soak ${args[@]+"${args[@]}"}
