#!/usr/bin/env bash
# Start the SuperLink (TLS + SuperNode authentication) with only its Fleet API reachable from
# the network. See docs/deployment-security.md.
# Usage: deploy/start_superlink.sh CERT_DIR FLEET_ADDRESS [CONTROL_PORT] [extra flower-superlink args]
#   e.g. deploy/start_superlink.sh certs 10.0.0.5:9092 9093 --database /srv/medmerge/state.db
#   FLEET_ADDRESS  HOST:PORT the SuperNodes connect to (the only port to open in the firewall).
#   CONTROL_PORT   the SuperLink's port on 127.0.0.1 (default 9093): the Control API (`flwr`)
#                  and the ServerAppIo/Runtime API. Operators reach it through SSH:
#                  ssh -L 9093:127.0.0.1:9093 operator@superlink-host, then connect to 127.0.0.1:9093.
# Flower 1.41 serves Fleet, Control and ServerAppIo from one HTTPS server (--host/--port;
# --fleet-api-address and --control-api-address are deprecated and ignored), and its Control
# API has no login. So flower-superlink listens on 127.0.0.1 only, and deploy/fleet_gateway.py
# listens on FLEET_ADDRESS and forwards POST /v1/fleet/* (and GET /health) to it, nothing else.
# Runtime dependency installation and telemetry are off. Stop it with SIGTERM/SIGINT: both
# processes stop, and if either one exits the other is stopped too.
set -euo pipefail
usage="usage: start_superlink.sh CERT_DIR FLEET_ADDRESS [CONTROL_PORT] [extra flower-superlink args]"
die() { echo "start_superlink.sh: $*" >&2; exit 2; }
[ $# -ge 2 ] || die "$usage"
certs=$1; fleet=$2; shift 2
control_port=9093
if [ $# -ge 1 ] && [[ $1 =~ ^[0-9]+$ ]]; then control_port=$1; shift; fi

for f in ca.crt server.pem server.key; do
  [ -r "$certs/$f" ] || die "no $certs/$f (make it with deploy/make_certs.sh or your PKI)"
done
[[ $fleet =~ ^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]+)$ ]] \
  || die "FLEET_ADDRESS must be HOST:PORT or [IPV6]:PORT, got '$fleet'"
fleet_port=${BASH_REMATCH[2]}
for p in "$fleet_port" "$control_port"; do
  (( 10#$p >= 1 && 10#$p <= 65535 )) || die "port $p is not between 1 and 65535"
done
(( 10#$fleet_port != 10#$control_port )) || die "FLEET_ADDRESS and CONTROL_PORT need different ports"
# Extra args must not undo the binding, TLS or the install switch (argparse also accepts
# unambiguous prefixes such as --hos, so those are refused too).
for arg in "$@"; do
  [[ $arg == --?* ]] || continue
  name=${arg%%=*}
  for bad in --host --port --insecure --fleet-api-address --fleet-api-type \
      --control-api-address --serverappio-api-address --ssl-certfile --ssl-keyfile \
      --ssl-ca-certfile --allow-runtime-dependency-installation; do
    [[ $bad == "$name"* ]] && die "$name is set by this script (it would expose the Control API or undo TLS)"
  done
done

link=$(command -v flower-superlink) || die "flower-superlink is not on PATH"
# The gateway needs Flower's own dependencies (httpx, uvicorn): use flower-superlink's Python.
python=${MEDMERGE_PYTHON:-$(dirname "$(realpath "$link")")/python3}
[ -x "$python" ] || python=python3
here=$(dirname "$(realpath "${BASH_SOURCE[0]}")")

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1  # no call to PyPI at start-up either

pids=()
# shellcheck disable=SC2317  # invoked by the EXIT trap
stop() { trap - EXIT; kill -TERM "${pids[@]}" 2>/dev/null || true; wait || true; }
trap stop EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

"$link" --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" \
  --ssl-keyfile "$certs/server.key" --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --host 127.0.0.1 --port "$control_port" "$@" &
pids+=("$!")
"$python" "$here/fleet_gateway.py" --listen "$fleet" --upstream-port "$control_port" \
  --certs "$certs" &
pids+=("$!")
status=0
wait -n || status=$?
echo "start_superlink.sh: a process exited (status $status); stopping the other" >&2
exit "$status"
