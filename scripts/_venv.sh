# Sourced by scripts/serve and scripts/test: make (or reuse) a virtual environment with the project
# installed. Only Python (>= 3.11, with venv) is needed on the machine. Set PYTHON to choose the
# interpreter and VENV to choose the directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $("$PYTHON" --version 2>&1)" >&2
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.bridge-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16)${EXTRAS}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing the bridge${EXTRAS:+ with [$EXTRAS]} into $VENV" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
  echo "$want" > "$stamp"
fi
