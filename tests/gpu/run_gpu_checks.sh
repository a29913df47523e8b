#!/usr/bin/env bash
# GPU checks of qwen-batch: installs the `gpu` extra (dfloat11[cuda12], setuptools<81) and runs
# tests/gpu, printing the figures (peak GB, s/step) of each case. Needs a CUDA build of torch
# already installed (the extra does not choose a torch build), network for pip, ~35 GB of free
# disk under $QWEN_BATCH_GPU_TMP (default /tmp/qwen-batch-gpu) and ~64 GB of host RAM.
#
#   tests/gpu/run_gpu_checks.sh                 # every check
#   tests/gpu/run_gpu_checks.sh -k bit_for_bit  # extra arguments go to pytest
#   QWEN_BATCH_MODEL_DIR=/models/qwen-image tests/gpu/run_gpu_checks.sh   # + the real model
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
TMP="${QWEN_BATCH_GPU_TMP:-/tmp/qwen-batch-gpu}"

"$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA GPU (torch.version.cuda={torch.version.cuda}): "
             "install a CUDA build of torch and check the driver (nvidia-smi)")
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {p.name}, {p.total_memory / 2**30:.1f} GB")
PY

"$PYTHON" -m pip install --quiet -e '.[gpu,test]'
"$PYTHON" -m jobs doctor --model qwen-image-df11 || true   # informational: model files are usually absent

export HF_HUB_OFFLINE=1
rm -rf "$TMP"
status=0
"$PYTHON" -m pytest tests/gpu -m gpu -v -s -rs -p no:cacheprovider --basetemp "$TMP" "$@" || status=$?
rm -rf "$TMP"
# speed figures: s/forward resident, offloaded, offloaded with side-stream prefetch; s/image at 50 steps and Lightning-8
"$PYTHON" bench/bench_gpu.py || status=$?
exit "$status"
