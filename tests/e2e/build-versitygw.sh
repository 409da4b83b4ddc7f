#!/usr/bin/env bash
# Builds versitygw (Versity's S3 gateway, Apache-2.0) from its Go module into a
# cache outside the repository: the S3-compatible server the HA e2e tests put
# distribution's s3 driver on. Why this one: a production gateway (not a mock)
# whose posix back-end keeps objects as plain files, that implements what the
# driver calls (path-style addressing, ListObjectsV2, multipart uploads with
# ListMultipartUploads/ListParts, UploadPartCopy/CopyObject, DeleteObjects,
# ranged GetObject, SigV4), is one static Go binary and starts in well under a
# second. Does nothing when the binary is there. Prints the binary's path last.
set -euo pipefail
VERSION="${REGMIRROR_VERSITYGW_VERSION:-v1.8.0}"
cache="${REGMIRROR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/regmirror}/versitygw-$VERSION"
bin="$cache/versitygw"
if [ ! -x "$bin" ]; then
  echo ">> building versitygw $VERSION from the Go module proxy" >&2
  mkdir -p "$cache"
  # CGO off: a static binary; nice: the machine is shared.
  CGO_ENABLED=0 GOBIN="$cache" nice -n 10 go install "github.com/versity/versitygw/cmd/versitygw@$VERSION" >&2
fi
echo "$bin"
