#!/usr/bin/env bash
# The Helm chart's checks: lint and render with Helm 4's engine (no helm
# binary, no cluster), the schema's refusals, kubernetes-validate --strict, a
# review of the rendered objects (and that it trips on broken ones), and
# checkov. Run from the repository root: `bash tests/helm/run.sh`.
#
# The tools live in a venv outside the repository (not in the system Python,
# whose packages the project pins elsewhere), reused while
# tests/helm/requirements.txt and constraints.txt are unchanged:
#   CHIPSITE_HELM_VENV  the venv (default ~/.cache/chipsite-helm-venv)
#   CHIPSITE_HELM_OUT   where to keep the rendered manifests (default: a
#                       temporary directory, removed at the end)
#   PYTHON              the Python that makes the venv (default python3, 3.11+)
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${CHIPSITE_HELM_VENV:-$HOME/.cache/chipsite-helm-venv}"
python="${PYTHON:-python3}"
pins=(tests/helm/requirements.txt tests/helm/constraints.txt)
stamp="$venv/.chipsite-helm-pins"

elapsed() { printf '    (%s: %d s)\n' "$1" "$(( $(date +%s) - $2 ))"; }

printf '==> tools venv (%s)\n' "$venv"
t0=$(date +%s)
if ! "$venv/bin/python" -c '' 2>/dev/null; then
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    # Debian's python3 without python3-venv has no ensurepip: make the venv
    # without pip and let the system's pip install pip into it.
    rm -rf "$venv"
    "$python" -m venv --without-pip "$venv"
    "$python" -m pip --python "$venv/bin/python" install --quiet --disable-pip-version-check pip
  fi
fi
if [ "$(cat "${pins[@]}")" != "$(cat "$stamp" 2>/dev/null)" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r tests/helm/requirements.txt -c tests/helm/constraints.txt
  cat "${pins[@]}" > "$stamp"
else
  echo "    reused (pins unchanged)"
fi
elapsed "tools venv" "$t0"

out="${CHIPSITE_HELM_OUT:-}"
if [ -z "$out" ]; then
  out="$(mktemp -d -t chipsite-helm.XXXXXX)"
  trap 'rm -rf "$out"' EXIT
fi

t0=$(date +%s)
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" tests/helm/check_chart.py --out "$out"
elapsed "chart checks" "$t0"
