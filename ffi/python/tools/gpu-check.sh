#!/usr/bin/env bash
# GPU check of the Python package (run from the repo root on a machine with a GPU and a
# CUDA torch): the CUDA path of hyzo.torch on torch's stream, then the CPU tests.
# HYZO_LIBRARY: a libhyzo.so built with the cuda feature (default .devcarry/libhyzo.so).
set -u
export PYTHONUNBUFFERED=1
export HYZO_LIBRARY="${HYZO_LIBRARY:-$PWD/.devcarry/libhyzo.so}"
: "${OUT:=/tmp}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, numpy, ml_dtypes; print('torch', torch.__version__, torch.cuda.is_available())"
# NVRTC for kernels compiled at first use: torch's wheel ships one.
nv=$(python3 -c "import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))" 2>/dev/null)
for d in "$nv"/nvidia/*/lib "$nv"/nvidia/cu13/lib; do [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; done
cd ffi/python
PYTHONPATH="$PWD" python3 -c "import hyzo; print('hyzo', hyzo.__version__, hyzo.library_path, 'cuda', hyzo.cuda_available())"
PYTHONPATH="$PWD" timeout 420 python3 -m pytest -q -rs -x -p no:cacheprovider tests/test_cuda.py tests/test_torch.py tests/test_numpy.py 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}; echo "pytest rc=$rc"; exit "$rc"
