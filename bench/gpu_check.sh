#!/usr/bin/env bash
# The GPU checks of issue 11, as one command on a CUDA machine (nothing depends on them; CI has no
# GPU): GPTQ and SmoothQuant+W8A8 on SmolLM2 and on the 7B shape with its blocks onloaded one at a
# time onto the GPU, and FP8 with real kernels, each reporting time per phase, peak GPU memory and
# peak host RSS into bench/results/stream_scaling.{json,md} (rows with "device": "cuda").
#   bench/gpu_check.sh            # needs the project's venv with a CUDA torch of the pinned version
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
export HF_HUB_OFFLINE=1
"$PY" -m bench.stream_scaling --device cuda --models smollm2 --methods gptq smoothquant+w8a8 fp8 \
    --samples 64 --seq-len 512 --budget-gb 100
"$PY" -m bench.stream_scaling --device cuda --models llama-7b --methods gptq smoothquant+w8a8 fp8 \
    --samples 64 --seq-len 512 --budget-gb 100
"$PY" -c "import torch; print(torch.cuda.get_device_name(0))"
cat bench/results/stream_scaling.md
