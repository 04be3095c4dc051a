#!/usr/bin/env bash
# Write a TLS connection to the SuperLink's Control API into $FLWR_HOME/config.toml.
# Usage: deploy/write_connection.sh NAME ADDRESS CA_CERT   e.g. hospitals 127.0.0.1:9093 certs/ca.crt
# The Control API listens on 127.0.0.1 of the SuperLink host only (start_superlink.sh): run
# `flwr` there, or from your machine through `ssh -L 9093:127.0.0.1:9093 operator@superlink-host`,
# with ADDRESS 127.0.0.1:9093 in both cases.
# Idempotent: an existing [superlink.NAME] section is replaced, not duplicated; other sections
# (and the default connection) are kept. The file is replaced whole or not at all.
set -euo pipefail
usage="usage: write_connection.sh NAME ADDRESS CA_CERT"
[ $# -eq 3 ] || { echo "write_connection.sh: $usage" >&2; exit 2; }
name=$1; address=$2
[[ $name =~ ^[A-Za-z0-9_-]+$ ]] || { echo "write_connection.sh: NAME may hold only letters, digits, _ and -" >&2; exit 2; }
[ -r "$3" ] || { echo "write_connection.sh: cannot read CA certificate $3" >&2; exit 2; }
ca=$(realpath "$3")
for value in "$address" "$ca"; do
  [[ $value != *[\"\\]* ]] || { echo "write_connection.sh: '$value' holds a quote or backslash" >&2; exit 2; }
done
home=${FLWR_HOME:-$HOME/.flwr}; mkdir -p "$home"
config=$home/config.toml
[ -f "$config" ] || printf '[superlink]\ndefault = "%s"\n' "$name" > "$config"
tmp=$(mktemp "$config.XXXXXX")
trap 'rm -f "$tmp"' EXIT
# Copy every line except the old [superlink.NAME] table (from its header to the next header),
# and drop trailing blank lines so repeated runs do not pile them up.
awk -v h1="[superlink.$name]" -v h2="[superlink.\"$name\"]" '
  { t = $0; gsub(/^[ \t]+|[ \t]+$/, "", t) }
  t ~ /^\[/ { k = t; sub(/[ \t]*#.*$/, "", k); skip = (k == h1 || k == h2) }
  skip { next }
  t == "" { blanks++; next }
  { while (blanks > 0) { print ""; blanks-- } print }
' "$config" > "$tmp"
printf '\n[superlink.%s]\naddress = "%s"\nroot-certificates = "%s"\n' "$name" "$address" "$ca" >> "$tmp"
chmod --reference="$config" "$tmp" 2>/dev/null || true
mv "$tmp" "$config"
trap - EXIT
echo "connection '$name' -> $address in $config"
