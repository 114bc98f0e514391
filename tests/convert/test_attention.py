"""Transformers: attention, positional embeddings and tokens convert to exact B-cos networks (Eq. 13)."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from timm_bcos import AddInverse, convert_to_bcos
from timm_bcos.layers import BcosConv2d, DynamicAttention, ExplainedConstant, explained_constants, explanation_mode


def _x(n=3, size=32, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return AddInverse()(torch.rand(n, 3, size, size, generator=generator, dtype=dtype))


def _vit(fused: bool = True, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **kwargs)
    for block in model.blocks:
        block.attn.fused_attn = fused
    return convert_to_bcos(model, calibration_data=_x(8, dtype=torch.float32)).double()


@pytest.fixture(scope='module')
def vit():
    return _vit()


@pytest.mark.parametrize('fused', [True, False], ids=['sdpa', 'matmul-softmax'])
def test_vit_is_exact_with_its_constants(fused):
    model = _vit(fused)
    assert model.check_dynamic_linearity(_x()) < 1e-12
    names = sorted(m.name for m in model.modules() if isinstance(m, ExplainedConstant))
    assert names == ['cls_token', 'pos_embed']
    if fused:
        assert sum(isinstance(m, DynamicAttention) for m in model.modules()) == 2


def test_vit_starts_alive(vit):
    with torch.no_grad():
        logits = vit.float()(_x(8, dtype=torch.float32, seed=1))
    vit.double()
    assert 0.1 < (logits - vit.bcos_cfg['logit_bias']).std() < 10


def test_explain_matches_autograd_batched(vit):
    x = _x()
    e = vit.explain(x, k=2)
    assert e.check() < 1e-12 and e.exact
    assert set(e.constants) == {'cls_token', 'pos_embed'} and e.constants['pos_embed'].shape == (3, 2)
    assert e.constants['pos_embed'].abs().max() > 0  # the embedding contributes: nothing left out of the sum
    xg = x.clone().requires_grad_(True)
    with explanation_mode(vit):
        out = vit(xg)
    for j in range(2):
        (grad,) = torch.autograd.grad(out.gather(1, e.targets[:, j:j + 1]).sum(), xg, retain_graph=True)
        torch.testing.assert_close(e.weights[:, j], grad, rtol=0, atol=1e-13)


def test_constants_are_the_gradient_of_the_logit_times_the_constant(vit):
    """The constant contribution is W_c(x) c with W_c the gradient wrt the constant (per image)."""
    x = _x(2)
    e = vit.explain(x, target=1)
    for i in range(2):
        with explanation_mode(vit), explained_constants(vit, 1) as constants:
            logit = vit(x[i:i + 1])[0, 1]
        leaves = dict(constants)
        (grad,) = torch.autograd.grad(logit, leaves['pos_embed'])
        assert torch.allclose((grad * leaves['pos_embed']).sum(), e.constants['pos_embed'][i, 0], atol=1e-14)


def test_explain_a_token_neuron(vit):
    """Token outputs (N, L, C): a neuron is a channel at a token position."""
    x = _x(2)
    e = vit.explain(x, layer='blocks.0', neuron=[3, 7], position=(4,))
    assert e.check() < 1e-12
    assert e.positions[..., 0].eq(4).all()
    xg = x.clone().requires_grad_(True)
    captured = []
    handle = vit.blocks[0].register_forward_hook(lambda m, i, o: captured.append(o))
    with explanation_mode(vit):
        vit(xg)
    handle.remove()
    (grad,) = torch.autograd.grad(captured[0][:, 4, 7].sum(), xg)
    torch.testing.assert_close(e.weights[:, 1], grad, rtol=0, atol=1e-13)
    assert torch.allclose(e.logits[:, 1], captured[0][:, 4, 7].detach())


def test_swin_shifted_windows_are_exact():
    """Window partition / reverse are reshapes; the shift mask gives the attention its second graph."""
    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                            num_classes=5)
    convert_to_bcos(model, calibration_data=_x(4, dtype=torch.float32))
    assert model.double().check_dynamic_linearity(_x(2)) < 1e-12
    e = model.explain(_x(2), layer='layers.1', neuron=5, position=(1, 2))  # an (N, H, W, C) stage: channel 5
    captured = []
    handle = model.layers[1].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model.eval()(_x(2))
    handle.remove()
    assert e.check() < 1e-12 and torch.allclose(e.logits[:, 0], captured[0][:, 1, 2, 5])


def test_rewritten_forward_keeps_its_flags_and_pickles(vit):
    x = _x(2)
    with torch.no_grad():
        expected = vit(x)
        for clone in (copy.deepcopy(vit), pickle.loads(pickle.dumps(vit))):
            assert torch.equal(clone(x), expected)
    with pytest.raises(ValueError, match='is_causal=False'):
        vit.forward_features(x, is_causal=True)


class _SeparateBiasAttention(nn.Module):
    """BEiT's form: ``F.linear(x, self.qkv.weight, cat(q_bias, 0, v_bias))`` and matmul attention."""

    def __init__(self, dim=8):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        q, k, v = F.linear(x, weight=self.qkv.weight, bias=bias).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj(attn @ v)


class _TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.pos = nn.Parameter(torch.randn(1, 16, 8) * 0.1)
        self.attn = _SeparateBiasAttention()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.attn(t).mean(1))


def test_functional_linear_with_a_layer_weight_calls_the_layer():
    torch.manual_seed(0)
    model = convert_to_bcos(_TokenNet(), calibration_data=_x(4, dtype=torch.float32)).double()
    assert model.check_dynamic_linearity(_x()) < 1e-12
    assert [m.name for m in model.modules() if isinstance(m, ExplainedConstant)] == ['pos']


def test_dynamic_attention_detaches_only_its_weights():
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    layer = DynamicAttention()
    torch.testing.assert_close(layer(q, k, v), F.scaled_dot_product_attention(q, k, v))
    with explanation_mode(layer):
        out = layer(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert grads[0] is None and grads[1] is None and grads[2] is not None
    # linear in v with the attention matrix fixed: out(2v) = 2 out(v) for the same q, k
    torch.testing.assert_close(layer(q, k, 2 * v), 2 * layer(q, k, v))


class _ShapeBranchingBlock(nn.Module):
    """Python control flow on shapes and an int argument: fx cannot trace it symbolically."""

    def __init__(self, dim=8, window=3):
        super().__init__()
        self.window = window
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, size):
        h, w = size
        pad = (self.window - w % self.window) % self.window
        if pad > 0:  # decided on the example input; the graph is traced at that size
            x = F.pad(x.view(x.shape[0], h, w, -1), (0, 0, 0, pad)).flatten(1, 2)
        return F.gelu(self.proj(x))[:, :h * w]


class _EmbedWithMask(nn.Module):
    """A patch embedding that also returns a padding mask, None for a full grid (as Gemma4-ViT's)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        return self.proj(x), None


class _ConcreteNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = _EmbedWithMask()
        self.block = _ShapeBranchingBlock()
        self.unused = _ShapeBranchingBlock()  # never called by forward (like Hiera's reroll)
        self.head = nn.Linear(8, 5)
        self.pretrained_cfg = dict(input_size=(3, 32, 32))

    def forward(self, x):
        t, padding = self.embed(x)
        if padding is not None and padding.any():  # the module's None output is None while tracing
            t = t.masked_fill(padding, 0.0)
        size = t.shape[-2:]
        t = self.block(t.flatten(2).transpose(1, 2), (int(size[0]), int(size[1])))
        return self.head(t.amax(1))  # a max over tokens: kept, it selects an input


def test_untraceable_forward_is_traced_at_the_example_input():
    torch.manual_seed(0)
    model = convert_to_bcos(_ConcreteNet())
    assert type(model.block.forward).__name__ == 'RewrittenForward'  # its GELU was removed in the graph
    assert model.double().check_dynamic_linearity(_x()) < 1e-12
    assert model.explain(_x(2), k=2).check() < 1e-12


class _BatchSizedBlock(nn.Module):
    """Tensors made for the traced batch size: a factory call with it (Gemma4-ViT's patch embedding:
    `torch.ones(batch_size, ...)`) and a lazily cached plain tensor expanded to it (ConViT's indices)."""

    def __init__(self, dim=8):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.index = torch.zeros(1, 1, 1)  # rebuilt for the token count at the first call (ConViT's)

    def forward(self, x):
        b, n, c = x.shape
        if self.index.shape[1] != n:
            self.index = torch.linspace(0.5, 1.5, n).view(1, n, 1)
        return self.proj(x) * self.index.expand(b, -1, c) * torch.ones(b, n, c, dtype=x.dtype)


class _BatchSizedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.block = _BatchSizedBlock()
        self.head = nn.Linear(8, 5)
        self.pretrained_cfg = dict(input_size=(3, 32, 32))

    def forward(self, x):
        return self.head(self.block(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


def test_sizes_passed_to_factories_and_plain_tensors_stay_graph_values():
    """Traced at the example batch, such a block still runs (and is exact) at other batch sizes."""
    torch.manual_seed(0)
    model = convert_to_bcos(_BatchSizedNet()).double()
    for n in (1, 3):
        assert model.check_dynamic_linearity(_x(n)) < 1e-12
    assert model.explain(_x(2), k=2).check() < 1e-12


def test_distilled_heads_both_get_the_logit_map():
    """DeiT-distilled averages two classifiers: both carry the logit bias, or Eq. 13 misses half of it."""
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    convert_to_bcos(model, calibration_data=_x(4, dtype=torch.float32))
    assert type(model.head).__name__ == type(model.head_dist).__name__ == 'BcosClassifier'
    assert model.double().check_dynamic_linearity(_x()) < 1e-12
    assert {m.name for m in model.modules() if isinstance(m, ExplainedConstant)} == {'cls_token', 'dist_token',
                                                                                     'pos_embed'}
    model.pretrained_cfg = dict(input_size=(3, 32, 32))  # where reset_classifier calibrates the new heads
    model.reset_classifier(3)  # both new heads are converted again
    assert type(model.head).__name__ == type(model.head_dist).__name__ == 'BcosClassifier'
    assert model.double().check_dynamic_linearity(_x()) < 1e-12


class _LinearPatchNet(nn.Module):
    """A linear patch embedding of flattened patches (NaFlexViT's stem)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 16)
        self.head = nn.Linear(16, 5)
        self.pretrained_cfg = dict(input_size=(3, 32, 32), first_conv='proj')

    def forward(self, x):
        b, c = x.shape[:2]
        patches = x.reshape(b, c, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(b, 16, -1)
        return self.head(self.proj(patches).mean(1))


def test_linear_patch_embedding_takes_the_encoding():
    torch.manual_seed(0)
    model = convert_to_bcos(_LinearPatchNet())
    assert model.proj.in_features == 6 * 8 * 8
    assert model.double().check_dynamic_linearity(_x()) < 1e-12


def test_registered_bcos_vit_builds_small_and_exact():
    import timm
    model = timm.create_model('bcos_vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, num_classes=4)
    assert model.bcos_cfg['max_out'] == 2 and model.double().check_dynamic_linearity(_x()) < 1e-12
    assert model.explain(_x(2, size=48)).check() < 1e-12  # any input size (default): the embedding is resampled


def test_registered_bcos_vitc_conv_stem_is_exact_and_saves(tmp_path):
    """ViT-C: timm's ViT with `ConvStemPatchEmbed` (the stem's first conv takes the encoding); exact in
    float64, alive, and it saves and loads back through timm's ``local-dir:`` (its embed_layer class is
    the name's own, not a saved argument)."""
    import timm
    from timm_bcos.models.export import save_pretrained
    model = timm.create_model('bcos_vitc_tiny_patch16_224', img_size=32, patch_size=4, depth=2, num_classes=4,
                              max_out=1, norm='bnu')
    stem = model.patch_embed.proj
    assert [m.stride for m in stem.modules() if isinstance(m, BcosConv2d)] == [(2, 2), (2, 2), (1, 1)]
    assert stem[0].conv.in_channels == 6 and model.patch_embed.grid_size == (8, 8)
    x = _x(3, dtype=torch.float32)
    assert 0.1 < model.eval()(x).std() < 10
    save_pretrained(model, str(tmp_path / 'vitc'))
    loaded = timm.create_model(f'local-dir:{tmp_path / "vitc"}', pretrained=True).eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert model.double().check_dynamic_linearity(_x()) < 1e-12
    assert model.explain(_x(2, size=48)).check() < 1e-12
    with pytest.raises(ValueError, match='patch_size must be a square power of 2'):
        timm.create_model('bcos_vitc_tiny_patch16_224', img_size=30, patch_size=6)


class _Window(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x):
        return x


class _ReadsChildSize(nn.Module):
    """The forward reads an int of a custom child (as MaxViT's attention reads its rel-pos window)."""

    def __init__(self, size, dim=8):
        super().__init__()
        self.window = _Window(size)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        x = F.gelu(self.proj(x))
        return x.reshape(b, n // self.window.size, self.window.size, c).mean(2).repeat_interleave(self.window.size, 1)


def test_structurally_equal_modules_with_different_custom_children_trace_separately():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.Flatten(2), _Transpose(), _ReadsChildSize(2),
                          _ReadsChildSize(4), _Mean(), nn.Linear(8, 3))
    convert_to_bcos(model, calibration_data=_x(4, dtype=torch.float32))
    tokens = torch.randn(2, 16, 8)
    for block in model[3], model[4]:  # each reads its own window size (a cached graph would bake the first's)
        size = block.window.size
        expected = block.proj(tokens).reshape(2, 16 // size, size, 8).mean(2).repeat_interleave(size, 1)
        torch.testing.assert_close(block(tokens), expected)
    assert model.double().check_dynamic_linearity(_x()) < 1e-12


class _Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


class _Mean(nn.Module):
    def forward(self, x):
        return x.mean(1)


def test_bcosify_a_vit_keeps_its_function_at_b1_and_is_exact_at_b2():
    import timm
    from timm_bcos import add_inverse, bcosify
    torch.manual_seed(0)
    original = timm.create_model('test_vit', num_classes=5).eval()
    x = torch.rand(2, 3, 64, 64)
    mean, std = (torch.tensor(original.pretrained_cfg[k])[:, None, None] for k in ('mean', 'std'))
    with torch.no_grad():
        expected = original((x - mean) / std)
        same = bcosify(copy.deepcopy(original), b=1.0, preserve_function=True).eval()(add_inverse(x))
    torch.testing.assert_close(same, expected, rtol=1e-4, atol=1e-5)
    model = bcosify(copy.deepcopy(original), calibration_data=add_inverse(torch.rand(4, 3, 64, 64))).double()
    assert model.check_dynamic_linearity(_x(2, size=64)) < 1e-12
