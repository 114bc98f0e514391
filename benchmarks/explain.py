"""Speed of batched `timm_bcos.explain` against a forward pass and the `bcos` package's `explain()`.

For a model (default ``bcos_resnet18`` at 128 px) and a batch of 32, prints the time of `explain`
with 1 target and with the top 5 (k=5) as a ratio to one no-grad eval forward pass, and the time
of B-cos v2's ``BcosUtilMixin.explain()`` (batch size 1, one target per call: a loop of N
forward+backward passes per target) run on the same model, wrapped with their mixin; once as
their users run it (parameters trainable, so our fused layers also compute weight gradients) and
once with the parameters frozen, as `explain` does. ``--reference-own`` also times their explain()
on their own resnet18 (``bcos.models.pretrained.resnet18``, the v2 design: MaxOut 1, uncentered BN).

``--profile``: where explain(k=1)'s and explain(k=5)'s time goes (torch.profiler): convolutions
forward and backward against everything else, k=5 / k=1 for each, and what a target past the first costs.

    python benchmarks/explain.py [--model bcos_resnet18] [--size 128] [--batch 32] [--reps 5] [--compile] [--profile]
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

import timm

from timm_bcos import AddInverse, DetachableModule
from timm_bcos.explain import explain

from _timing import benchmark_parser, conv_split, interleaved_medians, median_time, set_up  # benchmarks/_timing.py

with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    from bcos.common import BcosUtilMixin


class TheirMixin(BcosUtilMixin, nn.Module):
    """Our model behind B-cos v2's mixin. Their explanation mode calls ``set_explanation_mode`` on
    every module that has it; ours use `DetachableModule.detach_dynamic`, so this forwards it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def set_explanation_mode(self, active: bool) -> None:
        for m in self.net.modules():
            if isinstance(m, DetachableModule):
                m.detach_dynamic = active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main(argv=None) -> None:
    parser = benchmark_parser(__doc__, reps=5, batch=32, size=128, model='bcos_resnet18')
    parser.add_argument('--reference-own', action='store_true', help="also time bcos's own resnet18")
    parser.add_argument('--compile', action='store_true',
                        help='also time torch.compile(fullgraph=True): explain of the compiled model against its '
                             'compiled no-grad forward')
    parser.add_argument('--profile', action='store_true', help="profile explain(k=1) and explain(k=5): the "
                        "convolutions' share")
    args = parser.parse_args(argv)
    set_up(args.threads)

    model = timm.create_model(args.model).eval()
    theirs = TheirMixin(model).eval()
    x = AddInverse()(torch.rand(args.batch, 3, args.size, args.size))
    n = len(x)

    def forward():
        with torch.no_grad():
            model(x)

    def their_explain(k: int, frozen: bool = False):
        def run():
            model.requires_grad_(not frozen)  # trainable: our layers' backward also computes weight grads
            for i in range(n):
                xi = x[i:i + 1].clone().requires_grad_(True)
                if k == 1:
                    theirs.explain(xi)
                else:
                    for c in top5[i, :k].tolist():
                        xi.grad = None
                        theirs.explain(xi, idx=c)
            model.requires_grad_(True)
        return run

    # Same numbers on both sides: their contribution map of image 0 equals ours. (The untrained
    # net's outputs are tiny next to the logit bias; the maps are compared relative to their size.)
    ours = explain(model, x, k=5)
    top5 = ours.targets
    ref = theirs.explain(x[:1].clone().requires_grad_(True), idx=int(top5[0, 0]))['contribution_map'][0]
    error = ((ref - ours.contributions[0, 0]).abs().max() / ref.abs().max()).item()
    assert error < 1e-4, f'bcos explain() and timm_bcos explain differ by {error:.1e}'

    slow_reps = max(1, args.reps // 4)
    t = interleaved_medians({  # round-robin: a shared machine's slow spells hit all three alike
        'no-grad eval forward': forward,
        'timm_bcos explain, 1 target': lambda: explain(model, x),
        'timm_bcos explain, k=5': lambda: explain(model, x, k=5),
    }, args.reps)
    t.update({
        'bcos explain() per image, 1 target': median_time(their_explain(1), slow_reps),
        'bcos explain() per image, 5 targets': median_time(their_explain(5), slow_reps),
        'same, 1 target, parameters frozen': median_time(their_explain(1, frozen=True), slow_reps),
    })
    if args.reference_own:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            from bcos.models.pretrained import resnet18
        own = resnet18(pretrained=False).eval()

        def own_explain():
            for i in range(n):
                own.explain(x[i:i + 1].clone().requires_grad_(True))
        t["bcos explain() per image on bcos's resnet18"] = median_time(own_explain, slow_reps)
    ours_for = {'bcos explain() per image, 1 target': 'timm_bcos explain, 1 target',
                "bcos explain() per image on bcos's resnet18": 'timm_bcos explain, 1 target',
                'same, 1 target, parameters frozen': 'timm_bcos explain, 1 target',
                'bcos explain() per image, 5 targets': 'timm_bcos explain, k=5'}
    fwd = t['no-grad eval forward']
    print(f'{args.model}, {args.size} px, N={n}, float32, '
          f'{args.threads} threads, median of {args.reps} ({slow_reps} for bcos)')
    print(f'{"":38s}{"ms/batch":>10s}{"x forward":>11s}{"x timm_bcos":>13s}')
    for name, seconds in t.items():
        vs_ours = f'{seconds / t[ours_for[name]]:13.1f}' if name in ours_for else ''
        print(f'{name:38s}{seconds * 1e3:10.1f}{seconds / fwd:11.2f}{vs_ours}')
    print('bcos explain() also renders its RGBA image (15x15 smoothing) each call; timm_bcos does not '
          '(Explanation.to_rgba on demand).')
    if args.profile:
        _profile(model, x)
    if args.compile:
        _compiled(model, x, args.reps, args.profile)


def _profile(model: nn.Module, x: torch.Tensor) -> None:
    """Self CPU time of explain(k=1) and explain(k=5) split into convolution forward, convolution
    backward (the input gradients: one pass per target) and the rest; k=5 / k=1 for each part; and
    what each target past the first costs, ``(k=5 - k=1) / 4``, against the rest of explain(k=1): top-5
    stays within 3x top-1 while an extra target costs no more than that rest (the forward, mostly)."""
    parts = {k: conv_split(lambda k=k: explain(model, x, k=k)) for k in (1, 5)}
    for k in parts:
        parts[k]['total'] = sum(parts[k].values())
        parts[k]['convolutions alone'] = parts[k]['conv forward'] + parts[k]['conv backward']
    print(f'profile of explain (self CPU ms){"k=1":>12s}{"k=5":>10s}{"k=5/k=1":>10s}{"extra target":>14s}')
    for kind in parts[1]:
        one, five = parts[1][kind], parts[5][kind]
        print(f'{kind:31s}{one:12.0f}{five:10.0f}{five / one:10.2f}{(five - one) / 4:14.0f}')
    extra = (parts[5]['total'] - parts[1]['total']) / 4
    print(f'a target past the first: {extra:.0f} ms; explain(k=1) less one target: {parts[1]["total"] - extra:.0f} ms '
          '(top-5 <= 3x top-1 needs the first <= the second)')


def _compiled(model: nn.Module, x: torch.Tensor, reps: int, profile: bool = False) -> None:
    """explain() of ``torch.compile(model, fullgraph=True)`` against its compiled no-grad forward
    (compile time excluded: the warm-up call of each measurement compiles its graph). With
    `profile`: the convolutions' self CPU time in each, and explain's convolutions alone as a
    multiple of the whole compiled forward: the floor of the ratio on this machine."""
    compiled = torch.compile(model, fullgraph=True)

    def forward():
        with torch.no_grad():
            compiled(x)

    t = interleaved_medians({'compiled no-grad eval forward': forward,
                             'compiled explain, 1 target': lambda: explain(compiled, x),
                             'compiled explain, k=5': lambda: explain(compiled, x, k=5)}, reps)
    fwd = t['compiled no-grad eval forward']
    print(f'{"torch.compile(fullgraph=True)":38s}{"ms/batch":>10s}{"x forward":>11s}')
    for name, seconds in t.items():
        print(f'{name:38s}{seconds * 1e3:10.1f}{seconds / fwd:11.2f}')
    if profile:
        parts = {'forward': conv_split(forward), 'explain': conv_split(lambda: explain(compiled, x))}
        print(f'profile, compiled (self CPU ms){"forward":>12s}{"explain":>10s}')
        for kind in parts['forward']:
            print(f'{kind:31s}{parts["forward"][kind]:12.0f}{parts["explain"][kind]:10.0f}')
        convs = parts['explain']['conv forward'] + parts['explain']['conv backward']
        print(f'explain\'s convolutions alone: {convs / sum(parts["forward"].values()):.2f}x the compiled forward')


if __name__ == '__main__':
    main()
