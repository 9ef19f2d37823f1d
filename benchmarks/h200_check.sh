#!/usr/bin/env bash
# The GPU part of issue 5 as one prepared command, for a session that is lent an H200 (it has not run yet: no task
# so far was lent one). From the repository root, on the GPU machine:
#
#     bash benchmarks/h200_check.sh [inference] [train] [finetune]      # default: all three, in that order
#
# Results (tables, JSON, logs) go to $OUT (the device tool's return folder), else ./gpu-results. Each part prints
# its table as it finishes, so a part cut short by a time limit still leaves the earlier ones.
#   inference  bench_inference.py --device cuda: bf16, batch 8 / 64 / 256, eager and compiled, sdpa attention
#   train      bench_train.py --device cuda: ViT-B/16 at 224 px, batch 128, bf16 weights and bf16 autocast, compiled
#   finetune   examples/finetune.py under accelerate: ViT-B/16 from scratch at 224 px, bf16 mixed precision, the real
#              input pipeline (datasets, the image processor, on-device augmentation), 60 steps of 128: its
#              train_samples_per_second is the fine-tune step rate
# The machine's image has torch, transformers and accelerate but not `datasets` or `evaluate`, which finetune needs:
# download their wheels (and their missing dependencies, e.g. dill, multiprocess) here into .whl/ as the device
# README says, carry .whl, and this script installs them into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(inference train finetune)
for part in "${parts[@]}"; do
    case $part in
    inference | train | finetune) ;;
    *)
        echo "error: unknown part '$part': choose from inference, train, finetune" >&2
        exit 2
        ;;
    esac
done
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
out=${OUT:-gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" |
    tee -a "$out/gpu.txt"
status=0
for part in "${parts[@]}"; do
    case $part in
    inference)
        python3 benchmarks/bench_inference.py --device cuda --dtypes bf16 --batch-sizes 8 64 256 --rounds 5 \
            --json "$out/inference.json" 2>&1 | tee "$out/inference.txt" || status=1
        ;;
    train)
        python3 benchmarks/bench_train.py --device cuda --shapes 224x128 --precisions bf16 autocast --compile \
            --rounds 5 --json "$out/train.json" 2>&1 | tee "$out/train.txt" || status=1
        ;;
    finetune)
        python3 -m accelerate.commands.launch --num_processes 1 --mixed_precision bf16 examples/finetune.py \
            --config_name ViT-B_16 --dataset_name digits --image_size 224 --total_batch_size 128 \
            --per_device_train_batch_size 128 --max_train_steps 60 --num_warmup_steps 10 --learning_rate 0.03 \
            --dataloader_num_workers 8 --mixed_precision bf16 --output_dir /tmp/finetune-h200 \
            2>&1 | tee "$out/finetune.txt" || status=1
        cp /tmp/finetune-h200/all_results.json "$out/finetune_results.json" 2>/dev/null || status=1
        ;;
    esac
done
exit $status
