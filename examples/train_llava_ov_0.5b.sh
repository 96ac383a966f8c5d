#!/usr/bin/env bash
# VISOR on LLaVA-OneVision 0.5B: the paper's recipe, end to end, for a machine with GPUs.
#
#   convert -> stage 1 (new modules, LLaVA-OV frozen) -> stage 2 (everything) -> configuration search
#   -> universal fine-tuning -> pseudo-labels -> router -> evaluation
#
# Every training step runs on the Hugging Face Trainer under `accelerate launch` (or `torchrun`): multi-GPU and
# multi-node, bf16, gradient accumulation, checkpoints every --save-steps and resumption with
# `--resume-from-checkpoint latest`. See docs/training.md for what each step does and writes.
#
# Data: LLaVA-style records, one JSON object per line (or a JSON list, or a `datasets.save_to_disk` folder):
#   {"image": "coco/train2017/000000033471.jpg",
#    "conversations": [{"from": "human", "value": "<image>\nWhat colour is the bus?"}, {"from": "gpt", "value": "Red."}]}
# Relative image paths are resolved against --image-root (default: the folder of the data file).
#   STAGE1_DATA  ~4M "knowledge" samples (e.g. LLaVA-OneVision's single-image stage-1.5 mix)
#   STAGE2_DATA  ~3.2M instruction samples (e.g. LLaVA-OneVision's SI / OV instruction mix)
#   SEARCH_DATA  a held-out set with short exact answers (a few thousand samples from the target benchmarks' train
#                or dev splits: VQAv2, GQA, DocVQA, ChartQA, ...), used by search and evaluation; each record's
#                `source` names its benchmark (the search keeps what is viable on at least one of them)
#   EVAL_DATA    the evaluation set
#
# Global batch 128 = NUM_GPUS x PER_DEVICE x ACCUM (8 x 4 x 4 by default); AdamW, no weight decay (paper).
# Usage: STAGE1_DATA=... STAGE2_DATA=... SEARCH_DATA=... EVAL_DATA=... bash examples/train_llava_ov_0.5b.sh
# CPU dry run of the same commands on a tiny model (what docs/training.md shows):
#   SOURCE=tiny-llava NUM_GPUS=1 PER_DEVICE=4 ACCUM=1 LAUNCH="python -m visor_hf.cli" PRECISION=--use-cpu \
#   REPORT_TO=none WORKERS=0 UNIVERSAL_STEPS=4 STAGE1_DATA=d.jsonl STAGE2_DATA=d.jsonl SEARCH_DATA=d.jsonl bash ...
set -euo pipefail

: "${STAGE1_DATA:?set STAGE1_DATA to the stage-1 records (.jsonl)}"
: "${STAGE2_DATA:?set STAGE2_DATA to the stage-2 records (.jsonl)}"
: "${SEARCH_DATA:?set SEARCH_DATA to the held-out search records (.jsonl)}"
: "${EVAL_DATA:=$SEARCH_DATA}"
IMAGE_ROOT=${IMAGE_ROOT:-}                 # folder of the relative image paths (optional)
WORK=${WORK:-runs/visor-llava-ov-0.5b}
NUM_GPUS=${NUM_GPUS:-8}
PER_DEVICE=${PER_DEVICE:-4}
ACCUM=${ACCUM:-$((128 / (NUM_GPUS * PER_DEVICE)))}
SOURCE=${SOURCE:-llava-hf/llava-onevision-qwen2-0.5b-ov-hf}
PRECISION=${PRECISION:---bf16}             # --fp16 on GPUs without bfloat16; --use-cpu for a CPU dry run
REPORT_TO=${REPORT_TO:-tensorboard}
WORKERS=${WORKERS:-8}
UNIVERSAL_STEPS=${UNIVERSAL_STEPS:-5000}
LABEL_SAMPLES=${LABEL_SAMPLES:-50000}

# Multi-node: add --num_machines, --machine_rank, --main_process_ip, --main_process_port (or use torchrun:
# LAUNCH="torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m visor_hf.cli").
LAUNCH=${LAUNCH:-"accelerate launch --num_processes ${NUM_GPUS} -m visor_hf.cli"}
ROOT_ARG=()
[[ -n "$IMAGE_ROOT" ]] && ROOT_ARG=(--image-root "$IMAGE_ROOT")
COMMON=("$PRECISION" --activation-checkpointing --per-device-train-batch-size "$PER_DEVICE" --gradient-accumulation-steps "$ACCUM"
        --weight-decay 0 --lr-scheduler-type cosine --warmup-steps 0.03 --logging-steps 10 --save-steps 1000
        --save-total-limit 2 --dataloader-num-workers "$WORKERS" --report-to "$REPORT_TO" "${ROOT_ARG[@]}")

mkdir -p "$WORK"

# A step whose output folder holds config.json has finished (the final model is written last) and is skipped;
# an interrupted training step resumes from its newest checkpoint-N.
finished() { [[ -f "$1/config.json" ]]; }
resume() { compgen -G "$1/checkpoint-*" > /dev/null && echo "--resume-from-checkpoint latest" || true; }

# 0. Convert LLaVA-OV 0.5B (24 layers): |CA| = |SA| = 8 spread uniformly, nested default configurations, router
#    just before the first switchable SA layer, routing token added to the tokenizer.
finished "$WORK/converted" || visor-hf convert "$SOURCE" "$WORK/converted" --dtype bfloat16

# 1. Stage 1: LLaVA-OV weights frozen, the CA blocks (and their position convolutions) train; maximal configuration.
finished "$WORK/stage1" || $LAUNCH train --stage 1 --model "$WORK/converted" --data "$STAGE1_DATA" \
  --output-dir "$WORK/stage1" --learning-rate 1e-4 --num-train-epochs 1 "${COMMON[@]}" $(resume "$WORK/stage1")

# 2. Stage 2: the whole model (vision tower frozen; add --train-vision-tower to train it, or --lora for adapters).
finished "$WORK/stage2" || $LAUNCH train --stage 2 --model "$WORK/stage1" --data "$STAGE2_DATA" \
  --output-dir "$WORK/stage2" --learning-rate 1e-5 --num-train-epochs 1 "${COMMON[@]}" $(resume "$WORK/stage2")

# 3. Configuration search on held-out data: 8 switchable SA layers -> exhaustive (256 subsets) by default;
#    viable when within 1 % of the maximal configuration's accuracy on at least one benchmark (`source`); each
#    benchmark's cheapest viable subset and the maximal one are kept (at most 8); the router layer is recomputed.
finished "$WORK/searched" || $LAUNCH search --model "$WORK/stage2" --data "$SEARCH_DATA" --output-dir "$WORK/searched" \
  --rule group --group-field source --threshold 0.01 --max-configurations 8 --batch-size 8 "${ROOT_ARG[@]}"

# 4. Universal fine-tuning: one viable configuration per optimisation step, the same on every rank.
finished "$WORK/universal" || $LAUNCH train --stage universal --model "$WORK/searched" --data "$STAGE2_DATA" \
  --output-dir "$WORK/universal" --learning-rate 5e-6 --max-steps "$UNIVERSAL_STEPS" --seed 0 "${COMMON[@]}" $(resume "$WORK/universal")

# 5. Pseudo-labels: every configuration on a 50k-sample training subset (inspect pseudo_label_table.jsonl).
[[ -f "$WORK/labels/pseudo_labels.jsonl" ]] || $LAUNCH label --model "$WORK/universal" --data "$STAGE2_DATA" --limit "$LABEL_SAMPLES" --output-dir "$WORK/labels" \
  --keep 0.99 --batch-size 8 "${ROOT_ARG[@]}"

# 6. Router: the calibrated head (per configuration, the probability of keeping the maximal configuration's answer;
#    binary cross-entropy on the labels' targets), everything else frozen; the report compares with always-max.
finished "$WORK/final" || $LAUNCH train-router --model "$WORK/universal" --data "$STAGE2_DATA" --labels "$WORK/labels" \
  --router-type calibrated --router-threshold 0.97 \
  --output-dir "$WORK/final" --learning-rate 1e-3 --num-train-epochs 1 --per-device-train-batch-size 16 \
  "$PRECISION" --logging-steps 10 --report-to "$REPORT_TO" "${ROOT_ARG[@]}"

# 7. Evaluation: the router against fixed configurations (accuracy, average FLOPs, configuration histogram).
for configuration in auto max 0; do
  $LAUNCH evaluate --model "$WORK/final" --data "$EVAL_DATA" --configuration "$configuration" \
    --output-dir "$WORK/eval-$configuration" "${ROOT_ARG[@]}"
done
# 8. The router's accuracy-vs-FLOPs curve over thresholds, fixed configurations as points (curve.md, curve.png):
#    choose the threshold from it (`visor_router_threshold=` per call, or `router_threshold` in the config).
$LAUNCH evaluate --model "$WORK/final" --data "$EVAL_DATA" --curve --output-dir "$WORK/curve" "${ROOT_ARG[@]}"
echo "done: $WORK/final (router report: $WORK/final/router_report.json, curve: $WORK/curve/curve.md)"
