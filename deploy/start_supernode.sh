#!/usr/bin/env bash
# Start one hospital's SuperNode from its node config file (written by write_node_config.sh).
# Usage: deploy/start_supernode.sh NODE_CONFIG.toml SUPERLINK_FLEET_ADDRESS CA_CERT PRIVATE_KEY PORT
#   e.g. LOG_FILE=/var/log/medmerge/supernode.log deploy/start_supernode.sh \
#        /etc/medmerge/node.toml 10.0.0.5:9092 /etc/medmerge/ca.crt /etc/medmerge/keys/site-1 9094
# SUPERLINK_FLEET_ADDRESS is the SuperLink's public Fleet address (FLEET_ADDRESS of
# start_superlink.sh). PORT is this node's own ClientApp API, on 127.0.0.1 only. LOG_FILE
# (environment, optional) appends the SuperNode's and its ClientApps' output to that file.
# The SuperNode only connects out, to the Fleet address; it retries for as long as the
# SuperLink is away (a restart) and, with the same key, comes back as the same node. One
# SuperNode per key: a second start with the same PRIVATE_KEY is refused.
# Every ClientApp runs through the site runtime: Flower's SuperExec starts `flwr-clientapp` by
# name for each message, and this script puts deploy/clientapp first on PATH, where that name
# runs MEDMERGE_CLIENTAPP (default: medmerge-clientapp from PATH, i.e. the site's reviewed
# install). With `policy=` in the node config it checks each delivered app bundle and run
# config against the site policy before any delivered code is installed or imported
# (docs/site-policy.md); the policy file is checked here first, a bad one is a one-line error.
# Telemetry is off. Runtime dependency installation is off: flower-supernode only installs
# with --allow-runtime-dependency-installation, which this script never passes (the variable
# below is the SuperLink's switch, set here too in case a later Flower reads it).
set -euo pipefail
usage="usage: start_supernode.sh NODE_CONFIG.toml SUPERLINK_FLEET_ADDRESS CA_CERT PRIVATE_KEY PORT"
die() { echo "start_supernode.sh: $*" >&2; exit 2; }
[ $# -eq 5 ] || die "$usage"
config=$(realpath -m -- "$1"); superlink=$2; ca=$(realpath -m -- "$3"); key=$(realpath -m -- "$4")
port=$5
[ -r "$config" ] || die "cannot read node config $config"
[[ $superlink =~ ^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]+$ ]] \
  || die "SUPERLINK_FLEET_ADDRESS must be HOST:PORT or [IPV6]:PORT, got '$superlink'"
[ -r "$ca" ] || die "cannot read CA certificate $ca"
[ -r "$key" ] || die "cannot read SuperNode private key $key (make it with deploy/make_node_keys.sh)"
[[ $port =~ ^[0-9]{1,5}$ ]] || die "PORT must be a port number, got '$port'"
(( 10#$port >= 1 && 10#$port <= 65535 )) || die "PORT $port is not between 1 and 65535"
for key_name in role name; do
  grep -q "^$key_name=\"" "$config" \
    || die "$config has no $key_name: write it with deploy/write_node_config.sh"
done
if [ -n "${LOG_FILE:-}" ]; then
  LOG_FILE=$(realpath -m -- "$LOG_FILE")
  mkdir -p "$(dirname "$LOG_FILE")"
  : >> "$LOG_FILE" || die "cannot write LOG_FILE $LOG_FILE"
fi
supernode=$(command -v flower-supernode) || die "flower-supernode is not on PATH"
clientapp=${MEDMERGE_CLIENTAPP:-$(command -v medmerge-clientapp || true)}
if [ -z "$clientapp" ] || [ ! -x "$clientapp" ]; then
  die "medmerge-clientapp is not on PATH (install the site's reviewed medmerge-federation)"
fi
clientapp=$(realpath -- "$clientapp")
shim=$(dirname "$(realpath "${BASH_SOURCE[0]}")")/clientapp
[ -x "$shim/flwr-clientapp" ] || die "$shim/flwr-clientapp is missing or not executable"
policy=$(sed -n 's/^policy="\(.*\)"$/\1/p' "$config")
if [ -n "$policy" ]; then
  medmerge=$(dirname "$clientapp")/medmerge
  [ -x "$medmerge" ] || medmerge=$(command -v medmerge) || die "medmerge is not on PATH (to check $policy)"
  problem=$("$medmerge" site show --policy "$policy" 2>&1 >/dev/null) \
    || die "policy: $(printf '%s' "$problem" | head -n 1)"
fi

exec 9<"$key"
flock -n 9 || die "another SuperNode is running with $key"
if [ -n "${LOG_FILE:-}" ]; then
  exec >>"$LOG_FILE" 2>&1
fi
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1  # no call to PyPI at start-up either
export MEDMERGE_CLIENTAPP=$clientapp PATH="$shim:$PATH"
# The node config file holds one `key = value` per line; flower-supernode takes them joined.
node_config=$(grep -v '^\s*#' "$config" | grep '=' | paste -sd ' ' -)
echo "start_supernode.sh: $(date -u +%FT%TZ) $(grep -o '^name="[^"]*"' "$config") to $superlink; ClientApps through $clientapp${policy:+, policy $policy}"
# exec: flower-supernode keeps the key's lock (fd 9) for as long as it runs.
exec "$supernode" --superlink "$superlink" --root-certificates "$ca" \
  --auth-supernode-private-key "$key" --port "$port" \
  --node-config "$node_config"
