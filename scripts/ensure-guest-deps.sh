#!/usr/bin/env bash
# Make sure the real-guest tests (tests/guest/) can run: Debian 12's QEMU 7.2
# (qemu-system-x86), Linux 6.1 (linux-image-amd64), busybox-static and qemu-guest-agent,
# plus gcc and a static libc for the guest helper. Installs what is missing with apt when
# run as root; otherwise says loudly what is missing and exits non-zero.
# Safe to re-run: does nothing when everything is present.
set -euo pipefail

packages=(qemu-system-x86 linux-image-amd64 busybox-static qemu-guest-agent gcc libc6-dev)

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    {
        echo "######################################################################"
        echo "ensure-guest-deps: MISSING Debian packages for the real-guest tests:"
        echo "    ${missing[*]}"
        echo "Run as root, or: sudo apt-get install ${missing[*]}"
        echo "######################################################################"
    } >&2
    exit 1
fi

echo "ensure-guest-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "ensure-guest-deps: done" >&2
