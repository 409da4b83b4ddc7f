#!/usr/bin/env bash
# Builds one pinned Go tool (helm, kind, distribution's registry or versitygw) from its
# module on the Go module proxy into a cache outside the repository, keyed by
# version, and prints the binary's path last. Does nothing when that version is
# already built.
#   tests/tools/build.sh helm     # -> ~/.cache/regmirror/tools/helm-v4.3.2/bin/helm
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC1091
source "$here/versions.env"
tool=${1:?usage: build.sh helm|kind|registry|versitygw}
case "$tool" in
  # helm's version string comes from the linker (its Makefile does the same).
  helm) module=$HELM_MODULE/cmd/helm version=$HELM_VERSION ldflags="-X $HELM_MODULE/internal/version.version=$HELM_VERSION" ;;
  kind) module=$KIND_MODULE version=$KIND_VERSION ldflags="" ;;
  registry) module=$DISTRIBUTION_MODULE/cmd/registry version=$DISTRIBUTION_VERSION ldflags="" ;;
  versitygw) module=$VERSITYGW_MODULE/cmd/versitygw version=$VERSITYGW_VERSION ldflags="" ;;
  *) echo "unknown tool $tool (helm, kind, registry or versitygw)" >&2; exit 2 ;;
esac
out="${REGMIRROR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/regmirror}/tools/$tool-$version/bin"
if [ ! -x "$out/$tool" ]; then
  command -v go >/dev/null || { echo "building $tool needs Go (https://go.dev/dl/, or apt-get install golang-go)" >&2; exit 1; }
  echo ">> building $tool $version from $module" >&2
  start=$(date +%s)
  tmp="$out.tmp.$$"
  mkdir -p "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  CGO_ENABLED=0 GOBIN="$tmp" go install -trimpath -ldflags "-s -w $ldflags" "$module@$version" >&2
  mkdir -p "$out"
  mv "$tmp/$tool" "$out/$tool"
  echo ">> built $tool in $(( $(date +%s) - start ))s" >&2
fi
echo "$out/$tool"
