#!/usr/bin/env bash
# Builds the control plane (multi-call binary with etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl) and kwok into a cache
# outside the repository, keyed by the pinned versions and the sources here.
# Does nothing when the binaries are already there. Prints the cache dir last.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
# shellcheck disable=SC1091
source ./versions.env
key="k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_$(cat main.go go.mod go.sum | sha256sum | cut -c1-12)"
cache_root="${REGMIRROR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/regmirror}/controlplane"
out="$cache_root/$key"
if [ -x "$out/bin/controlplane" ] && [ -x "$out/bin/kwok" ] && [ -f "$out/stages/.complete" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$out/bin" "$out/stages"
start=$(date +%s)
minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=${KUBERNETES_VERSION} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor}"
ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo ">> building control plane ${KUBERNETES_VERSION} (etcd ${ETCD_VERSION}) into $out" >&2
go build -trimpath -ldflags "$ldflags" -o "$out/bin/controlplane.tmp" . >&2
mv "$out/bin/controlplane.tmp" "$out/bin/controlplane"
for p in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  ln -sf controlplane "$out/bin/$p"
done
echo ">> building kwok ${KWOK_VERSION}" >&2
GOBIN="$out/bin" go install "sigs.k8s.io/kwok/cmd/kwok@${KWOK_VERSION}" >&2
# Stage files (node initialize/heartbeat, pod ready/complete/delete) come from
# the kwok module itself, so they match the binary.
kwok_dir=$(go mod download -json "sigs.k8s.io/kwok@${KWOK_VERSION}" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
# volume/fast provisions and binds PVCs, so a mirror's storage becomes Bound.
for stage in node/fast node/heartbeat-with-lease pod/fast volume/fast; do
  mkdir -p "$out/stages/$stage"
  cp "$kwok_dir/kustomize/stage/$stage"/*.yaml "$out/stages/$stage/"
  rm -f "$out/stages/$stage/kustomization.yaml"
done
touch "$out/stages/.complete"
echo ">> built in $(( $(date +%s) - start ))s" >&2
echo "$out"
