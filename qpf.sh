#!/usr/bin/env bash
# Set up (on first use) and run qpf:  ./qpf.sh train [OPTIONS]   |   ./qpf.sh test [PYTEST ARGS]
#
# The first call creates the virtual environment $VENV (default .venv) with Python 3.11+
# ($PYTHON, else python3.12, python3.11, python3) and installs the project with its dev
# extra; later calls reinstall only when pyproject.toml is newer than the last install.
#   train  python -m experiments.train [OPTIONS]   (default: the tiny preset on TinyShakespeare)
#   test   python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder [PYTEST ARGS]   (the whole suite)
set -euo pipefail
cd "$(dirname "$0")"

VENV="${VENV:-.venv}"

usage() {
  echo "usage: ./qpf.sh train [experiments.train options] | ./qpf.sh test [pytest args]" >&2
  exit 2
}

find_python() {
  local candidates=("${PYTHON:-}" python3.12 python3.11 python3)
  for py in "${candidates[@]}"; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$py"
      return 0
    fi
  done
  echo "error: qpf needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 2
}

setup() {
  local stamp="$VENV/.qpf-installed"
  if [ ! -x "$VENV/bin/python" ]; then
    local py
    py="$(find_python)"
    echo "+ $py -m venv $VENV" >&2
    if ! "$py" -m venv "$VENV"; then
      echo "error: could not create $VENV (on Debian/Ubuntu: apt install python3-venv)" >&2
      rm -rf "$VENV"
      exit 2
    fi
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "+ $VENV/bin/python -m pip install -e '.[dev]'" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
    touch "$stamp"
  fi
}

[ $# -ge 1 ] || usage
verb="$1"
shift
case "$verb" in
  train)
    setup
    exec "$VENV/bin/python" -m experiments.train "$@"
    ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder "$@"
    ;;
  setup)
    setup
    ;;
  *)
    usage
    ;;
esac
