#!/usr/bin/env bash
# CI for the oldest supported pair, torch 2.11 with triton 3.6 (pyproject.toml's lower bounds), in a virtual
# environment of its own: the static GPU check (every kernel and config compiled for sm_80 and sm_90, no spills),
# then the tests that run every kernel, through Triton's interpreter when there is no GPU. numpy stays below 2.3,
# where Triton 3.6's interpreter still converts scalars. torch 2.11 comes from PyPI as its CUDA build (about 5 GB,
# once per venv); it runs without a GPU. Any pytest exit code but 0 fails the script (5: no tests collected).
#   scripts/ci_oldest.sh [pytest options]     FASTLORA_OLDEST_VENV defaults to .venv-oldest, PYTHON to python3
#   scripts/ci_oldest.sh --prepare            only make the venv and install the pinned pair (its slow part, disk
#                                             bound; .ci/run does it while the main test suite runs)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FASTLORA_OLDEST_VENV:-.venv-oldest}
python=${PYTHON:-python3}
start=$SECONDS

if [ ! -x "$venv/bin/python" ]; then
  # torch 2.11's CUDA wheel and its CUDA packages take about 6 GB once installed, more while pip unpacks them.
  free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt 12 ]; then
    echo "ci_oldest: $free_gb GB free here; the oldest pair's venv needs about 12 GB while it installs" >&2
    exit 1
  fi
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pins=(torch==2.11.0 triton==3.6.0 'numpy<2.3')
if [ "${1:-}" = --prepare ]; then
  "$py" -m pip install -q "${pins[@]}"
  echo "ci_oldest --prepare: done in $((SECONDS - start)) s"
  exit 0
fi
# The pins and the project in one resolve, so the project's own requirements cannot move the pins.
"$py" -m pip install -q "${pins[@]}" -e '.[test]'
"$py" -c 'import numpy, torch, triton; print("ci_oldest: torch", torch.__version__, "triton", triton.__version__,
                                                "numpy", numpy.__version__)'

"$py" -m pytest tests/test_static_check.py -q "$@"
# lora_linear runs the one-pass, shrink, expand and wgrad kernels, multi_lora_linear the three multi-adapter ones,
# grouped_lora the three grouped (mixture-of-experts) ones, qlora_kernels their 4-bit (NF4 / FP4) paths; test_compile
# traces them with this torch's torch.compile.
# In two processes (pytest-xdist): these tests time nothing.
"$py" -m pytest -q -n 2 "$@" \
  tests/test_lora_linear.py tests/test_dropout.py tests/test_multi_lora_linear.py tests/test_grouped_lora.py \
  tests/test_compile.py tests/test_layers.py tests/test_errors.py tests/test_qlora_kernels.py
echo "ci_oldest: passed in $((SECONDS - start)) s"
