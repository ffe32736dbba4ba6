#!/usr/bin/env bash
# Re-resolve constraints.txt on purpose: install requirements.txt into a fresh virtual environment
# (torch first, the CPU wheel) and freeze what pip chose. Review the diff, run the suite, commit.
#   bash tools/update_constraints.sh            # writes constraints.txt at the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python -m venv "$venv"
"$venv/bin/python" -m pip install --quiet torch==2.13.0
"$venv/bin/python" -m pip install --quiet -r requirements.txt
{
  echo "# Exact versions for a reproducible install: pip install -c constraints.txt -r requirements.txt"
  echo "# (README set-up and .ci/run). requirements.txt keeps the ranges library users get. torch is"
  echo "# installed before this file (the CPU wheel here, the CUDA build of your choice on a GPU machine)"
  echo "# and is not pinned in it. Regenerate on purpose with: bash tools/update_constraints.sh"
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -v -i -E '^(torch|pip|setuptools|wheel)=='
} > constraints.txt
rm -rf "$(dirname "$venv")"
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pinned packages"
