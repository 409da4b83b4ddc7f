#!/usr/bin/env bash
# The Debian packages the tests run, each named with a command it provides.
# Installs the missing ones as root; otherwise stops at once with the one
# command that does. With package names as arguments, only those are needed.
#   tests/tools/system-packages.sh               # all of them (make system-packages)
#   tests/tools/system-packages.sh prometheus    # only promtool
set -euo pipefail
# package:command
all="docker-registry:docker-registry containerd:containerd skopeo:skopeo docker.io:dockerd apache2-utils:htpasswd prometheus:promtool varnish:varnishd runc:runc conmon:conmon"
wanted=${*:-}
need=()
for pair in $all; do
  pkg=${pair%%:*} cmd=${pair##*:}
  if [ -n "$wanted" ] && [[ " $wanted " != *" $pkg "* ]]; then continue; fi
  PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${need[*]}; install them with: sudo make system-packages" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "missing packages ${need[*]} and no apt-get: install their equivalents (commands: docker-registry containerd skopeo dockerd htpasswd promtool varnishd runc conmon)" >&2
  exit 1
fi
echo ">> apt-get install ${need[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
# Only promtool is wanted from `prometheus`: on a host with systemd the package
# also starts a Prometheus server, which nothing here needs.
if [[ " ${need[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl disable --now prometheus >&2 || true
fi
