#!/usr/bin/env bash
# Development TLS certificates for a SuperLink: a private CA and a server certificate whose
# SAN covers localhost and the given IPs / DNS names. NOT for production (use your PKI).
# Usage: deploy/make_certs.sh OUT_DIR [SAN ...]   e.g. deploy/make_certs.sh certs IP:10.0.0.5
set -euo pipefail
out=${1:?usage: make_certs.sh OUT_DIR [SAN ...]}; shift || true
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for extra in "$@"; do san="$san,$extra"; done
mkdir -p "$out"; cd "$out"
openssl genrsa -out ca.key 3072 2>/dev/null
openssl req -x509 -new -nodes -key ca.key -sha256 -days 365 -subj "/CN=MedMerge dev CA" -out ca.crt
openssl genrsa -out server.key 2048 2>/dev/null
openssl req -new -key server.key -subj "/CN=medmerge-superlink" -out server.csr
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem \
  -days 365 -sha256 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext
chmod 600 ca.key server.key
echo "wrote $out/{ca.crt,server.pem,server.key} (SAN $san)"
