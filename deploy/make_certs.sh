#!/usr/bin/env bash
# Development TLS certificates for a SuperLink: a private CA and a server certificate whose
# SAN covers localhost, 127.0.0.1, ::1 and the given IPs / DNS names. In production use your
# own PKI and keep the CA key off the SuperLink host (docs/hospital-deployment.md).
# Usage: deploy/make_certs.sh CERT_DIR [SAN ...]   e.g. deploy/make_certs.sh /etc/medmerge/certs IP:10.0.0.5
# Writes CERT_DIR/{ca.crt,ca.key,server.pem,server.key}. Idempotent: an existing CA is kept
# (replacing it would lock every hospital out), and the server certificate is kept while it
# verifies against ca.crt, has the same SANs and is valid for 30 more days; otherwise it is
# issued again from the same CA.
set -euo pipefail
die() { echo "make_certs.sh: $*" >&2; exit 2; }
[ $# -ge 1 ] || die "usage: make_certs.sh CERT_DIR [SAN ...]"
out=$(realpath -m -- "$1"); shift
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for extra in "$@"; do
  [[ $extra =~ ^(IP|DNS):[][A-Za-z0-9.:*-]+$ ]] || die "SAN '$extra': expected IP:ADDRESS or DNS:NAME"
  san="$san,$extra"
done
command -v openssl >/dev/null || die "openssl is not installed"
mkdir -p "$out"
cd "$out"
umask 077

if [ -f ca.crt ] && [ -f ca.key ]; then
  echo "keeping the CA in $out (ca.crt, ca.key)"
elif [ -f ca.crt ]; then
  echo "ca.crt without ca.key in $out: the CA key is kept elsewhere"
elif [ -e ca.key ]; then
  die "$out has ca.key but no ca.crt; move ca.key away (or restore ca.crt) and run again"
else
  openssl genrsa -out ca.key 3072 2>/dev/null
  openssl req -x509 -new -nodes -key ca.key -sha256 -days 3650 -subj "/CN=MedMerge dev CA" \
    -out ca.crt
  echo "made a new CA in $out (ca.crt is public: give it to every hospital; keep ca.key offline)"
fi

current() {
  [ -f server.pem ] && [ -f server.key ] && [ "$(cat server.san 2>/dev/null)" = "$san" ] \
    && openssl verify -CAfile ca.crt server.pem >/dev/null 2>&1 \
    && openssl x509 -in server.pem -noout -checkend 2592000 >/dev/null
}
if current; then
  echo "keeping $out/server.pem (SAN $san)"
  exit 0
fi
[ -f ca.key ] || die "server.pem is missing, expired or for other SANs, and ca.key is not here: issue it with your CA (SAN $san)"
openssl genrsa -out server.key.new 2048 2>/dev/null
openssl req -new -key server.key.new -subj "/CN=medmerge-superlink" -out server.csr
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem.new \
  -days 825 -sha256 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext
mv server.key.new server.key
mv server.pem.new server.pem
printf '%s\n' "$san" > server.san
chmod 644 ca.crt server.pem server.san
echo "wrote $out/{server.pem,server.key} (SAN $san)"
