#!/usr/bin/env bash
# Builds pinned containerd releases (besides the distribution's own 1.6) and
# crictl from their Go modules into a cache outside the repository, so the e2e
# tests can check the agent's files against every containerd line we support.
# Does nothing when the binaries are there. Prints the cache dir last.
# The releases are those whose behaviour the agent depends on: 1.7 (no default
# config_path), 2.0.5 (before dial_timeout) and 2.0.7 (the first 2.0 with it),
# 2.1.5 and 2.2.1 (the transfer service reading config_path as one directory,
# containerd#12415/#12636), 2.4 (the current line). About 3 minutes each, once.
set -euo pipefail
CONTAINERD_VERSIONS="${REGMIRROR_CONTAINERD_VERSIONS:-v1.7.35 v2.0.5 v2.0.7 v2.1.5 v2.2.1 v2.4.2}"
CRICTL_VERSION="${REGMIRROR_CRICTL_VERSION:-v1.37.0}"
cache="${REGMIRROR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/regmirror}/containerd"
tags="no_btrfs no_devmapper no_zfs no_aufs"
export CGO_ENABLED=0
mkdir -p "$cache"
for v in $CONTAINERD_VERSIONS; do
  out="$cache/containerd-$v/bin"
  [ -x "$out/containerd" ] && [ -x "$out/ctr" ] && continue
  echo ">> building containerd $v" >&2
  mkdir -p "$out"
  module=github.com/containerd/containerd
  case "$v" in v2.*) module=$module/v2 ;; esac
  # Some releases' go.mod (all 1.x, 2.1.x) has exclude directives, which
  # `go install pkg@version` refuses: build inside a copy of the module.
  src=$(go mod download -json "$module@$v" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
  work=$(mktemp -d)
  cp -r "$src/." "$work/" && chmod -R u+w "$work"
  (cd "$work" && go build -mod=mod -tags "$tags" -o "$out/" ./cmd/containerd ./cmd/ctr) >&2
  rm -rf "$work"
done
if [ ! -x "$cache/crictl/bin/crictl" ]; then
  echo ">> building crictl $CRICTL_VERSION" >&2
  GOBIN="$cache/crictl/bin" go install "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION" >&2
fi
echo "$cache"
