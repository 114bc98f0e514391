#!/usr/bin/env bash
# Issue 16's B-cos ViT-C, stage 2: 3 more epochs from the 12-epoch run of vit_fashion_mnist.sh (87.75%), a
# cosine schedule restarted at lr 1e-4 (a fifth of stage 1's peak) with a 0.1-epoch warm-up, seed 1, the
# same loss, batch and bf16 autocast. It reached 88.04% (results/vit_fashion_mnist_continued/).
# START is a local-dir model folder (model.safetensors + config.json): the 12-epoch run's exported weights,
# kept in git at commit ebfe581 (see results/vit_fashion_mnist_continued/README.md).
# Usage: bash conversion/scripts/vit_fashion_mnist_continue.sh START OUT [trainer options, e.g. --num-workers 4]
# (about 80 s per epoch on an H200, 9 min per epoch on 2 CPU cores)
set -euo pipefail
START=${1:?folder of the 12-epoch run}
OUT=${2:?output folder}
shift 2
PY=${PY:-python}
"$PY" -m timm_bcos.cli train --model "local-dir:$START" --pretrained \
    --data fashion-mnist --img-size 28 --batch-size 64 --lr-base-batch 0 --seed 1 \
    --lr 1e-4 --off-label --schedule cosine --warmup-epochs 0.1 --epochs 3 --mixed-precision bf16 --no-progress \
    --output "$OUT" "$@"
