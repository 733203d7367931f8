"""conv2d (+ bias + ReLU + max/avg pool): the Triton kernels (interpreter on CPU) and the reference path against a
float64 eager reference (F.conv2d -> relu -> max_pool2d/avg_pool2d), outputs and the gradients of input, weight and
bias, held to 2x eager PyTorch's own error in the same dtype (dlkernels.testing)."""
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import dlkernels
from dlkernels.testing import assert_close, make_input


def eager_block(x, w, b, stride=1, padding=0, dilation=1, *, activation=None, pool=None):
    """What the op replaces: cuDNN/ATen conv, then ReLU, then the pool."""
    y = F.conv2d(x, w, b, stride, padding, dilation)
    if activation == "relu":
        y = torch.relu(y)
    if pool is not None:
        kind, kernel = pool[0], pool[1]
        stride_p = pool[2] if len(pool) > 2 else None
        y = (F.max_pool2d if kind == "max" else F.avg_pool2d)(y, kernel, stride_p)
    return y


def check_block(n, c_in, c_out, hw, kernel, *, stride=1, padding=0, dilation=1, activation=None, pool=None,
                dtype=torch.float16, channels_last=True, bias=True, backend="triton", device="cpu", seed=0,
                grad=True):
    """Runs ours on ``backend``, eager in ``dtype`` and eager in float64 on the same data; compares the output and
    the gradients of input, weight and bias."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = make_input((n, c_in, *hw), dtype, device, seed=seed, memory_format=fmt)
    w = make_input((c_out, c_in, *kernel), dtype, device, seed=seed + 1, std=(c_in * kernel[0] * kernel[1]) ** -0.5)
    b = make_input(c_out, dtype, device, seed=seed + 2) if bias else None
    runs = {}
    for name, cast in (("ours", dtype), ("eager", dtype), ("ref", torch.float64)):
        args = [t.to(cast).requires_grad_(grad) if t is not None else None for t in (x, w, b)]
        args[0] = args[0].detach().contiguous(memory_format=fmt).requires_grad_(grad)
        if name == "ours":
            with dlkernels.backend(backend):
                y = dlkernels.ops.conv2d(*args, stride, padding, dilation, activation=activation, pool=pool)
        else:
            y = eager_block(*args, stride, padding, dilation, activation=activation, pool=pool)
        runs[name] = (y, args)
    y = runs["ours"][0]
    assert y.shape == runs["ref"][0].shape
    if channels_last and not x.is_contiguous() and y.shape[1] > 1 and y.shape[2] * y.shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last), "output lost the channels_last layout"
    terms = c_in * kernel[0] * kernel[1]
    assert_close(y, runs["ref"][0], runs["eager"][0], terms=terms, name="output")
    if not grad:
        return
    g = make_input(y.shape, dtype, device, seed=seed + 3)
    grads = {}
    for name, (out, args) in runs.items():
        wanted = [t for t in args if t is not None]
        grads[name] = torch.autograd.grad(out, wanted, g.to(out.dtype))
    pixels = y.numel() // y.shape[1] * (pool_positions(pool))
    for i, what in enumerate(["grad_input", "grad_weight", "grad_bias"][: len(grads["ours"])]):
        t = (c_out * kernel[0] * kernel[1], pixels, pixels)[i]
        assert_close(grads["ours"][i], grads["ref"][i], grads["eager"][i], terms=t, name=what)


def pool_positions(pool) -> int:
    if pool is None:
        return 1
    k = pool[1] if isinstance(pool[1], (tuple, list)) else (pool[1], pool[1])
    return k[0] * k[1]


# The networks' layers (small batches and channel counts for the interpreter).
NETWORK_SHAPES = {
    "lenet_max": dict(n=2, c_in=1, c_out=6, hw=(32, 32), kernel=(5, 5), activation="relu", pool=("max", 2)),
    "lenet_avg": dict(n=2, c_in=1, c_out=6, hw=(32, 32), kernel=(5, 5), activation="relu", pool=("avg", 2)),
    "alexnet_conv1": dict(n=1, c_in=3, c_out=16, hw=(67, 67), kernel=(11, 11), stride=4, padding=2,
                          activation="relu", pool=("max", 3, 2)),
    "vgg": dict(n=2, c_in=16, c_out=32, hw=(14, 14), kernel=(3, 3), padding=1, activation="relu", pool=("max", 2)),
    "vgg_first": dict(n=1, c_in=3, c_out=16, hw=(16, 16), kernel=(3, 3), padding=1, activation="relu",
                      pool=("max", 2)),
    "resnet_stem": dict(n=2, c_in=3, c_out=16, hw=(23, 23), kernel=(7, 7), stride=2, padding=3),
    "odd_pool_drops_edge": dict(n=1, c_in=5, c_out=7, hw=(11, 9), kernel=(3, 3), padding=1, activation="relu",
                                pool=("max", 2)),
    "odd_avg_no_relu": dict(n=3, c_in=20, c_out=18, hw=(9, 7), kernel=(3, 3), pool=("avg", 2)),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", list(NETWORK_SHAPES))
def test_network_layers(name, backend):
    check_block(**NETWORK_SHAPES[name], backend=backend)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("pool", [None, ("max", 2), ("avg", 2), ("max", 3, 2), ("avg", (2, 3), (1, 2))], ids=str)
def test_epilogues(activation, pool):
    check_block(2, 4, 6, (9, 8), (3, 3), padding=1, activation=activation, pool=pool, backend="reference")


def test_padding_same_and_valid():
    check_block(2, 3, 4, (8, 7), (4, 3), padding="same", dilation=(1, 2), activation="relu", backend="reference")
    check_block(2, 3, 4, (8, 7), (4, 3), padding="valid", backend="reference")


def test_module_state_dict_interchange():
    ours = dlkernels.nn.Conv2d(3, 8, 3, padding=1, activation="relu", pool=("max", 2))
    theirs = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert isinstance(ours, torch.nn.Conv2d)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = make_input((2, 3, 10, 10), seed=4)
    with dlkernels.backend("reference"):
        torch.testing.assert_close(ours(x), F.max_pool2d(torch.relu(theirs(x)), 2))
    theirs.load_state_dict(ours.state_dict())
    block = dlkernels.nn.ConvBlock2d(3, 8, 3, padding=1, bias=False, pool=("avg", 2))
    assert list(block.state_dict()) == list(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False).state_dict())
    assert "activation='relu'" in repr(block) and "pool=('avg', 2)" in repr(block)


OPCHECK_CASES = [
    (True, [1, 2, 2, 2, 2]), (True, [2, 2, 2, 2, 2]), (False, [1, 3, 3, 2, 2]), (True, [0, 1, 1, 1, 1]),
    (False, [2, 2, 3, 1, 2]),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("relu,pool", OPCHECK_CASES, ids=str)
def test_opcheck(relu, pool, backend):
    x = make_input((2, 3, 9, 8), seed=1, memory_format=torch.channels_last)
    w, b = make_input((5, 3, 3, 3), seed=2), make_input(5, seed=3)
    geometry = ([1, 1], [1, 1, 0, 1], [1, 1], 1)
    with dlkernels.backend(backend):
        torch.library.opcheck(torch.ops.dlkernels.conv2d_forward.default, (x, w, b, *geometry, relu, pool))
        out, code = torch.ops.dlkernels.conv2d_forward(x, w, b, *geometry, relu, pool)
        g = make_input(out.shape, seed=4)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            torch.library.opcheck(torch.ops.dlkernels.conv2d_backward.default,
                                  (g, x, w, b, out, code, *geometry, relu, pool, mask))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fullgraph_compile(backend):
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        dlkernels.nn.ConvBlock2d(3, 8, 3, padding=1, pool=("max", 2)), dlkernels.nn.Conv2d(8, 4, 3, stride=2),
    )
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = make_input((2, 3, 12, 12), seed=5, requires_grad=True)
    with dlkernels.backend(backend):
        y = compiled(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
        y_eager = model(x)
        grads_eager = torch.autograd.grad(y_eager.square().sum(), [x, *model.parameters()])
    torch.testing.assert_close(y, y_eager)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge)
