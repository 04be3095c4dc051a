#!/usr/bin/env bash
# Write one hospital's node config file (read by start_supernode.sh).
# Usage: deploy/write_node_config.sh OUT_FILE role=ROLE name=NAME [data=PATH] [checkpoint=PATH]
#        [shard=i/k] [device=cuda] [in-channels=3] [state-dir=PATH] [audit-dir=PATH]
#        [identity=PATH identity-key=PATH]
#   roles: institution (checkpoint and/or data to pretrain on), coordinator (data), site (data).
#   data: synthetic:TASK, an absolute MedMNIST .npz path, or a .yaml file with a data mapping.
#   state-dir: where a site keeps its own FedBN layers (default ~/.medmerge/site-state).
#   audit-dir: where the node logs every message it handles (default ~/.medmerge/audit).
#   identity: the token the consortium operator signed for this node's SuperNode key
#     (`medmerge identity sign`); identity-key: that SuperNode private key, which proves it.
# Every pair is checked before anything is written; the file appears whole or not at all.
set -euo pipefail
out=${1:?usage: write_node_config.sh OUT_FILE key=value...}; shift
lines="# MedMerge node config: private to this hospital, never sent to the server"
has_role=0
for pair in "$@"; do
  key=${pair%%=*}; value=${pair#*=}
  case $key in
    role|name|data|checkpoint|shard|device|state-dir|audit-dir|identity|identity-key) lines+=$'\n'"$key=\"$value\"" ;;
    in-channels) lines+=$'\n'"$key=$value" ;;
    *) echo "$out: unknown node config key '$key' (role, name, data, checkpoint, shard, device, in-channels, state-dir, audit-dir, identity, identity-key)" >&2; exit 2 ;;
  esac
  [[ $key == role ]] && has_role=1
done
(( has_role )) || { echo "$out: role=... is required" >&2; exit 2; }
mkdir -p "$(dirname "$out")"
tmp=$(mktemp "$out.XXXXXX")
printf '%s\n' "$lines" > "$tmp"
mv "$tmp" "$out"
echo "wrote $out"
