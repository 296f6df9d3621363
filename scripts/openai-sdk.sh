#!/usr/bin/env bash
# The openai Python SDK, whose own response types the tests validate every output body against
# (tests/openai/validate.py), in a virtual environment at .venv-openai/. Fetched once, at set-up;
# nothing at run time needs it.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=3.57.0
VENV=.venv-openai
if "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$VERSION')" 2>/dev/null; then
    exit 0
fi
if ! command -v python3 >/dev/null 2>&1; then
    echo "error: python3 is missing; install it (apt-get install -y python3 python3-venv)" >&2
    exit 1
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "openai==$VERSION"
echo "installed: openai $VERSION in $VENV"
