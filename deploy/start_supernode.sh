#!/usr/bin/env bash
# Start one hospital's SuperNode from its node config file (written by write_node_config.py).
# Usage: deploy/start_supernode.sh NODE_CONFIG.toml SUPERLINK_ADDRESS CA_CERT PRIVATE_KEY PORT
#   e.g. deploy/start_supernode.sh nodes/site-1.toml 10.0.0.5:8000 certs/ca.crt keys/site-1 9094
set -euo pipefail
config=${1:?}; superlink=${2:?}; ca=${3:?}; key=${4:?}; port=${5:?}
# The node config file holds one `key = value` per line; flower-supernode takes them joined.
node_config=$(grep -v '^\s*#' "$config" | grep '=' | paste -sd ' ' -)
exec flower-supernode --superlink "$superlink" --root-certificates "$ca" \
  --auth-supernode-private-key "$key" --port "$port" \
  --node-config "$node_config"
