#!/usr/bin/env bash
# The GPU checks of issues 13 and 14, as commands for a lent GPU machine (benchmarks/README, "GPU check").
# Prepare here: `python benchmarks/gpu_check.py prepare --assets .gpucheck` (tokenizer + image processor) and
# `python benchmarks/gpu_check.py pack-faiss --out .devpay` (faiss-gpu in pieces of at most 34 MB).
#
#   bash benchmarks/gpu_run.sh moon OUT            MOON encoding and training steps, as built and with speed variants
#   bash benchmarks/gpu_run.sh actors OUT          1 vs 2 encoder processes sharing the GPU
#   bash benchmarks/gpu_run.sh faiss OUT PART...   faiss-gpu at 10M against the CPU build (PART: the pieces)
#   bash benchmarks/gpu_run.sh build OUT PART...   moonsearch's own GPU index builds: their gpu tests, then
#                                                  `moonsearch index --vectors` at 2M on the GPU and the CPU
set -u
stage=$1
out=$2
shift 2
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case $stage in
moon)
    # the library as built (token-sorted MoE), then sets of speed changes, each from the model as built;
    # pad+looped-moe is the MoE dispatch of before 2026-11-27 with the rest unchanged (the A/B)
    timeout 280 python3 benchmarks/gpu_check.py run --assets .gpucheck --out "$out" --skip faiss \
        --train-batch 8 --train-batch 16 --variant pad --variant pad+looped-moe --variant pad+compile-vision \
        --variant pad+compile --variant-deadline 190 2>&1 | grep -v -i warn | tee "$out/moon.log" | tail -40
    ;;
actors)
    timeout 120 python3 benchmarks/gpu_check.py actors --assets .gpucheck --out "$out" --actors 1 --actors 2 \
        --variant pad 2>&1 | grep -v -i warn | tail -20
    ;;
faiss)
    for part in "$@"; do [ -f "$part" ] || { echo "missing piece $part"; exit 1; }; done
    source benchmarks/gpu_shim/setup.sh "$@" || exit 1
    export CUDA_CACHE_MAXSIZE=4294967296
    python3 -c "import faiss; print('faiss', faiss.__version__, 'GPUs seen:', faiss.get_num_gpus())" || exit 1
    timeout 330 python3 benchmarks/gpu_check.py run --assets .gpucheck --out "$out" --skip moon --cpu-deadline 240 \
        2>&1 | grep -v -i warn | tee "$out/faiss.log" | tail -60
    ;;
build)
    for part in "$@"; do [ -f "$part" ] || { echo "missing piece $part"; exit 1; }; done
    source benchmarks/gpu_shim/setup.sh "$@" || exit 1
    timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "ivfpq or streaming or 1792" 2>&1 \
        | tail -15
    timeout 320 python3 benchmarks/gpu_check.py stream --out "$out" --n 1000000 --queries 300 --cpu-deadline 200 \
        2>&1 | grep -v -i warn | tee "$out/stream.log" | tail -40
    ;;
*)
    echo "usage: gpu_run.sh moon|actors|faiss|build OUT [PART...]"
    exit 2
    ;;
esac
