#!/usr/bin/env bash
# Write one hospital's node config file (read by start_supernode.sh).
# Usage: deploy/write_node_config.sh OUT_FILE role=ROLE name=NAME [data=PATH] [checkpoint=PATH]
#        [shard=i/k] [device=cuda] [in-channels=3] [state-dir=PATH]
#   roles: institution (checkpoint and/or data to pretrain on), coordinator (data), site (data).
#   data: synthetic:TASK, an absolute MedMNIST .npz path, or a .yaml file with a data mapping.
set -euo pipefail
out=${1:?usage: write_node_config.sh OUT_FILE key=value...}; shift
mkdir -p "$(dirname "$out")"
{
  echo "# MedMerge node config: private to this hospital, never sent to the server"
  for pair in "$@"; do
    key=${pair%%=*}; value=${pair#*=}
    case $key in
      role|name|data|checkpoint|shard|device) printf '%s="%s"\n' "$key" "$value" ;;
      in-channels) printf '%s=%s\n' "$key" "$value" ;;
      *) echo "unknown node config key '$key'" >&2; exit 2 ;;
    esac
  done
} > "$out"
grep -q '^role=' "$out" || { echo "$out: role=... is required" >&2; exit 2; }
echo "wrote $out"
