#!/usr/bin/env bash
# Health check for a MedMerge deployment: one line per check ("ok ..." or "FAIL ..."), exit 0
# when every check passed and 1 otherwise, so a monitoring system can run it as it is.
# Usage:
#   deploy/health_check.sh superlink CERT_DIR STATE_DIR [CONTROL_PORT] [FLEET_ADDRESS]
#     on the SuperLink host: the SuperLink answers on 127.0.0.1:CONTROL_PORT (default 9093),
#     the SuperLink and the SuperExec hold their locks in STATE_DIR (both are running), and,
#     with FLEET_ADDRESS, the Fleet gateway answers there.
#   deploy/health_check.sh supernode CA_CERT SUPERLINK_FLEET_ADDRESS PRIVATE_KEY
#     on a hospital's SuperNode host: the SuperLink's Fleet gateway answers through the
#     firewall with a certificate that CA_CERT verifies, and a SuperNode runs with PRIVATE_KEY.
# Each HTTPS check is `curl --cacert CA https://HOST:PORT/health` with a 5 s limit. Whether
# the SuperLink sees a node online is the operator's check: `flwr supernode list CONNECTION`.
set -uo pipefail
die() { echo "health_check.sh: $*" >&2; exit 2; }
failed=0
check() {  # check DESCRIPTION COMMAND...
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then echo "ok   $what"; else echo "FAIL $what"; failed=1; fi
}
# shellcheck disable=SC2317  # both are called through check()
https() { curl --silent --show-error --fail --max-time 5 --cacert "$1" "https://$2/health"; }
# shellcheck disable=SC2317
held() { [ -r "$1" ] && ! flock -n "$1" true; }  # someone holds the lock: the service runs
command -v curl >/dev/null || die "curl is not installed"
command -v flock >/dev/null || die "flock is not installed (package util-linux)"

case ${1:-} in
  superlink)
    (( $# >= 3 && $# <= 5 )) || die "usage: health_check.sh superlink CERT_DIR STATE_DIR [CONTROL_PORT] [FLEET_ADDRESS]"
    certs=$(realpath -m -- "$2"); state=$(realpath -m -- "$3"); port=${4:-9093}; fleet=${5:-}
    [ -r "$certs/ca.crt" ] || die "cannot read $certs/ca.crt"
    check "SuperLink answers on 127.0.0.1:$port" https "$certs/ca.crt" "127.0.0.1:$port"
    check "SuperLink runs on $state (superlink.lock held)" held "$state/superlink.lock"
    check "SuperExec runs for $state (superexec.lock held; without it no run starts)" \
      held "$state/superexec.lock"
    check "database $state/superlink.db exists" test -s "$state/superlink.db"
    if [ -n "$fleet" ]; then
      check "Fleet gateway answers on $fleet" https "$certs/ca.crt" "$fleet"
    fi
    ;;
  supernode)
    [ $# -eq 4 ] || die "usage: health_check.sh supernode CA_CERT SUPERLINK_FLEET_ADDRESS PRIVATE_KEY"
    ca=$(realpath -m -- "$2"); fleet=$3; key=$(realpath -m -- "$4")
    [ -r "$ca" ] || die "cannot read $ca"
    check "SuperLink's Fleet gateway answers on $fleet (firewall, DNS and certificate)" \
      https "$ca" "$fleet"
    check "a SuperNode runs with $key (its lock is held)" held "$key"
    ;;
  *) die "usage: health_check.sh superlink CERT_DIR STATE_DIR [CONTROL_PORT] [FLEET_ADDRESS] | supernode CA_CERT SUPERLINK_FLEET_ADDRESS PRIVATE_KEY" ;;
esac
exit "$failed"
