#!/usr/bin/env bash
# One benchmark command for deltamirror. In one invocation it measures the
# same four workloads (4 KiB randwrite QD1 and QD32, 4 KiB randread QD32,
# 128 KiB sequential write) against
#
#   - the floors: the local disk (fio io_uring, O_DIRECT, file under /var/tmp)
#     and the replication link round trip (target/release/bench),
#   - deltamirror with one node (`serve --standalone` when the binary has it,
#     else promoted to serve alone) and mirrored (both nodes; adaptive and
#     busy poll) over NBD, iSCSI and NVMe/TCP,
#   - the peers on this machine: nbdkit (file plugin), qemu-nbd, tgtd,
#   - the protocol floors: each protocol's client against a target with no
#     disk I/O (nbdkit memory, tgtd on tmpfs, dm-nvme serve-mem, and
#     `serve --standalone` with its volume on tmpfs), for the aims table,
#
# plus the engine bench's replay / remirror mode (target/release/bench
# --replay: replay time against outage size, foreground latency during a
# replay, full remirror bandwidth against disk and loopback floors) and its
# ACK coalescing on/off rows, then writes BENCHMARKS.md (tables, ratios, RSS,
# idle CPU, thread placement) and docs/benchmarks.png, and exits non-zero if
# any workload failed.
#
#   scripts/bench.sh                 # build (cargo build --release), run all, ~15 min
#   scripts/bench.sh --no-build      # use the binaries already in target/release
#   scripts/bench.sh --seconds 10    # longer runs per workload (default 5)
#   scripts/bench.sh --no-busy       # skip the busy-poll pair
#   scripts/bench.sh --only local,nbdkit,dm-mirrored   # a subset of targets
#   scripts/bench.sh --only local,replay --seconds 2   # floors + replay/remirror
#   scripts/bench.sh --only local,mem-floors,nvme-mem,dm-one  # the protocol floors vs unmirrored
#   scripts/bench.sh --help
#
# The memory soak (10 minutes, a mirrored pair at QD128) is scripts/soak.sh.
#
# Needs root for apt (fio, nbdkit, tgt, libiscsi) and for the fio libiscsi
# build (scripts/build-fio-libiscsi.sh); installs matplotlib with pip if absent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

build=1
for a in "$@"; do
    case "$a" in
        --no-build) build=0 ;;
        -h|--help) exec python3 "$root/scripts/bench/bench.py" --help ;;
    esac
done

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

need_apt=()
command -v fio >/dev/null || need_apt+=(fio)
command -v nbdkit >/dev/null || need_apt+=(nbdkit)
command -v qemu-nbd >/dev/null || need_apt+=(qemu-utils)
command -v tgtd >/dev/null || need_apt+=(tgt)
command -v iscsi-ls >/dev/null || need_apt+=(libiscsi-bin)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "bench: installing ${need_apt[*]}"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import matplotlib' 2>/dev/null; then
    echo "bench: installing matplotlib (pip) for the chart"
    python3 -m pip install -q matplotlib 2>/dev/null \
        || $SUDO apt-get install -y -qq python3-matplotlib >/dev/null \
        || echo "bench: WARNING: no matplotlib; the chart will be skipped"
fi

if [ ! -x "$root/target/fio-libiscsi/fio" ]; then
    echo "bench: building fio with the libiscsi engine (scripts/build-fio-libiscsi.sh)"
    "$root/scripts/build-fio-libiscsi.sh" || echo "bench: WARNING: no fio with libiscsi; iSCSI rows will fail"
fi

if [ "$build" = 1 ]; then
    echo "bench: cargo build --release (deltamirror, dm-nvme, bench)"
    cargo build --release -p deltamirror -p nvme-host -p bench --bins
fi
# bench.py checks for the binaries the selected targets need (--only).

args=()
for a in "$@"; do [ "$a" = --no-build ] || args+=("$a"); done
exec python3 "$root/scripts/bench/bench.py" ${args[@]+"${args[@]}"}
