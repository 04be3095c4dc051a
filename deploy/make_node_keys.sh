#!/usr/bin/env bash
# One ECDSA P-384 key pair per hospital for SuperNode authentication (ed25519 is rejected).
# Usage: deploy/make_node_keys.sh OUT_DIR NAME [NAME ...]
set -euo pipefail
out=${1:?usage: make_node_keys.sh OUT_DIR NAME...}; shift
mkdir -p "$out"
for name in "$@"; do
  [ -f "$out/$name" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$out/$name"
done
echo "keys in $out: $*"
