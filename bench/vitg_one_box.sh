#!/usr/bin/env bash
# ViT-g pre-training on this one box through the product (bench/vitg_one_box.py): the plain fp32
# forward + backward yardstick, then `scaling pretrain --config pipelines/vitg_one_box.yaml` on 2
# CPU ranks (ZeRO-3, optimizer on NVMe), a save after every step, kill -9 inside the last save, a
# resume and the last step again. Writes bench/results/vitg_one_box_pretrain.json.
#
#   bench/vitg_one_box.sh                  # ViT-g (needs ~20 GB available; waits up to 20 min for it)
#   bench/vitg_one_box.sh --model vit_b --out /tmp/one_box_vit_b.json --need-gb 6   # the set-up, quickly
#
# bench/one_box.py is the engine alone (bench/zero_steps.py, no save), with the RSS of each phase.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -e /usr/include/libaio.h ] || { echo "libaio-dev is missing (apt-get install libaio-dev): DeepSpeed's async_io op cannot build"; exit 1; }
exec .venv/bin/python bench/vitg_one_box.py "$@"
