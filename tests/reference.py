"""An independent, plain-autograd B-cos convolution (unfold-based) used as a test oracle.

It shares nothing with the fused implementation: patches come from `F.unfold` on the explicitly
padded input, so padding modes, dilation, stride and groups are checked against the definition
(Eq. 3, 9, 17) rather than against another implementation of the same tricks.
"""
import torch
import torch.nn.functional as F

from timm_bcos.layers.bcos_geometry import NORM_EPS


def naive_bcos_conv2d(x: torch.Tensor, layer, detach: bool = False) -> torch.Tensor:
    kh, kw = layer.kernel_size
    if layer.padding == 'same':
        th, tw = layer.dilation[0] * (kh - 1), layer.dilation[1] * (kw - 1)
        pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    elif layer.padding == 'valid':
        pad = (0, 0, 0, 0)
    else:
        ph, pw = layer.padding
        pad = (pw, pw, ph, ph)
    mode = 'constant' if layer.padding_mode == 'zeros' else layer.padding_mode
    xp = F.pad(x, pad, mode=mode)
    n = x.shape[0]
    g, m = layer.groups, layer.max_out
    patches = F.unfold(xp, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
    patches = patches.view(n, g, -1, patches.shape[-1])  # (N, G, Cg*kh*kw, L)
    w = layer.weight.flatten(1)
    w = w / w.norm(dim=1, keepdim=True)
    w = w.view(g, m, -1, w.shape[-1])  # (G, M, Og, D): our unit layout
    lin = torch.einsum('gmod,ngdl->ngmol', w, patches)
    sel = lin.max(dim=2).values  # (N, G, Og, L)
    norm = (patches.square().sum(2, keepdim=True) + NORM_EPS).sqrt()  # (N, G, 1, L)
    dyn = (sel / norm).abs().pow(layer.b - 1) / layer.scale
    if detach:
        dyn = dyn.detach()
    out = sel * dyn
    h_out = (xp.shape[2] - layer.dilation[0] * (kh - 1) - 1) // layer.stride[0] + 1
    w_out = (xp.shape[3] - layer.dilation[1] * (kw - 1) - 1) // layer.stride[1] + 1
    return out.reshape(n, -1, h_out, w_out)
