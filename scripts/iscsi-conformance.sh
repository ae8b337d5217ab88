#!/usr/bin/env bash
# Runs libiscsi's conformance suite against an iSCSI URL and prints the
# counts, with tests that only printed [SKIPPED] counted apart from real
# passes (CUnit counts them as passed).
#
#   scripts/iscsi-conformance.sh iscsi://127.0.0.1:3260/<target-iqn>/0 [second-path-url]
#
# A second URL (another portal to the same LU, or the same URL again) enables
# the MultipathIO tests. The full log goes to $ISCSI_CONFORMANCE_LOG (default:
# a temporary file).
#
# Output (last line, machine readable):
#   iscsi-conformance: total=230 passed=.. real_passes=.. skipped=.. failed=..
# Exit status: 0 when the suite ran to its summary, 2 when it did not (crash,
# hang, connection refused), 3 when iscsi-test-cu is not installed.
set -u
[ $# -ge 1 ] || { echo "usage: $0 iscsi://host:port/iqn/lun [second-path-url]" >&2; exit 64; }
log=${ISCSI_CONFORMANCE_LOG:-$(mktemp /tmp/iscsi-conformance.XXXXXX.log)}
if ! command -v iscsi-test-cu >/dev/null 2>&1; then
    echo "iscsi-conformance: iscsi-test-cu not found (apt-get install libiscsi-bin)" >&2
    exit 3
fi
timeout "${ISCSI_CONFORMANCE_TIMEOUT:-600}" iscsi-test-cu -d -t ALL "$@" >"$log" 2>&1
rc=$?
awk -v rc="$rc" -v logf="$log" '
/^Suite: /        { suite = $2 }
/^  Test: /       { name = $0; sub(/^  Test: /, "", name); sub(/ \.\.\..*/, "", name); cur = suite "." name }
/\[SKIPPED\]/     { if (cur != "") skipped[cur] = 1 }
/^ +tests +[0-9]/ { total = $2; passed = $4; failed = $5; summary = 1 }
END {
    ns = 0; for (k in skipped) ns++
    if (!summary) {
        printf "iscsi-conformance: no CUnit summary (exit %s): crash or hang; see %s\n", rc, logf
        exit 2
    }
    printf "iscsi-conformance: total=%d passed=%d real_passes=%d skipped=%d failed=%d log=%s\n", total, passed, passed - ns, ns, failed, logf
}' "$log"
