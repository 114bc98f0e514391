#!/usr/bin/env bash
# Issue 16's B-cos ViT: timm's VisionTransformer at ViT-Tiny size (dim 192, depth 12, 3 heads), patch 4
# on Fashion-MNIST's 28 px images (49 patch tokens + the class token), converted by convert_to_bcos
# (`bcos_vit_tiny_patch16_224`) with B-cos v2's ViT design: MaxOut 1, LayerNorm bias-free with its
# scale detached when explaining (norm='bnu'); positional embedding and class token are explained
# constants. Recipe: the project's trainer, BCE, Adam lr 1e-3 (B-cos v2's ViT lr), 1 warm-up epoch,
# cosine, batch 256, on the fixed random 20,000 training images of the B-cosification experiment.
# Usage: bash conversion/scripts/vit_fashion_mnist.sh OUT [--resume]   (about 20 min per epoch on one core)
set -euo pipefail
OUT=${1:?output folder}
shift
PY=${PY:-python}
"$PY" -m timm_bcos.cli train --model bcos_vit_tiny_patch16_224 \
    --model-kwargs img_size=28 patch_size=4 max_out=1 norm='"bnu"' \
    --data fashion-mnist --img-size 28 --train-subset 20000 --batch-size 256 --seed 0 \
    --lr 1e-3 --schedule cosine --warmup-epochs 1 --epochs 10 --no-progress --output "$OUT" "$@"
