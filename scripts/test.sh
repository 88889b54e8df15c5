#!/usr/bin/env bash
# The whole test suite: set up (scripts/bootstrap.sh: Debian packages, venv, Python deps,
# the C ring), install what the real-guest tests need (QEMU, a Linux kernel, busybox,
# qemu-guest-agent), then run every test with the C ring required. Extra arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/ensure-guest-deps.sh
VMCHANNEL_RING=c exec .venv/bin/python -m pytest -q tests "$@"
