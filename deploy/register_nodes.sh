#!/usr/bin/env bash
# Register each hospital's public key with the SuperLink (needs --enable-supernode-auth there).
# Usage: deploy/register_nodes.sh CONNECTION KEY_DIR NAME [NAME ...]
# CONNECTION is a [superlink.<name>] entry in $FLWR_HOME/config.toml (see write_connection.sh).
# The registrations run concurrently (each is one `flwr` call); any failure fails the script.
set -euo pipefail
conn=${1:?usage: register_nodes.sh CONNECTION KEY_DIR NAME...}; keys=${2:?}; shift 2
pids=()
for name in "$@"; do
  [ -f "$keys/$name.pub" ] || { echo "register_nodes.sh: no key $keys/$name.pub" >&2; exit 1; }
  flwr supernode register "$keys/$name.pub" "$conn" --name "$name" &
  pids+=("$!")
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "register_nodes.sh: registering '${*:$((i + 1)):1}' failed" >&2; status=1; }
done
exit "$status"
