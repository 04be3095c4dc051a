#!/usr/bin/env bash
# Register each hospital's public key with the SuperLink (needs --enable-supernode-auth there).
# Usage: deploy/register_nodes.sh CONNECTION KEY_DIR NAME [NAME ...]
# CONNECTION is a [superlink.<name>] entry in $FLWR_HOME/config.toml (see write_connection.sh).
set -euo pipefail
conn=${1:?usage: register_nodes.sh CONNECTION KEY_DIR NAME...}; keys=${2:?}; shift 2
for name in "$@"; do
  flwr supernode register "$keys/$name.pub" "$conn" --name "$name"
done
