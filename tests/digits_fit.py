"""Train a model on scikit-learn's digits for a few steps: the trainability tests' shared loop."""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import timm_bcos


def fit_digits(model: nn.Module, size: int, steps: int, batch: int) -> Tuple[List[float], float]:
    """Adam at lr 1e-3, BCE on one-hot targets (Eq. 16), seeded batches of the [x, 1-x] encoded
    digits at `size` px. Returns the loss of every step and the test accuracy afterwards."""
    x_train, y_train, x_test, y_test = timm_bcos.data.load_digits(size=size)
    encode = timm_bcos.AddInverse()
    x_train, x_test = encode(x_train), encode(x_test)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (batch,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(model(x_train[idx]), F.one_hot(y_train[idx], 10).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        acc = (model.eval()(x_test).argmax(1) == y_test).float().mean().item()
    return losses, acc
