#!/usr/bin/env bash
# Builds CRI-O (crio, with cgo: no Debian package in bookworm) from its Go module, and its
# small C helper pinns, into a cache outside the repository, so the e2e tests can check the
# agent's registries.conf.d drop-in against the real CRI-O. Needs gcc; the runtime pieces
# come from Debian (runc, conmon). Does nothing when the binaries are there. Prints the
# directory of the binaries last.
set -euo pipefail
CRIO_VERSION="${REGMIRROR_CRIO_VERSION:-v1.34.0}"
cache="${REGMIRROR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/regmirror}/crio-$CRIO_VERSION/bin"
if [ ! -x "$cache/crio" ] || [ ! -x "$cache/pinns" ]; then
  echo ">> building CRI-O $CRIO_VERSION" >&2
  mkdir -p "$cache"
  src=$(go mod download -json "github.com/cri-o/cri-o@$CRIO_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
  work=$(mktemp -d)
  cp -r "$src/." "$work/" && chmod -R u+w "$work"
  # containers_image_openpgp: no gpgme; no btrfs or devicemapper headers needed.
  tags="containers_image_openpgp containers_image_ostree_stub exclude_graphdriver_btrfs exclude_graphdriver_devicemapper"
  (cd "$work" && CGO_ENABLED=1 go build -mod=mod -tags "$tags" -o "$cache/crio" ./cmd/crio) >&2
  gcc -O2 -std=c99 -Wall -o "$cache/pinns" "$work/pinns/src/pinns.c" "$work/pinns/src/sysctl.c" >&2
  rm -rf "$work"
fi
echo "$cache"
