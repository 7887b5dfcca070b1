#!/usr/bin/env bash
# The GPU checks in one prepared run (bf16, flash SDPA): trainer tokens/s and MFU for the paper's
# 300m config, model throughput against transformers, then prompting: a task evaluation with and
# without the shared-prefix cache, and the wall time of a 1,000-query Pascal-5i-shaped evaluation
# with 16 queries per support pair (and of 100 queries with a pair each, Bar et al.'s protocol:
# one batch-1 generation per query), and tokens/s of the eager, static and compiled (CUDA graph)
# decoding steps at batch 1 and 8 on the 300m shape; last, speculative decoding: a toy-world
# teacher and its distilled student trained on the GPU (a few minutes), the teacher's tokens/s
# alone and with the student drafting. Run from the repository root on a CUDA machine with
# delvm installed:  bash benchmarks/gpu.sh
# PEAK_TFLOPS: the device's dense bf16 peak (H100/H200 SXM: 989).
set -euo pipefail
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python benchmarks/train_throughput.py --device cuda --preset 300m --seq-len 2048 \
    --micro-batch 8 --repeats 5 --peak-tflops "$PEAK_TFLOPS"
python benchmarks/model_throughput.py --device cuda --batches 1 8
python benchmarks/prompting_speed.py prefix --device cuda --hidden 1024 --layers 22
python benchmarks/prompting_speed.py pascal --device cuda --queries 1000 --per-prompt 16
python benchmarks/prompting_speed.py pascal --device cuda --queries 100 --per-prompt 1
python benchmarks/prompting_speed.py compile --device cuda --hidden 1024 --layers 22
python benchmarks/prompting_speed.py draft --device cuda --work "${DRAFT_WORK:-/tmp/draftwork}" \
    --steps 1000 --draft-steps 300 --draft-tokens 2 4 6 --thresholds 0 0.5 --compile --repeats 2
