"""`make demo`: train a small B-cos network on scikit-learn's digits and check Eq. 13 on it.

    python -m timm_bcos.demo [--steps 300] [--seed 0]

Offline, about 10 s on 2 CPU cores. Prints the test accuracy and the dynamic-linearity error
``max |sum(W(x) * x) + b - f(x)| / max |f(x) - b|`` in float32 and float64.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import load_digits
from .layers import AddInverse
from .linearity import check_dynamic_linearity
from .models import BcosSimpleNet


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_flush_denormal(True)
    encode = AddInverse()
    x_train, y_train, x_test, y_test = load_digits(size=16)
    x_train, x_test = encode(x_train), encode(x_test)
    model = BcosSimpleNet(num_classes=10, widths=(16, 16, 32, 32, 32, 64, 64, 64))
    params = sum(p.numel() for p in model.parameters())
    print(f'BcosSimpleNet: 9 B-cos conv layers (B=2, MaxOut 2), {params / 1e3:.0f}k params, '
          f'digits {len(x_train)} train / {len(x_test)} test at 16 px, 6-channel encoding')
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc='train', unit='step')
    for _ in bar:
        idx = torch.randint(0, len(x_train), (64,), generator=generator)
        loss = F.binary_cross_entropy_with_logits(model(x_train[idx]), F.one_hot(y_train[idx], 10).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(bce=f'{loss.item():.4f}')
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    err32 = check_dynamic_linearity(model, x_test[:32])
    err64 = check_dynamic_linearity(copy.deepcopy(model).double(), x_test[:32].double())
    print(f'test accuracy       {acc:.1%}  ({args.steps} steps, {train_s:.1f} s)')
    print(f'dynamic linearity   float32 {err32:.1e}   float64 {err64:.1e}   '
          f'(max |sum(W(x)*x) + b - logit| / max |logit - b|, Eq. 13)')


if __name__ == '__main__':
    main()
