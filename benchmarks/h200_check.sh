#!/usr/bin/env bash
# The GPU checks (inference, training, fine-tuning speed, the shipped accelerate configs) as one prepared command,
# for a session that is lent an H200 (it has not run yet: no task so far was lent one). From the repository root, on the GPU machine:
#
#     bash benchmarks/h200_check.sh [inference] [train] [finetune] [configs]   # default: all four, in that order
#
# Results (tables, JSON, logs) go to $OUT (the device tool's return folder), else ./gpu-results. Each part prints
# its table as it finishes, so a part cut short by a time limit still leaves the earlier ones.
#   inference  bench_inference.py --device cuda: bf16, batch 8 / 64 / 256, eager and compiled, sdpa attention
#   train      bench_train.py --device cuda: ViT-B/16 at 224 px, batch 128, bf16 weights and bf16 autocast, compiled
#   finetune   bench_finetune.py --device cuda: the real examples/finetune.py under accelerate, ViT-B/16 at 224 px,
#              512 images a step, bf16, torch.compile off and on, on synthetic CIFAR-like data (no network there):
#              steady img/s, % of the bf16 matmul peak, loader alone, projected 500- and 10,000-step recipe times
#   configs    each examples/accelerate_configs file launches finetune.py for a few steps on the visible GPUs
#              (multi-node as two local "machines" when there are 2+ GPUs; DeepSpeed when it is installed)
# The machine's image has torch, transformers and accelerate but not `datasets` or `evaluate`, which finetune needs:
# download their wheels (and their missing dependencies, e.g. dill, multiprocess) here into .whl/ as the device
# README says, carry .whl, and this script installs them into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(inference train finetune configs)
for part in "${parts[@]}"; do
    case $part in
    inference | train | finetune | configs) ;;
    *)
        echo "error: unknown part '$part': choose from inference, train, finetune, configs" >&2
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
        python3 benchmarks/bench_finetune.py --device cuda --json "$out/finetune.json" 2>&1 | tee "$out/finetune.txt" ||
            status=1
        ;;
    configs)
        gpus=$(nvidia-smi -L | wc -l)
        quick=(--config_name ViT-B_16 --dataset_name digits --image_size 224 --total_batch_size 64 --max_train_steps 4
            --num_warmup_steps 1 --eval_steps 4 --checkpointing_steps 2 --max_eval_samples 64)
        for name in multi_gpu fsdp deepspeed_zero2 multi_node; do
            config=examples/accelerate_configs/$name.yaml
            if [ $name = deepspeed_zero2 ] && ! python3 -c "import deepspeed" 2>/dev/null; then
                echo "configs: $name skipped: deepspeed is not installed" | tee -a "$out/configs.txt"
                continue
            fi
            if [ $name = multi_node ]; then
                if [ "$gpus" -lt 2 ]; then
                    echo "configs: $name skipped: 2 local machines need 2 GPUs, $gpus visible" | tee -a "$out/configs.txt"
                    continue
                fi
                pids=()
                for rank in 0 1; do
                    CUDA_VISIBLE_DEVICES=$rank python3 -m accelerate.commands.launch -q --config_file "$config" \
                        --num_processes 2 --machine_rank $rank --main_process_ip 127.0.0.1 --main_process_port 29555 \
                        examples/finetune.py "${quick[@]}" --output_dir /tmp/config-$name >"$out/config-$name-$rank.txt" 2>&1 &
                    pids+=($!)
                done
                wait "${pids[0]}" && wait "${pids[1]}" && result=ok || result=FAILED
            else
                python3 -m accelerate.commands.launch -q --config_file "$config" --num_processes "$gpus" \
                    examples/finetune.py "${quick[@]}" --output_dir /tmp/config-$name >"$out/config-$name.txt" 2>&1 &&
                    result=ok || result=FAILED
            fi
            echo "configs: $name $result" | tee -a "$out/configs.txt"
            [ $result = ok ] || status=1
        done
        ;;
    esac
done
exit $status
