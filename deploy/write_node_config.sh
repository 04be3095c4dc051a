#!/usr/bin/env bash
# Write one hospital's node config file (read by start_supernode.sh), at that hospital.
# Usage: deploy/write_node_config.sh OUT_FILE role=ROLE name=NAME [data=SPEC] [checkpoint=SPEC]
#        [shard=i/k] [device=DEVICE] [in-channels=N] [state-dir=DIR] [audit-dir=DIR]
#        [identity=FILE identity-key=FILE] [policy=FILE]
#   role: institution (checkpoint and/or data to pretrain on), coordinator (data), site (data).
#   name: this hospital's name, as the operator signed it (1-64 of A-Z a-z 0-9 . _ -).
#   data: synthetic:TASK, or an absolute path to an existing MedMNIST .npz or a .yaml/.json
#     file with a data mapping.
#   checkpoint: random:N, torchvision:..., cifar10:..., imagenet:..., or an absolute path: an
#     existing checkpoint, or (with data=) where the backbone pretrained on that data is saved.
#   shard: i/k, this node's share of its data. device: auto, cpu, mps, cuda or cuda:N.
#   state-dir: where a site keeps its own FedBN layers (default ~/.medmerge/site-state).
#   audit-dir: where the node logs every message it handles (default ~/.medmerge/audit).
#   identity: the token the consortium operator signed for this node's SuperNode key
#     (`medmerge identity sign`); identity-key: that SuperNode private key, which proves it.
#   policy: the site policy (TOML, docs/site-policy.md) every message is checked against; it
#     must exist and parse (checked with `medmerge site show`, so medmerge must be on PATH).
# Paths in the file must be absolute: the ClientApps that read it run in another folder.
# Every pair is checked before anything is written (one-line error, exit 2, no file); the
# file appears whole or not at all, and the same arguments always write the same file.
set -euo pipefail
die() { echo "write_node_config.sh: $*" >&2; exit 2; }
[ $# -ge 1 ] || die "usage: write_node_config.sh OUT_FILE role=ROLE name=NAME [key=value ...]"
out=$1; shift
[[ -n $out && $out != */ ]] || die "OUT_FILE must be a file name, got '$out'"
keys="role, name, data, checkpoint, shard, device, in-channels, state-dir, audit-dir, identity, identity-key, policy"

declare -A value=()
order=()
for pair in "$@"; do
  [[ $pair == *=* ]] || die "$out: expected key=value, got '$pair'"
  key=${pair%%=*}; val=${pair#*=}
  case $key in
    role|name|data|checkpoint|shard|device|in-channels|state-dir|audit-dir|identity|identity-key|policy) ;;
    *) die "$out: unknown node config key '$key' ($keys)" ;;
  esac
  [ -z "${value[$key]+set}" ] || die "$out: $key given twice"
  [ -n "$val" ] || die "$out: $key is empty"
  # The file is TOML read by flower-supernode: no quote, backslash or control character.
  [[ $val != *[\"\\[:cntrl:]]* ]] || die "$out: $key holds a quote, backslash or control character"
  value[$key]=$val
  order+=("$key")
done

is_spec() { [[ $1 =~ ^(random(:[0-9]+)?|zeros|torchvision:.+|cifar10:.+|imagenet:.+)$ ]]; }
absolute() { [[ ${value[$1]} == /* ]] || die "$out: $1 must be an absolute path, got '${value[$1]}'"; }

role=${value[role]:-}; name=${value[name]:-}
[ -n "$role" ] || die "$out: role=... is required (institution, coordinator or site)"
[[ $role =~ ^(institution|coordinator|site)$ ]] \
  || die "$out: role '$role' is not one of institution, coordinator, site"
[ -n "$name" ] || die "$out: name=... is required (the name the operator signed)"
[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] \
  || die "$out: name '$name': expected 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit"

if [ -n "${value[data]+set}" ] && [[ ${value[data]} != synthetic:* ]]; then
  absolute data
  [[ ${value[data]} =~ \.(npz|ya?ml|json)$ ]] \
    || die "$out: data must be synthetic:TASK, a .npz or a .yaml/.json file, got '${value[data]}'"
  [ -f "${value[data]}" ] || die "$out: data ${value[data]} does not exist (or is not a file)"
  [ -r "${value[data]}" ] || die "$out: data ${value[data]} is not readable"
elif [ "${value[data]:-}" = synthetic: ]; then
  die "$out: data synthetic: needs a task, e.g. synthetic:target"
fi
if [ -n "${value[checkpoint]+set}" ] && ! is_spec "${value[checkpoint]}"; then
  absolute checkpoint
  if [ -z "${value[data]+set}" ]; then
    [ -f "${value[checkpoint]}" ] || die "$out: checkpoint ${value[checkpoint]} does not exist (give data= to pretrain one there)"
  else
    [ -d "$(dirname "${value[checkpoint]}")" ] \
      || die "$out: checkpoint folder $(dirname "${value[checkpoint]}") does not exist"
  fi
fi
case $role in
  site|coordinator) [ -n "${value[data]+set}" ] || die "$out: a $role needs data=..." ;;
  institution) [ -n "${value[data]+set}${value[checkpoint]+set}" ] \
    || die "$out: an institution needs checkpoint=... or data=... (or both)" ;;
esac
for key in state-dir audit-dir identity identity-key policy; do
  [ -z "${value[$key]+set}" ] || absolute "$key"
done
if [ -n "${value[identity]+set}" ] && [ -z "${value[identity-key]+set}" ]; then
  die "$out: identity needs identity-key (the SuperNode private key that proves it)"
elif [ -z "${value[identity]+set}" ] && [ -n "${value[identity-key]+set}" ]; then
  die "$out: identity-key needs identity (the token the operator signed)"
fi
if [ -n "${value[policy]+set}" ]; then
  [ -f "${value[policy]}" ] || die "$out: policy ${value[policy]} does not exist (or is not a file)"
  medmerge=$(command -v medmerge) || die "$out: policy: medmerge is not on PATH, so the policy cannot be checked"
  problem=$("$medmerge" site show --policy "${value[policy]}" 2>&1 >/dev/null) \
    || die "$out: policy: $(printf '%s' "$problem" | head -n 1)"
fi
if [ -n "${value[shard]+set}" ]; then
  bad_shard="$out: shard must be i/k with 0 <= i < k, got '${value[shard]}'"
  [[ ${value[shard]} =~ ^([0-9]{1,6})/([0-9]{1,6})$ ]] || die "$bad_shard"
  (( 10#${BASH_REMATCH[1]} < 10#${BASH_REMATCH[2]} )) || die "$bad_shard"
fi
if [ -n "${value[device]+set}" ]; then
  [[ ${value[device]} =~ ^(auto|cpu|mps|cuda(:[0-9]+)?)$ ]] \
    || die "$out: device must be auto, cpu, mps, cuda or cuda:N, got '${value[device]}'"
fi
if [ -n "${value[in-channels]+set}" ]; then
  [[ ${value[in-channels]} =~ ^[1-9][0-9]?$ ]] \
    || die "$out: in-channels must be a whole number from 1 to 99, got '${value[in-channels]}'"
fi

lines="# MedMerge node config: private to this hospital, never sent to the server"
for key in "${order[@]}"; do
  if [ "$key" = in-channels ]; then
    lines+=$'\n'"$key=${value[$key]}"
  else
    lines+=$'\n'"$key=\"${value[$key]}\""
  fi
done
mkdir -p "$(dirname "$out")"
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
printf '%s\n' "$lines" > "$tmp"
chmod 640 "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out ($role $name)"
