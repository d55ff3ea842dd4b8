#!/usr/bin/env bash
# A regular (non-editable) install, as a user gets it: build a wheel from this
# checkout, install it into a fresh virtual environment, and use it from
# outside the source tree. The editable install of the test run hides a
# package missing from the wheel; this does not.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$repo"
MAX_JOBS="${MAX_JOBS:-2}" pip wheel -q --no-build-isolation --no-deps . -w "$work/dist"
python -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0
"$work/venv/bin/pip" install -q "$work"/dist/obd_ext-*.whl
cd "$work"
"$work/venv/bin/python" "$repo/.ci/wheel_smoke.py" "$repo" "$work"/dist/obd_ext-*.whl
"$work/venv/bin/obd-ext" --version
"$work/venv/bin/python" -m obd_ext --version
"$work/venv/bin/python" -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), v"
