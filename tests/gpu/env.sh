# Sourced by the device-call scripts in tests/gpu (run from the repository root): $OUT, the repository on
# PYTHONPATH, and pytest from ostquant_vllm/kernels/_build/wheels/ when the GPU machine lacks it (fill it
# here with: pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#   --platform manylinux_2_28_x86_64 -d ostquant_vllm/kernels/_build/wheels pytest pluggy iniconfig pygments packaging).
OUT=${OUT:-/tmp/ostq_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    ostquant_vllm/kernels/_build/wheels/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
