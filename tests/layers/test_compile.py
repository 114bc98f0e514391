"""torch.compile(fullgraph=True) and torch.export of a B-cos model: the compiled forward, training
gradients and explanations equal eager ones, and switching explanation mode does not recompile.
One compiled model for the whole file (compiling takes most of its time)."""
import copy

import pytest
import timm
import torch
from torch._dynamo.utils import counters

import timm_bcos

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    eager = timm.create_model('bcos_simple_cifar_tiny', num_classes=10)
    inner = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    return eager, inner, torch.compile(inner, fullgraph=True)


def _round(eager, inner, compiled, x):
    """Inference, a training step's gradients and explain(), compiled against eager."""
    for m in (eager, compiled):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
    for m in (eager, inner):
        m.train()
        m.zero_grad()
    compiled(x).square().mean().backward()
    eager(x).square().mean().backward()
    for p, q in zip(inner.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * q.grad.abs().max().item())  # float32 sums
    # One target first: the compiled explanation-mode backward must still be retainable for k=2
    # (a backward compiled with donated buffers refuses retain_graph).
    assert timm_bcos.explain(compiled, x).check() < 1e-5
    ec, ee = timm_bcos.explain(compiled, x, k=2), timm_bcos.explain(eager, x, k=2)
    torch.testing.assert_close(ec.weights, ee.weights, rtol=1e-4, atol=1e-5 * ee.weights.abs().max().item())
    assert torch.equal(ec.targets, ee.targets) and ec.check() < 1e-5
    torch.testing.assert_close(ec.bias, ee.bias)


def test_compiled_model_equals_eager_and_mode_switches_reuse_graphs(models):
    eager, inner, compiled = models
    x = timm_bcos.add_inverse(torch.rand(4, 3, 32, 32))
    _round(eager, inner, compiled, x)
    graphs = counters['stats']['unique_graphs']
    assert 3 <= graphs <= 4  # inference, training, explanation mode (+ eval with gradients)
    for _ in range(2):  # flip between the modes again: the cached graphs serve them
        _round(eager, inner, compiled, x)
    assert counters['stats']['unique_graphs'] == graphs


def test_export_with_gradients_enabled(models):
    eager = models[0].eval()
    x = timm_bcos.add_inverse(torch.rand(2, 3, 32, 32))
    program = torch.export.export(eager, (x,))  # gradients enabled: no `out=` ops in the graph
    assert not [n for n in program.graph.nodes if str(n.target).endswith('.out')]
    torch.testing.assert_close(program.module()(x), eager(x), rtol=1e-5, atol=1e-6)


def test_channels_last_training_step_compiles(models):
    """A channels-last model (timm's ``--channels-last``) through the compiled training graph: the B-cos
    layers return channels-last tensors on CPU (custom ops), so their fake and real strides must agree."""
    eager = copy.deepcopy(models[0]).train().to(memory_format=torch.channels_last)
    inner = copy.deepcopy(eager)
    compiled = torch.compile(inner, fullgraph=True)
    x = timm_bcos.add_inverse(torch.rand(4, 3, 32, 32)).contiguous(memory_format=torch.channels_last)
    compiled(x).square().mean().backward()
    eager(x).square().mean().backward()
    for p, q in zip(inner.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * q.grad.abs().max().item())
