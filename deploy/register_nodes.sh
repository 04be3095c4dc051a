#!/usr/bin/env bash
# The operator registers each hospital's public key with the SuperLink (which runs with
# --enable-supernode-auth). Each hospital made its own key pair (make_node_keys.sh) and sent
# only NAME.pub; put them in one folder, check each fingerprint with its hospital
# (ssh-keygen -l -f KEY_DIR/NAME.pub), then run this on the SuperLink host (or through the
# SSH tunnel to its Control API).
# Usage: deploy/register_nodes.sh CONNECTION KEY_DIR NAME [NAME ...]
#   e.g. deploy/register_nodes.sh hospitals /etc/medmerge/node-keys hospital-a site-1
# CONNECTION is a [superlink.<name>] entry in $FLWR_HOME/config.toml (see write_connection.sh).
# Idempotent: a key the SuperLink already has is reported and left as it is (it keeps its node
# id and the name it was first registered with; `flwr supernode unregister` to change that).
# The registrations run concurrently (each is one `flwr` call); any other failure fails the
# script. The SuperLink keeps registrations in its database (start_superlink.sh STATE_DIR), so
# they survive its restarts.
set -euo pipefail
die() { echo "register_nodes.sh: $*" >&2; exit 2; }
[ $# -ge 3 ] || die "usage: register_nodes.sh CONNECTION KEY_DIR NAME [NAME ...]"
conn=$1; keys=$(realpath -m -- "$2"); shift 2
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
for name in "$@"; do
  [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] || die "name '$name' is not a safe name"
  [ -r "$keys/$name.pub" ] || die "no public key $keys/$name.pub"
  [[ $(ssh-keygen -l -f "$keys/$name.pub" 2>/dev/null) == *"(ECDSA)" ]] \
    || die "$keys/$name.pub is not an ECDSA public key (the hospital makes it with make_node_keys.sh)"
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pids=()
for name in "$@"; do
  flwr supernode register "$keys/$name.pub" "$conn" --name "$name" > "$out/$name" 2>&1 &
  pids+=("$!")
done
status=0
for i in "${!pids[@]}"; do
  name=${*:$((i + 1)):1}
  if wait "${pids[$i]}"; then
    echo "$name: $(grep -o 'SuperNode [0-9]* registered successfully' "$out/$name" || echo registered)"
  elif grep -q "Public key already in use" "$out/$name"; then
    echo "$name: already registered (kept as it is)"
  else
    echo "register_nodes.sh: registering '$name' failed: $(tr '\n' ' ' < "$out/$name" | tr -s ' ' | cut -c1-300)" >&2
    status=1
  fi
done
exit "$status"
