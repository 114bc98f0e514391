#!/usr/bin/env bash
# Issue 15's experiment: does B-cosifying a trained conventional network beat training the same
# B-cos architecture from scratch? Fashion-MNIST at 32 px, timm resnet18 (num_classes=10), CPU,
# all runs on the same fixed random 20,000 training images, batch 256, 2 cores.
#   conventional       resnet18, cross entropy, Adam lr 1e-3 cosine, 30 epochs (to convergence)
#   scratch            the B-cos architecture (timm_bcos.bcosify defaults) from random weights,
#                      12 epochs of `timm-bcos train --bcosify`'s recipe (B-cosification's: BCE with
#                      1/C off-targets, Adam lr 1e-4, cosine)
#   bcosified          the same architecture and recipe from the conventional weights
#   scratch_lr1e-3     the from-scratch run with lr 1e-3 and 0 off-targets (a from-scratch recipe)
# Then conversion/scripts/bcosify_fashion_mnist_report.py evaluates and plots.
# Usage: bash conversion/scripts/bcosify_fashion_mnist.sh OUT   (about 80 min on 2 cores)
set -euo pipefail
OUT=${1:?output folder}
PY=${PY:-python}
COMMON=(--data fashion-mnist --img-size 32 --train-subset 20000 --batch-size 256 --seed 0 --no-progress)
train() { "$PY" -m timm_bcos.cli train "${COMMON[@]}" "$@"; }

# two runs at a time, one core each; bcosified needs the conventional weights
OMP_NUM_THREADS=1 train --model resnet18 --loss ce --lr 1e-3 --schedule cosine --epochs 30 \
    --output "$OUT/conventional" > "$OUT/conventional.log" 2>&1 &
OMP_NUM_THREADS=1 train --model resnet18 --bcosify --lr 1e-3 --off-label false --epochs 12 \
    --output "$OUT/scratch_lr1e-3" > "$OUT/scratch_lr1e-3.log" 2>&1 &
wait
OMP_NUM_THREADS=1 train --model resnet18 --bcosify --epochs 12 --output "$OUT/scratch" > "$OUT/scratch.log" 2>&1 &
OMP_NUM_THREADS=1 train --model "local-dir:$OUT/conventional" --pretrained --bcosify --epochs 12 \
    --output "$OUT/bcosified" > "$OUT/bcosified.log" 2>&1 &
wait
