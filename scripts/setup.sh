#!/usr/bin/env bash
# From a fresh clone to a running MONAI Label server: builds .venv (Python 3.11), installs the stack,
# writes a small phantom datastore and serves it on http://127.0.0.1:8000.
# Re-running reuses .venv and skips the installs while the requirement files are unchanged.
#
#   bash scripts/setup.sh              # install, then serve sample_data/ (Ctrl-C stops)
#   bash scripts/setup.sh --no-serve   # install only (CI)
#   PYTHON=/path/to/python3.11 bash scripts/setup.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

serve=1
for arg in "$@"; do
  case "$arg" in
    --no-serve) serve=0 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (use --no-serve or --help)" >&2; exit 2 ;;
  esac
done

venv_py="$ROOT/.venv/bin/python"
is_py311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; }

if [ ! -x "$venv_py" ]; then
  python="${PYTHON:-python3.11}"
  if ! command -v "$python" >/dev/null 2>&1 || ! is_py311 "$python"; then
    echo "setup.sh: Python 3.11 is required but '$python' is missing or another version." >&2
    echo "          Install Python 3.11 (e.g. 'pyenv install 3.11' or 'apt install python3.11-venv')" >&2
    echo "          or point PYTHON at it: PYTHON=/path/to/python3.11 bash scripts/setup.sh" >&2
    exit 1
  fi
  echo "==> creating .venv with $("$python" --version)"
  "$python" -m venv "$ROOT/.venv"
elif ! is_py311 "$venv_py"; then
  echo "setup.sh: .venv exists but is not Python 3.11; remove it (rm -rf .venv) and re-run." >&2
  exit 1
fi

# The stamp records the requirement files the venv was built from, so a re-run is instant.
stamp="$ROOT/.venv/.medprompt-setup"
wanted="$(cat constraints.txt requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  # Our constraints replace pip's global constraint file, so they pin torch/torchvision themselves.
  export PIP_CONSTRAINT="$ROOT/constraints.txt"
  # monailabel depends on sam2, which builds from source: CPU-only build, no CUDA toolchain needed.
  export SAM2_BUILD_CUDA=0
  pip=("$venv_py" -m pip install --disable-pip-version-check)
  echo "==> installing torch and torchvision (pinned in constraints.txt)"
  "${pip[@]}" torch torchvision
  echo "==> installing the runtime and test requirements"
  "${pip[@]}" -r requirements.txt -r requirements-dev.txt
  echo "==> installing medprompt (editable)"
  "${pip[@]}" -e .
  echo "$wanted" > "$stamp"
else
  echo "==> .venv is up to date"
fi

if [ "$serve" = 0 ]; then
  echo "==> setup done; run the tests with: .venv/bin/python -m pytest -q tests"
  exit 0
fi

if [ ! -d sample_data ]; then
  echo "==> writing a phantom datastore to sample_data/"
  "$ROOT/.venv/bin/medprompt" sample-data sample_data --n 4
fi
echo "==> serving sample_data/ on http://127.0.0.1:8000 (Ctrl-C stops)"
exec "$ROOT/.venv/bin/medprompt" serve --studies sample_data
