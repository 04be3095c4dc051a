#!/usr/bin/env bash
# Start the SuperLink with TLS and SuperNode authentication.
# Usage: deploy/start_superlink.sh CERT_DIR [extra flower-superlink args]
set -euo pipefail
certs=${1:?usage: start_superlink.sh CERT_DIR}; shift
exec flower-superlink \
  --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" \
  --ssl-keyfile "$certs/server.key" --enable-supernode-auth "$@"
