#!/usr/bin/env bash
# The README's run command: builds deltamirror and runs the demo pair (both
# nodes on 127.0.0.1, file-backed volumes in a temporary directory).
# On a fresh Debian machine it first installs the two build prerequisites
# with apt: protoc (the etcd client of automatic failover compiles etcd's
# .proto files) and libfabric's headers (the RDMA link's C shim). Arguments
# go to `deltamirror demo` (e.g. --auto-failover, --link fabric, --help).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -e /usr/include/rdma/fabric.h ] || need+=(libfabric-dev)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "== installing build prerequisites: ${need[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
exec cargo run --release --quiet -- demo "$@"
