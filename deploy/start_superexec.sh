#!/usr/bin/env bash
# Start the SuperExec on the SuperLink host: it starts each run's ServerApp (flwr-serverapp).
# Run it as its own service beside start_superlink.sh (see docs/hospital-deployment.md): the
# ServerApps it starts outlive a SuperLink crash or restart and carry on with the same run once
# the SuperLink is back, if that takes less than about 40 s (the SuperLink fails a run whose
# ServerApp sent no heartbeat for 60 s; one is sent every 17.5-22.5 s).
# Usage: deploy/start_superexec.sh CERT_DIR STATE_DIR [CONTROL_PORT]
#   e.g. LOG_FILE=/var/log/medmerge/superexec.log \
#        deploy/start_superexec.sh /etc/medmerge/certs /var/lib/medmerge/superlink 9093
#   CERT_DIR, STATE_DIR, CONTROL_PORT: as given to start_superlink.sh. The SuperExec connects
#   to 127.0.0.1:CONTROL_PORT (verified against CERT_DIR/ca.crt) and retries until the
#   SuperLink answers. STATE_DIR/superexec.lock allows one SuperExec per SuperLink, and apps
#   are installed under $FLWR_HOME (default STATE_DIR/flwr-home).
#   LOG_FILE (environment, optional): append the SuperExec's and the ServerApps' output there.
# Telemetry and runtime dependency installation are off (install the app yourself, pinned).
set -euo pipefail
die() { echo "start_superexec.sh: $*" >&2; exit 2; }
(( $# >= 2 && $# <= 3 )) || die "usage: start_superexec.sh CERT_DIR STATE_DIR [CONTROL_PORT]"
certs=$(realpath -m -- "$1"); state=$(realpath -m -- "$2"); control_port=${3:-9093}
[ -r "$certs/ca.crt" ] || die "no $certs/ca.crt (the CA that signed the SuperLink's certificate)"
[[ $control_port =~ ^[0-9]{1,5}$ ]] || die "CONTROL_PORT must be a port number, got '$control_port'"
(( 10#$control_port >= 1 && 10#$control_port <= 65535 )) || die "CONTROL_PORT $control_port is not between 1 and 65535"
[ ! -e "$state" ] || [ -d "$state" ] || die "STATE_DIR $state exists and is not a folder"
if [ -n "${LOG_FILE:-}" ]; then
  LOG_FILE=$(realpath -m -- "$LOG_FILE")
  mkdir -p "$(dirname "$LOG_FILE")"
  : >> "$LOG_FILE" || die "cannot write LOG_FILE $LOG_FILE"
fi
superexec=$(command -v flower-superexec) || die "flower-superexec is not on PATH"

mkdir -p "$state"
chmod 700 "$state"
exec 9>>"$state/superexec.lock"
flock -n 9 || die "another SuperExec is running for $state (it holds $state/superexec.lock)"
if [ -n "${LOG_FILE:-}" ]; then
  exec >>"$LOG_FILE" 2>&1
fi
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_HOME=${FLWR_HOME:-$state/flwr-home}
echo "start_superexec.sh: $(date -u +%FT%TZ) ServerApps for the SuperLink on 127.0.0.1:$control_port (apps in $FLWR_HOME)"
# exec: flower-superexec keeps the lock (fd 9) for as long as it runs.
exec "$superexec" --root-certificates "$certs/ca.crt" \
  --runtime-api-address "127.0.0.1:$control_port"
