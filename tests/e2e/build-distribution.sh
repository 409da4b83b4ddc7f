#!/usr/bin/env bash
# Builds the CNCF distribution registry at the version of the operator's default
# image (registry:3.0.0) from its Go module into a cache outside the repository,
# so the benchmark and the e2e tests measure the registry the product ships
# instead of Debian's 2.8 (which fetches a missed blob twice). Does nothing when
# the binary is there. Prints the binary's path last.
set -euo pipefail
VERSION="${REGMIRROR_DISTRIBUTION_VERSION:-v3.0.0}"
cache="${REGMIRROR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/regmirror}/distribution-$VERSION"
bin="$cache/registry"
if [ ! -x "$bin" ]; then
  echo ">> building distribution $VERSION (registry) from the Go module proxy" >&2
  mkdir -p "$cache"
  # CGO off: a static binary, like the official image's.
  CGO_ENABLED=0 GOBIN="$cache" go install "github.com/distribution/distribution/v3/cmd/registry@$VERSION" >&2
fi
echo "$bin"
