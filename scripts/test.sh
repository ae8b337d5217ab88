#!/usr/bin/env bash
# The project's test command (README.md; .ci/run calls it).
# Installs what the tests need on a fresh Debian machine, then runs the
# format and lint checks and every test of the workspace: unit tests, the
# deterministic simulator (DM_SIM_SEEDS, default 2000), protocol tests with
# real clients (qemu-io, nbdinfo, nbdcopy, fio, iscsi-test-cu) and the
# process-level pair tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v fio >/dev/null || need_pkgs+=(fio)
command -v iscsi-test-cu >/dev/null || need_pkgs+=(libiscsi-bin)
command -v tgtd >/dev/null || need_pkgs+=(tgt)
command -v nbdkit >/dev/null || need_pkgs+=(nbdkit)
command -v nbdinfo >/dev/null || need_pkgs+=(libnbd-bin)
command -v nft >/dev/null || need_pkgs+=(nftables)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v qemu-io >/dev/null || need_pkgs+=(qemu-utils)
command -v cmp >/dev/null || need_pkgs+=(diffutils)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing test clients: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "== not root: cannot install ${need_pkgs[*]}; tests that need them will say SKIPPED"
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
export DM_SIM_SEEDS="${DM_SIM_SEEDS:-2000}"
mkdir -p target
set +e
cargo test --workspace --no-fail-fast --quiet 2>&1 | grep -v '^\[20' | tee target/test-output.txt
status=${PIPESTATUS[0]}
set -e
# Summarise: cargo prints one "test result" line per test binary.
# Tests that print SKIPPED (a client tool absent) are counted as skipped.
skipped=$(grep -c '^SKIPPED' target/test-output.txt || true)
awk -v s="$skipped" '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p - s, f, i + s }' target/test-output.txt
if [ "$status" != 0 ] || grep -q "test result: FAILED" target/test-output.txt; then
  echo "== tests FAILED"
  exit 1
fi
