#!/usr/bin/env bash
# Make this hospital's SuperNode key pair (ECDSA P-384; Flower rejects ed25519), on the
# hospital's own SuperNode host. The private key never leaves that host: send only the public
# key (NAME.pub) to the consortium operator, and read its fingerprint to them on a second
# channel (phone) so they register the key you sent.
# Usage: deploy/make_node_keys.sh KEY_DIR NAME [NAME ...]
#   e.g. deploy/make_node_keys.sh /etc/medmerge/keys site-1
#   Prints the absolute path of each public key to send, one per line (the fingerprints go to
#   stderr). Several names make several key pairs in one folder: that is for tests and
#   demonstrations on one machine, not for a consortium.
# Idempotent: an existing key pair is kept (and checked to be ECDSA P-384), never replaced.
set -euo pipefail
die() { echo "make_node_keys.sh: $*" >&2; exit 2; }
[ $# -ge 2 ] || die "usage: make_node_keys.sh KEY_DIR NAME [NAME ...]"
dir=$(realpath -m -- "$1"); shift
for name in "$@"; do
  [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] \
    || die "name '$name': expected 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit"
done
command -v ssh-keygen >/dev/null || die "ssh-keygen is not installed (package openssh-client)"
mkdir -p "$dir"
chmod 700 "$dir"
for name in "$@"; do
  key=$dir/$name
  if [ ! -e "$key" ]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$key"
  fi
  [ -f "$key.pub" ] || ssh-keygen -y -f "$key" > "$key.pub" \
    || die "$key exists but is not a readable private key"
  derived=$(ssh-keygen -y -f "$key") || die "$key is not a readable private key"
  read -r kind blob _ <<< "$derived"
  read -r pub_kind pub_blob _ < "$key.pub" || true
  [ "$kind $blob" = "${pub_kind:-} ${pub_blob:-}" ] || die "$key.pub does not belong to $key; move both away and run again"
  info=$(ssh-keygen -l -f "$key.pub") || die "$key.pub is not a public key"
  [[ $info == "384 "*"(ECDSA)" ]] || die "$key is not an ECDSA P-384 key ($info); move it away and run again"
  chmod 600 "$key"
  echo "$name: send $key.pub to the operator; fingerprint ${info#384 }" >&2
  echo "$key.pub"
done
