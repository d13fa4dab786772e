#!/usr/bin/env bash
# GPU check, within 8 minutes on one CUDA device: the CUDA-marked tests, then both benchmarks at GPU
# sizes (bf16; FlexAttention for score-bias schemes), every output in one folder.
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: gpu_check/)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a GPU machine')" || exit 1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
export PYTHONUNBUFFERED=1
t0=$SECONDS
gpt2_small=(--device cuda --precision bf16 --layers 12 --d-model 768 --heads 12 --d-ff 3072 --vocab 50304 --batch 8 --seq 1024 --steps 8 --json)
timeout 90 python -m pytest -q -m cuda tests/ 2>&1 | tee "$out/tests_cuda.txt"
# each benchmark in two parts, so that a timeout in one (FlexAttention compiles once per score-bias scheme and
# shape) keeps the other's rows: the schemes with a transformers peer, with the peers; then the rest, next to NoPE
timeout 110 python scripts/bench_train.py "${gpt2_small[@]}" --schemes nope,learned,rope,alibi \
    > "$out/bench_train_bf16_peers.json" 2> "$out/bench_train_peers.log"
timeout 90 python scripts/bench_train.py "${gpt2_small[@]}" --no-hf \
    --schemes nope,sinusoidal,xpos,t5,shaw,kerple-log,kerple-power,fire \
    > "$out/bench_train_bf16_rest.json" 2> "$out/bench_train_rest.log"
# bench_eval runs every measurement in its own subprocess (about 40 for every scheme at 1x, 4x, 16x with peers):
# at GPU sizes within the budget, the peers' schemes at 1x and 16x, then the rest at 16x, where memory tells
eval_args=(--device cuda --dtypes bf16 --backend flex --train-len 1024 --layers 4 --d-model 256 --heads 4 --json)
timeout 90 python scripts/bench_eval.py "${eval_args[@]}" --schemes nope,rope,alibi,learned --multiples 1,16 \
    > "$out/bench_eval_flex_bf16_peers.json" 2> "$out/bench_eval_peers.log"
timeout 80 python scripts/bench_eval.py "${eval_args[@]}" --no-hf --multiples 16 \
    --schemes sinusoidal,xpos,t5,shaw,kerple-log,kerple-power,fire \
    > "$out/bench_eval_flex_bf16_rest.json" 2> "$out/bench_eval_rest.log"
echo "gpu_check: $((SECONDS - t0)) s; outputs in $out/" | tee "$out/summary.txt"
