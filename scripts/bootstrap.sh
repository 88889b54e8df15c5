#!/usr/bin/env bash
# Set up everything vmchannel needs to build and run on a fresh Debian 12 machine:
# system packages for a Python virtual environment and the C build (apt, when missing and
# we are root), the virtual environment in .venv, the Python dependencies, and the cffi
# C module built in place. Safe to re-run: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test}

need_apt=()
command -v "$PYTHON" >/dev/null 2>&1 || need_apt+=(python3)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
if command -v "$PYTHON" >/dev/null 2>&1; then
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
    inc=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [ -f "$inc/Python.h" ] || need_apt+=(python3-dev)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "bootstrap: installing Debian packages: ${need_apt[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" libffi-dev >/dev/null
    else
        echo "bootstrap: missing Debian packages (${need_apt[*]}); run as root or: sudo apt-get install ${need_apt[*]}" >&2
        exit 1
    fi
fi

stamp="$VENV/.vmchannel-installed"
inputs_hash=$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)-$EXTRAS
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs_hash" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
    "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
    echo "$inputs_hash" > "$stamp"
fi
# The C ring, built in place so the source tree imports it (pip's editable install does
# not always run cffi_modules). Rebuilds only when csrc/ or the build script changed.
"$VENV/bin/python" - <<'PY'
import hashlib, pathlib, subprocess, sys
root = pathlib.Path(".")
sources = sorted(root.glob("csrc/*")) + [root / "ring/_vring_build.py"]
if not (root / "ring/_vring_build.py").exists():
    sys.exit(0)
digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
stamp = root / "ring/.vring_c.stamp"
built = list(root.glob("ring/_vring_c*.so"))
if built and stamp.exists() and stamp.read_text() == digest:
    sys.exit(0)
subprocess.run([sys.executable, "ring/_vring_build.py"], check=True)
stamp.write_text(digest)
PY
