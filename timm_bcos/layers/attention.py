"""Dynamic linear attention (B-cos v2's design for ViTs, paper §3.2.1).

``softmax(q kᵀ / √d + bias) v`` is linear in ``v`` for a fixed attention matrix. With the query
and key detached in explanation mode, the attention matrix is a constant of the backward pass, so
attention is an input-dependent linear map of ``v`` (like a gate's product, Eq. 13) and the fused
kernel still runs.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .explain_mode import DetachableModule

__all__ = ['DynamicAttention']


class DynamicAttention(DetachableModule):
    """``F.scaled_dot_product_attention`` with the attention matrix detached in explanation mode.

    The query, key and an attention mask (a relative-position bias, which may depend on the input)
    only set the weights of the linear map applied to ``v``: detached when explaining, the output
    stays part of ``W(x) x`` (Eq. 13) and the forward values are unchanged.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs) -> Tensor:
        if self.detach_dynamic:
            query, key = query.detach(), key.detach()
            args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            kwargs = {k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        return F.scaled_dot_product_attention(query, key, value, *args, **kwargs)
