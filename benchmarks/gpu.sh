#!/usr/bin/env bash
# The GPU checks in one prepared run (bf16 autocast, flash SDPA): trainer tokens/s and MFU for
# the paper's 300m config, then model throughput against transformers. Run from the repository
# root on a CUDA machine with delvm installed:  bash benchmarks/gpu.sh
# PEAK_TFLOPS: the device's dense bf16 peak (H100/H200 SXM: 989).
set -euo pipefail
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python benchmarks/train_throughput.py --device cuda --preset 300m --seq-len 2048 \
    --micro-batch 8 --repeats 5 --peak-tflops "$PEAK_TFLOPS"
python benchmarks/model_throughput.py --device cuda --batches 1 8
