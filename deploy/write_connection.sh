#!/usr/bin/env bash
# Add a TLS connection to the SuperLink's Control API in $FLWR_HOME/config.toml.
# Usage: deploy/write_connection.sh NAME ADDRESS CA_CERT   e.g. hospitals 10.0.0.5:8000 certs/ca.crt
set -euo pipefail
name=${1:?}; address=${2:?}; ca=$(realpath "${3:?}")
home=${FLWR_HOME:-$HOME/.flwr}; mkdir -p "$home"
[ -f "$home/config.toml" ] || printf '[superlink]\ndefault = "%s"\n' "$name" > "$home/config.toml"
printf '\n[superlink.%s]\naddress = "%s"\nroot-certificates = "%s"\n' "$name" "$address" "$ca" \
  >> "$home/config.toml"
echo "connection '$name' -> $address in $home/config.toml"
