#!/usr/bin/env bash
# ViT-g on this one box: two real pre-training steps of the real ViT-g pre-training model
# (1026 M params, 16x224, dual masking, 1 clip per rank, activation checkpointing) on 2 CPU
# ranks, ZeRO-3 + bf16 with the optimizer states on NVMe (ds_configs/zero3_nvme_offload.json,
# swap files in a fresh folder under /tmp, deleted afterwards). Writes and prints
# bench/results/vitg_one_box.json: step times, peak RSS per rank, lowest available memory.
#
#   bench/vitg_one_box.sh                 # ViT-g (needs ~19 GB available; waits up to 20 min for it)
#   MODEL=vit_b bench/vitg_one_box.sh     # the same run at ViT-B size, to check the set-up quickly
#
# Why bench/zero_steps.py and not `scaling pretrain` (which takes this ds_config unchanged via
# train.ds_config=...): the ranks record their own peak RSS after each phase (build, engine
# set-up, each step), and no checkpoint is written — `scaling pretrain` always saves after the
# last step, which for ViT-g copies ~15 GB of NVMe swap files into the checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-vit_g}
if [ "$MODEL" = vit_g ]; then OUT=${OUT:-bench/results/vitg_one_box.json}; NEED=${NEED_GB:-19}
else OUT=${OUT:-/tmp/one_box_${MODEL}.json}; NEED=${NEED_GB:-6}; fi
[ -e /usr/include/libaio.h ] || { echo "libaio-dev is missing (apt-get install libaio-dev): DeepSpeed's async_io op cannot build"; exit 1; }
exec .venv/bin/python bench/one_box.py --model "$MODEL" --out "$OUT" --need-gb "$NEED" "$@"
