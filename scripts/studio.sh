#!/usr/bin/env bash
# The app command of the README: install into .venv if needed, then start the studio.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/streamlit run app/main.py "$@"
