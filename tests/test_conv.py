"""conv2d (+ bias + ReLU + max/avg pool): the Triton kernels (interpreter on CPU) and the reference path against a
float64 eager reference (F.conv2d -> relu -> max_pool2d/avg_pool2d), outputs and the gradients of input, weight and
bias, held to 2x eager PyTorch's own error in the same dtype (dlkernels.testing)."""
import random
import warnings

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
    "alexnet_conv1": dict(n=1, c_in=3, c_out=16, hw=(39, 39), kernel=(11, 11), stride=4, padding=2,
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


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("pool", [None, ("max", 2), ("avg", 2), ("max", 3, 2), ("avg", (2, 3), (1, 2))], ids=str)
def test_epilogues_fp32(activation, pool, backend):
    check_block(2, 4, 6, (9, 8), (3, 3), padding=1, activation=activation, pool=pool, backend=backend,
                dtype=torch.float32, channels_last=activation is None)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_padding_same_and_valid(backend):
    check_block(2, 3, 4, (8, 7), (4, 3), padding="same", dilation=(1, 2), activation="relu", backend=backend)
    check_block(2, 3, 4, (8, 7), (4, 3), padding="valid", backend=backend, channels_last=False)


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
    ("triton", True, [1, 2, 2, 2, 2]), ("triton", True, [2, 2, 2, 2, 2]), ("triton", True, [0, 1, 1, 1, 1]),
    ("reference", False, [1, 3, 3, 2, 2]), ("reference", False, [2, 2, 3, 1, 2]),
]


@pytest.mark.parametrize("backend,relu,pool", OPCHECK_CASES, ids=str)
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


def _random_case(rng: random.Random) -> dict:
    """One tiny valid configuration: every argument drawn, invalid geometry redrawn."""
    while True:
        kernel = (rng.randint(1, 3), rng.randint(1, 3))
        stride = (rng.randint(1, 3), rng.randint(1, 3)) if rng.random() < 0.5 else rng.randint(1, 2)
        dilation = rng.choice([1, 1, 2, (1, 2)])
        padding = rng.choice([0, 1, 2, (0, 1), "valid"] + (["same"] if stride in (1, (1, 1)) else []))
        pool = rng.choice([None, None, ("max", 2), ("avg", 2), ("max", rng.randint(1, 3), rng.randint(1, 3)),
                           ("avg", (rng.randint(1, 3), rng.randint(1, 2)), rng.randint(1, 2))])
        case = dict(n=rng.randint(1, 2), c_in=rng.choice([1, 2, 3, 5, 16, 17]), c_out=rng.choice([1, 3, 6, 16, 20]),
                    hw=(rng.randint(3, 9), rng.randint(3, 9)), kernel=kernel, stride=stride, padding=padding,
                    dilation=dilation, activation=rng.choice([None, "relu"]), pool=pool,
                    dtype=rng.choice([torch.float16, torch.float32]), channels_last=rng.random() < 0.7,
                    bias=rng.random() < 0.8)
        x = torch.empty(case["n"], case["c_in"], *case["hw"], device="meta")
        w = torch.empty(case["c_out"], case["c_in"], *kernel, device="meta")
        try:
            eager_block(x, w, None, stride, padding, dilation, activation=case["activation"], pool=pool)
        except RuntimeError:
            continue
        return case


SWEEP_CASES = 200
SWEEP_CHUNKS = 8


@pytest.mark.parametrize("chunk", range(SWEEP_CHUNKS))
def test_seeded_sweep(chunk):
    """SWEEP_CASES tiny random configurations (shapes, strides, paddings, dilations, pools, dtypes, layouts) through
    the Triton kernels, forward and backward; chunks so xdist spreads them."""
    rng = random.Random(1234 + chunk)
    for i in range(SWEEP_CASES // SWEEP_CHUNKS):
        case = _random_case(rng)
        try:
            check_block(**case, seed=i)
        except AssertionError as exc:
            raise AssertionError(f"case {case}: {exc}") from None


@pytest.mark.fuzz
@given(seed=st.integers(0, 2**32 - 1))
def test_fuzz(seed):
    case = _random_case(random.Random(seed))
    check_block(**case, seed=seed % 1000)


def test_bf16_under_the_interpreter():
    """bf16 operands go through fp32 under the interpreter (CPU only); stores round to nearest as on the GPU."""
    check_block(2, 16, 16, (8, 8), (3, 3), padding=1, activation="relu", pool=("max", 2), dtype=torch.bfloat16)
    check_block(1, 3, 5, (9, 7), (3, 3), stride=2, activation="relu", pool=("avg", 2), dtype=torch.bfloat16,
                channels_last=False)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["max", "max_relu", "avg_relu"])
def test_pool_ties_send_the_gradient_to_one_position(kind, backend):
    """Equal values in every window (a 1x1 identity conv of a nearest-upsampled input, exact in fp16): torch's
    max pool sends each window's gradient to its first position, and so must we."""
    base = make_input((2, 3, 3, 4), torch.float16, seed=6)
    base[0, 0] = 0.0  # whole windows of zeros: after ReLU no position gets a gradient
    x = F.interpolate(base, scale_factor=2, mode="nearest").contiguous(memory_format=torch.channels_last)
    x = torch.cat([x, x[:, :, :1]], dim=2)  # an odd row the pool drops
    w = torch.eye(3, dtype=torch.float16).view(3, 3, 1, 1)
    activation = "relu" if kind != "max" else None
    pool = ("avg" if kind == "avg_relu" else "max", 2)
    grads = []
    for impl, dtype in ((backend, torch.float16), ("reference", torch.float64)):
        xi = x.to(dtype).requires_grad_()
        wi = w.to(dtype).requires_grad_()
        with dlkernels.backend(impl):
            y = dlkernels.ops.conv2d(xi, wi, activation=activation, pool=pool)
        ref = eager_block(x.double(), w.double(), None, activation=activation, pool=pool)
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=0)
        g = make_input(y.shape, torch.float16, seed=7).to(dtype)
        grads.append(torch.autograd.grad(y, [xi, wi], g))
    torch.testing.assert_close(grads[0][0].double(), grads[1][0], rtol=0, atol=0)
    if kind != "avg_relu":
        nonzero = (grads[0][0] != 0).view(2, 3, 7, 8)[:, :, :6].unflatten(2, (3, 2)).unflatten(4, (4, 2))
        assert int(nonzero.sum((3, 5)).max()) == 1, "a window sent its gradient to more than one position"


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("pool", [None, ("max", 2), ("avg", 2)], ids=str)
def test_nan_and_inf_propagate_as_in_torch(pool, backend):
    x = make_input((1, 4, 6, 6), torch.float32, seed=8, memory_format=torch.channels_last)
    x[0, 1, 0, 0] = float("nan")
    x[0, 2, 4, 3] = float("inf")
    x[0, 3, 2, 5] = float("-inf")
    w, b = make_input((5, 4, 3, 3), seed=9), make_input(5, seed=10)
    with dlkernels.backend(backend):
        y = dlkernels.ops.conv2d(x, w, b, padding=1, activation="relu", pool=pool)
    ref = eager_block(x.double(), w.double(), b.double(), 1, 1, activation="relu", pool=pool)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(y.double()[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_strided_unbatched_and_empty_inputs(backend):
    x = make_input((2, 8, 9, 7), seed=11)[:, ::2]  # neither NCHW- nor NHWC-dense: read through its strides
    w, b = make_input((3, 4, 3, 3), seed=12).transpose(2, 3), make_input(6, seed=13)[::2]  # strided weight, bias
    with dlkernels.backend(backend):
        y = dlkernels.ops.conv2d(x, w, b, padding=1, activation="relu", pool=("max", 2))
        torch.testing.assert_close(y, eager_block(x, w, b, 1, 1, activation="relu", pool=("max", 2)))
        y3 = dlkernels.ops.conv2d(x[0], w, b, padding=1, pool=("avg", 2))
        torch.testing.assert_close(y3, eager_block(x[:1], w, b, 1, 1, pool=("avg", 2))[0])
        empty = torch.zeros(0, 4, 6, 6, requires_grad=True)
        y0 = dlkernels.ops.conv2d(empty, w.requires_grad_(), b, pool=("max", 2))
        assert y0.shape == (0, 3, 2, 2)
        y0.sum().backward()
        assert empty.grad.shape == empty.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_fallbacks_warn_once_and_match_torch():
    x, w = make_input((2, 4, 6, 6), seed=14), make_input((6, 2, 3, 3), seed=15)
    with dlkernels.backend("triton"):
        with pytest.warns(UserWarning, match="groups > 1"):
            y = dlkernels.ops.conv2d(x, w, groups=2, activation="relu", pool=("max", 2))
        torch.testing.assert_close(y, eager_block_grouped(x, w, 2))
        with pytest.warns(UserWarning, match="float64"):
            dlkernels.ops.conv2d(x.double(), make_input((3, 4, 3, 3), torch.float64))
        with torch.backends.cudnn.flags(allow_tf32=False), pytest.warns(UserWarning, match="allow_tf32"):
            dlkernels.ops.conv2d(x, make_input((3, 4, 3, 3)))


def eager_block_grouped(x, w, groups):
    return F.max_pool2d(torch.relu(F.conv2d(x, w, groups=groups)), 2)


PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_module_padding_modes_and_arguments(padding_mode):
    kwargs = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=True, padding_mode=padding_mode)
    theirs = torch.nn.Conv2d(4, 6, (3, 2), **kwargs)
    ours = dlkernels.nn.Conv2d(4, 6, (3, 2), **kwargs, activation="relu", pool=("avg", 2))
    ours.load_state_dict(theirs.state_dict())
    x = make_input((2, 4, 9, 8), torch.float32, seed=16, memory_format=torch.channels_last)
    with dlkernels.backend("triton"):
        y = ours(x)
    torch.testing.assert_close(y, F.avg_pool2d(torch.relu(theirs(x)), 2), rtol=1e-5, atol=1e-5)


def test_module_db_inputs():
    """torch's own Conv2d test inputs (module_db): our Conv2d with torch's weights gives torch's outputs and grads."""
    from torch.testing._internal.common_modules import module_db

    info = next(m for m in module_db if m.module_cls is torch.nn.Conv2d)
    for dtype in (torch.float32, torch.float64):
        inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)
        assert inputs
        for sample in inputs:
            args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
            theirs = torch.nn.Conv2d(*args, **kwargs).to(dtype)
            ours = dlkernels.nn.Conv2d(*args, **kwargs).to(dtype)
            ours.load_state_dict(theirs.state_dict())
            (x,) = sample.forward_input.args
            with dlkernels.backend("triton"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # float64 takes the reference path, with its fallback warning
                y = ours(x)
                grads = torch.autograd.grad(y.sum(), [x, *ours.parameters()])
            y_ref = theirs(x)
            grads_ref = torch.autograd.grad(y_ref.sum(), [x, *theirs.parameters()])
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
            for g, gr in zip(grads, grads_ref):
                torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-5)


def _x(*shape, **kw):
    return make_input(shape, **kw)


BAD_INPUT = {
    "input_2d": (dict(input=_x(4, 6)), RuntimeError, "3D \\(unbatched\\) or 4D"),
    "input_5d": (dict(input=_x(1, 3, 2, 6, 6)), RuntimeError, "3D \\(unbatched\\) or 4D"),
    "weight_3d": (dict(weight=_x(4, 3, 3)), RuntimeError, "weight must be 4-D"),
    "channels_mismatch": (dict(weight=_x(4, 2, 3, 3)), RuntimeError, "to have 2 channels, but got 3"),
    "groups_channels": (dict(weight=_x(6, 3, 3, 3), groups=3), RuntimeError, "to have 9 channels"),
    "groups_out_channels": (dict(weight=_x(4, 1, 3, 3), groups=3), RuntimeError, "divisible by 3"),
    "groups_zero": (dict(groups=0), RuntimeError, "non-positive groups"),
    "bias_shape": (dict(bias=_x(3)), RuntimeError, "expected bias to be 1-dimensional with 4 elements"),
    "weight_dtype": (dict(weight=_x(4, 3, 3, 3, dtype=torch.float64)), RuntimeError, "weight type"),
    "bias_dtype": (dict(bias=_x(4, dtype=torch.float16)), RuntimeError, "bias type"),
    "weight_device": (dict(weight=torch.empty(4, 3, 3, 3, device="meta")), RuntimeError, "weight is on meta"),
    "integer_input": (dict(input=torch.ones(1, 3, 6, 6, dtype=torch.int64)), NotImplementedError, "dtype"),
    "not_a_tensor": (dict(input=[[1.0]]), TypeError, "input must be a Tensor"),
    "kernel_too_large": (dict(weight=_x(4, 3, 7, 3)), RuntimeError, "Kernel size can't be greater"),
    "dilated_kernel_too_large": (dict(dilation=4), RuntimeError, "Kernel size can't be greater"),
    "stride_zero": (dict(stride=0), RuntimeError, "non-positive stride"),
    "stride_three_values": (dict(stride=(1, 1, 1)), RuntimeError, "expected stride to be a single integer"),
    "negative_padding": (dict(padding=-1), RuntimeError, "negative padding"),
    "padding_string": (dict(padding="full"), RuntimeError, "Invalid padding string"),
    "same_with_stride": (dict(padding="same", stride=2), RuntimeError, "not supported for strided"),
    "dilation_zero": (dict(dilation=0), RuntimeError, "dilation should be greater than zero"),
    "activation": (dict(activation="gelu"), ValueError, "activation must be None or 'relu'"),
    "pool_kind": (dict(pool=("min", 2)), ValueError, "pool kind must be 'max' or 'avg'"),
    "pool_not_tuple": (dict(pool="max"), ValueError, "pool must be None or"),
    "pool_kernel_zero": (dict(pool=("max", 0)), ValueError, "kernel_size must be positive"),
    "pool_stride_negative": (dict(pool=("avg", 2, -1)), ValueError, "stride must be positive"),
    "pool_kernel_three_values": (dict(pool=("max", (2, 2, 2))), ValueError, "pool kernel_size"),
    "pool_larger_than_output": (dict(pool=("max", 5)), RuntimeError, "larger than the convolution output"),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input(name, backend):
    changes, error, message = BAD_INPUT[name]
    args = dict(input=_x(1, 3, 6, 6), weight=_x(4, 3, 3, 3, seed=1), bias=_x(4, seed=2))
    args.update(changes)
    with dlkernels.backend(backend), pytest.raises(error, match=message):
        dlkernels.ops.conv2d(**args)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="activation"):
        dlkernels.nn.Conv2d(3, 4, 3, activation="tanh")
    with pytest.raises(ValueError, match="pool kind"):
        dlkernels.nn.ConvBlock2d(3, 4, 3, pool=("median", 2))


GPU_SHAPES = {
    "vgg_block1": dict(n=4, c_in=64, c_out=64, hw=(224, 224), kernel=(3, 3), padding=1, activation="relu",
                       pool=("max", 2)),
    "vgg_block3": dict(n=8, c_in=256, c_out=256, hw=(56, 56), kernel=(3, 3), padding=1, activation="relu",
                       pool=("max", 2)),
    "vgg_first": dict(n=8, c_in=3, c_out=64, hw=(224, 224), kernel=(3, 3), padding=1, activation="relu"),
    "alexnet_conv1": dict(n=16, c_in=3, c_out=64, hw=(224, 224), kernel=(11, 11), stride=4, padding=2,
                          activation="relu", pool=("max", 3, 2)),
    "lenet": dict(n=256, c_in=1, c_out=6, hw=(32, 32), kernel=(5, 5), activation="relu", pool=("avg", 2)),
    "resnet_stem": dict(n=8, c_in=3, c_out=64, hw=(224, 224), kernel=(7, 7), stride=2, padding=3),
    "odd_channels": dict(n=5, c_in=40, c_out=72, hw=(31, 29), kernel=(3, 3), padding=1, activation="relu",
                         pool=("avg", 2)),
}


GPU_CASES = [(name, torch.bfloat16, True) for name in GPU_SHAPES] + [
    ("vgg_block3", torch.bfloat16, False), ("alexnet_conv1", torch.bfloat16, False),
    ("vgg_block3", torch.float16, True), ("odd_channels", torch.float16, False),
    ("vgg_block3", torch.float32, True), ("alexnet_conv1", torch.float32, True), ("lenet", torch.float32, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,dtype,channels_last", GPU_CASES, ids=str)
def test_gpu_matches_torch(name, dtype, channels_last):
    check_block(**GPU_SHAPES[name], dtype=dtype, channels_last=channels_last, device="cuda")


@pytest.mark.gpu
def test_gpu_fuzz_sweep():
    """Random small configurations on the GPU (few: each new shape can cost JIT compiles)."""
    rng = random.Random(99)
    for i in range(16):
        case = _random_case(rng)
        case["dtype"] = rng.choice([torch.bfloat16, torch.float16, torch.float32])
        check_block(**case, seed=i, device="cuda")


@pytest.mark.gpu
def test_gpu_batch_offsets_past_2_to_the_31():
    """64-bit batch offsets: the last sample of an input of more than 2^31 elements is convolved like the first."""
    x = torch.randn(1040, 64, 180, 180, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    x[-1].copy_(x[0])
    w = torch.randn(16, 64, 3, 3, device="cuda", dtype=torch.bfloat16) * 0.05
    with dlkernels.backend("triton"):
        y = dlkernels.ops.conv2d(x, w, padding=1, activation="relu", pool=("max", 2))
    torch.testing.assert_close(y[-1], y[0], rtol=0, atol=0)
    torch.testing.assert_close(y[:1].float(), eager_block(x[:1], w, None, 1, 1, activation="relu",
                                                           pool=("max", 2)).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("pool", [("max", 2), ("avg", 2)], ids=str)
def test_gradcheck_and_double_backward_float64(pool):
    """float64 takes the reference path; the custom op's gradients (and, through the eager reference, its double
    backward, e.g. gradient penalties) are checked numerically."""
    x = make_input((1, 2, 5, 4), torch.float64, seed=17, requires_grad=True)
    w = make_input((2, 2, 3, 2), torch.float64, seed=18, requires_grad=True)
    b = make_input(2, torch.float64, seed=19, requires_grad=True)

    def fn(x, w, b):
        return dlkernels.ops.conv2d(x, w, b, padding=(1, 0), activation="relu", pool=pool)

    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)
    with pytest.warns(UserWarning, match="double backward"):
        assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=True)


def test_double_backward_through_kernel_forward():
    x = make_input((2, 3, 6, 6), torch.float32, seed=20, requires_grad=True)
    w = make_input((4, 3, 3, 3), torch.float32, seed=21, requires_grad=True)
    with dlkernels.backend("triton"), pytest.warns(UserWarning, match="double backward"):
        y = dlkernels.ops.conv2d(x, w, padding=1, activation="relu", pool=("max", 2))
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        gx.square().sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = eager_block(x2, w2, None, 1, 1, activation="relu", pool=("max", 2))
    (gx2,) = torch.autograd.grad(y2.square().sum(), x2, create_graph=True)
    gx2.square().sum().backward()
    torch.testing.assert_close(gx, gx2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-4)


def test_conv_block_signature_is_the_issues():
    """ConvBlock2d has no torch namesake (tests/test_signatures.py exempts it): its signature is issue 10's."""
    import inspect

    params = inspect.signature(dlkernels.nn.ConvBlock2d.__init__).parameters
    expected = [("in_channels", inspect.Parameter.empty), ("out_channels", inspect.Parameter.empty),
                ("kernel_size", inspect.Parameter.empty), ("stride", 1), ("padding", 0), ("bias", True),
                ("activation", "relu"), ("pool", None)]
    assert [(n, p.default) for n, p in params.items() if n != "self"][:len(expected)] == expected
    block = dlkernels.nn.ConvBlock2d(3, 8, 3, 1, 1, False, None, ("max", 2))
    assert block.bias is None and block.activation is None and block.pool == ("max", 2)
    assert set(block.state_dict()) == set(torch.nn.Conv2d(3, 8, 3, bias=False).state_dict())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_runs_in_the_autocast_dtype_as_torch(backend):
    """Under torch.autocast F.conv2d runs in the autocast dtype (bf16 here, with fp32 weights): the drop-in too."""
    torch.manual_seed(0)
    ours = dlkernels.nn.Conv2d(3, 16, 3, padding=1, activation="relu", pool=("max", 2))
    theirs = torch.nn.Conv2d(3, 16, 3, padding=1)
    theirs.load_state_dict(ours.state_dict())
    x = make_input((2, 3, 8, 8), seed=31, requires_grad=True)
    with dlkernels.backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
        expected = F.max_pool2d(torch.relu(theirs(x)), 2)
    assert y.dtype == expected.dtype == torch.bfloat16
    reference = F.max_pool2d(torch.relu(F.conv2d(x.double(), theirs.weight.double(), theirs.bias.double(),
                                                 padding=1)), 2)
    assert_close(y, reference, expected, terms=27)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and ours.weight.grad.dtype == torch.float32
