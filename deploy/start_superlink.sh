#!/usr/bin/env bash
# Start the SuperLink (TLS + SuperNode authentication, state in a database) with only its Fleet
# API reachable from the network. See docs/hospital-deployment.md and
# docs/deployment-security.md.
# Usage: deploy/start_superlink.sh CERT_DIR FLEET_ADDRESS STATE_DIR [CONTROL_PORT] [extra flower-superlink args]
#   e.g. LOG_FILE=/var/log/medmerge/superlink.log \
#        deploy/start_superlink.sh /etc/medmerge/certs 10.0.0.5:9092 /var/lib/medmerge/superlink 9093
#   CERT_DIR       ca.crt, server.pem, server.key (deploy/make_certs.sh or your PKI).
#   FLEET_ADDRESS  HOST:PORT the SuperNodes connect to (the only port to open in the firewall).
#   STATE_DIR      the SuperLink's state: STATE_DIR/superlink.db (SQLite) holds the registered
#                  SuperNode keys, node ids, runs and their messages, so a restart on the same
#                  STATE_DIR keeps them. One SuperLink per STATE_DIR (a lock file enforces it).
#   CONTROL_PORT   the SuperLink's port on 127.0.0.1 (default 9093): the Control API (`flwr`)
#                  and the ServerAppIo/Runtime API. Operators reach it through SSH:
#                  ssh -L 9093:127.0.0.1:9093 operator@superlink-host, then connect to 127.0.0.1:9093.
#   LOG_FILE       (environment, optional) append every line of both processes to this file.
# Runs start only while deploy/start_superexec.sh runs on this host too: the SuperLink runs
# with --isolation process, so the ServerApps are started by that separate service and outlive
# a SuperLink restart (a run continues if the SuperLink is back within about 40 s).
# Flower 1.42 serves Fleet, Control and ServerAppIo from one HTTPS server (--host/--port;
# --fleet-api-address and --control-api-address are deprecated and ignored), and its Control
# API has no login. So flower-superlink listens on 127.0.0.1 only, and deploy/fleet_gateway.py
# listens on FLEET_ADDRESS and forwards POST /v1/fleet/* (and GET /health) to it, nothing else.
# Runtime dependency installation and telemetry are off. Relative paths are made absolute.
# Stop it with SIGTERM/SIGINT: both processes stop, and if either one exits the other is
# stopped too (so a supervisor such as systemd sees the exit and restarts it).
set -euo pipefail
usage="usage: start_superlink.sh CERT_DIR FLEET_ADDRESS STATE_DIR [CONTROL_PORT] [extra flower-superlink args]"
die() { echo "start_superlink.sh: $*" >&2; exit 2; }
[ $# -ge 3 ] || die "$usage"
certs=$(realpath -m -- "$1"); fleet=$2; state=$3; shift 3
control_port=9093
if [ $# -ge 1 ] && [[ $1 =~ ^[0-9]+$ ]]; then control_port=$1; shift; fi

for f in ca.crt server.pem server.key; do
  [ -r "$certs/$f" ] || die "no $certs/$f (make it with deploy/make_certs.sh or your PKI)"
done
[[ $fleet =~ ^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]+)$ ]] \
  || die "FLEET_ADDRESS must be HOST:PORT or [IPV6]:PORT, got '$fleet'"
fleet_port=${BASH_REMATCH[2]}
[[ $state =~ ^[^:]*[^:0-9][^:]*$ ]] || die "STATE_DIR must be a folder, got '$state' (the argument order is CERT_DIR FLEET_ADDRESS STATE_DIR [CONTROL_PORT])"
state=$(realpath -m -- "$state")
[ ! -e "$state" ] || [ -d "$state" ] || die "STATE_DIR $state exists and is not a folder"
for p in "$fleet_port" "$control_port"; do
  (( 10#$p >= 1 && 10#$p <= 65535 )) || die "port $p is not between 1 and 65535"
done
(( 10#$fleet_port != 10#$control_port )) || die "FLEET_ADDRESS and CONTROL_PORT need different ports"
# Extra args must not undo the binding, TLS, the database or the install switch (argparse
# also accepts unambiguous prefixes such as --hos, so those are refused too).
for arg in "$@"; do
  [[ $arg == --?* ]] || continue
  name=${arg%%=*}
  for bad in --host --port --insecure --fleet-api-address --fleet-api-type \
      --control-api-address --serverappio-api-address --ssl-certfile --ssl-keyfile \
      --ssl-ca-certfile --allow-runtime-dependency-installation --database --isolation; do
    [[ $bad == "$name"* ]] && die "$name is set by this script (it would expose the Control API, undo TLS or lose the state)"
  done
done
if [ -n "${LOG_FILE:-}" ]; then
  LOG_FILE=$(realpath -m -- "$LOG_FILE")
  mkdir -p "$(dirname "$LOG_FILE")"
  : >> "$LOG_FILE" || die "cannot write LOG_FILE $LOG_FILE"
fi

# medmerge-superlink is flower-superlink whose database waits longer for a lock
# (server/superlink_runtime.py says why).
link=$(command -v medmerge-superlink) || die "medmerge-superlink is not on PATH (pip install the project)"
# The gateway needs Flower's own dependencies (httpx, uvicorn): use the SuperLink's Python.
python=${MEDMERGE_PYTHON:-$(dirname "$(realpath "$link")")/python3}
[ -x "$python" ] || python=python3
here=$(dirname "$(realpath "${BASH_SOURCE[0]}")")

mkdir -p "$state"
chmod 700 "$state"
exec 9>>"$state/superlink.lock"
flock -n 9 || die "another SuperLink is running on $state (it holds $state/superlink.lock)"
if [ -n "${LOG_FILE:-}" ]; then
  exec >>"$LOG_FILE" 2>&1
fi
echo "start_superlink.sh: $(date -u +%FT%TZ) Fleet API on $fleet, Control API on 127.0.0.1:$control_port, state $state/superlink.db"

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1  # no call to PyPI at start-up either

pids=()
# shellcheck disable=SC2317  # invoked by the EXIT trap
stop() { trap - EXIT; kill -TERM "${pids[@]}" 2>/dev/null || true; wait || true; }
trap stop EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# The SuperLink keeps the lock (fd 9) while it uses the database; the gateway does not.
"$link" --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" \
  --ssl-keyfile "$certs/server.key" --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --database "$state/superlink.db" --isolation process \
  --host 127.0.0.1 --port "$control_port" "$@" &
pids+=("$!")
"$python" "$here/fleet_gateway.py" --listen "$fleet" --upstream-port "$control_port" \
  --certs "$certs" 9>&- &
pids+=("$!")
status=0
wait -n || status=$?
echo "start_superlink.sh: $(date -u +%FT%TZ) a process exited (status $status); stopping the other" >&2
exit "$status"
