#!/usr/bin/env bash
# The main job: set up (scripts/bootstrap.sh), then run the back-end on its built-in default
# configuration (or pass `serve --config FILE`, `console ...`, `vsock ...` to choose).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if [ $# -eq 0 ]; then
    set -- serve
fi
exec .venv/bin/vmchannel "$@"
