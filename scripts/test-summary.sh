#!/usr/bin/env bash
# The end of scripts/test.sh: reads the output of `cargo test` in
# target/test-output.txt, the skip log $DM_SKIP_LOG (crate testskip) and the
# exit status of cargo test ($1); prints the simulator's summary, the skipped
# tests with their reasons and the line "N passed, F failed, S skipped".
# Exits non-zero when a test failed or, under DM_REQUIRE_TOOLS=1 (root or CI),
# when a test skipped that scripts/allowed-skips.txt does not name.
set -euo pipefail
cd "$(dirname "$0")/.."
status="${1:-0}"
: "${DM_SKIP_LOG:=$PWD/target/skipped.txt}"
: "${DM_REQUIRE_TOOLS:=0}"
touch "$DM_SKIP_LOG"
if [ -f target/sim-summary.txt ]; then
  echo "== simulator"
  cat target/sim-summary.txt
fi
# Skipped tests, once each (a test may record more than one reason).
skipped_ids=$(sed -n 's/^SKIPPED \([^ ]*\): .*/\1/p' "$DM_SKIP_LOG" | sort -u)
skipped=$(printf '%s' "$skipped_ids" | grep -c . || true)
if [ "$skipped" -gt 0 ]; then
  echo "== skipped tests"
  sort -u "$DM_SKIP_LOG"
fi
# Summarise: cargo prints one "test result" line per test binary. A skipped
# test returned early and libtest counted it as passed: it moves to skipped.
awk -v s="$skipped" '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p - s, f, i + s }' target/test-output.txt
# A test that prints SKIPPED itself instead of calling testskip::skip is not
# counted: name those places.
uncounted=$(grep -rn --include='*.rs' 'println!("SKIPPED' -- */src */tests src tests 2>/dev/null || true)
if [ -n "$uncounted" ]; then
  echo "== warning: these skips print SKIPPED instead of calling testskip::skip, so they are not counted:"
  echo "$uncounted" | sed 's/^/  /'
fi
failed=0
if [ "$status" != 0 ] || grep -q "test result: FAILED" target/test-output.txt; then
  echo "== tests FAILED"
  failed=1
fi
if [ "$DM_REQUIRE_TOOLS" = 1 ] && [ "$skipped" -gt 0 ]; then
  allowed=$(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' scripts/allowed-skips.txt)
  not_allowed=()
  for id in $skipped_ids; do
    if ! printf '%s\n' "$allowed" | grep -qxF -- "$id"; then
      not_allowed+=("$id")
    fi
  done
  if [ ${#not_allowed[@]} -gt 0 ]; then
    echo "== tests SKIPPED that must run here (DM_REQUIRE_TOOLS=1: root or CI, tools installed above):"
    for id in "${not_allowed[@]}"; do
      grep -F "SKIPPED $id: " "$DM_SKIP_LOG" | sort -u | sed 's/^SKIPPED /  /'
    done
    echo "   (install the tool, or list the test in scripts/allowed-skips.txt with the reason it cannot run on this kind of machine)"
    failed=1
  fi
fi
exit "$failed"
