#!/usr/bin/env bash
# Start one hospital's SuperNode from its node config file (written by write_node_config.sh).
# Usage: deploy/start_supernode.sh NODE_CONFIG.toml SUPERLINK_FLEET_ADDRESS CA_CERT PRIVATE_KEY PORT
#   e.g. deploy/start_supernode.sh nodes/site-1.toml 10.0.0.5:9092 certs/ca.crt keys/site-1 9094
# SUPERLINK_FLEET_ADDRESS is the SuperLink's public Fleet address (FLEET_ADDRESS of
# start_superlink.sh). PORT is this node's own ClientApp API, on 127.0.0.1.
# Telemetry is off. Runtime dependency installation is off: flower-supernode only installs
# with --allow-runtime-dependency-installation, which this script never passes (the variable
# below is the SuperLink's switch, set here too in case a later Flower reads it).
set -euo pipefail
usage="usage: start_supernode.sh NODE_CONFIG.toml SUPERLINK_FLEET_ADDRESS CA_CERT PRIVATE_KEY PORT"
[ $# -eq 5 ] || { echo "start_supernode.sh: $usage" >&2; exit 2; }
config=$1; superlink=$2; ca=$3; key=$4; port=$5
[ -r "$config" ] || { echo "start_supernode.sh: cannot read node config $config" >&2; exit 2; }
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1  # no call to PyPI at start-up either
# The node config file holds one `key = value` per line; flower-supernode takes them joined.
node_config=$(grep -v '^\s*#' "$config" | grep '=' | paste -sd ' ' -)
exec flower-supernode --superlink "$superlink" --root-certificates "$ca" \
  --auth-supernode-private-key "$key" --port "$port" \
  --node-config "$node_config"
