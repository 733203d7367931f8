"""Batch norm: the Triton kernels (interpreter on CPU) against torch.nn.BatchNorm*, values, running statistics and
gradients, each measured against a float64 reference and held to 2x eager PyTorch's own error."""
import copy
import math
import os
from pathlib import Path

import pytest
import torch

import dlkernels
from dlkernels.testing import assert_close, make_input

TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
OURS_BN = {2: dlkernels.nn.BatchNorm1d, 3: dlkernels.nn.BatchNorm1d, 4: dlkernels.nn.BatchNorm2d,
           5: dlkernels.nn.BatchNorm3d}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial affine parameters and running statistics, the same for every module given the same seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            bias = torch.randn(module.num_features, generator=gen)
            if module.bias is not None:
                module.bias.copy_(bias)
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen))
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)


def check_against_torch(
    shape, dtype, *, channels_last=False, training=True, relu=False, affine=True, track=True, momentum=0.1,
    mean=0.0, std=1.0, steps=2, param_dtype=torch.float32, device="cpu",
):
    """Runs ours (Triton backend), torch in ``dtype`` and torch in float64 for ``steps`` steps and checks every
    output, input/weight/bias gradient and running statistic against the float64 one."""
    c = shape[1]
    kwargs = dict(affine=affine, track_running_stats=track, momentum=momentum)
    ours = OURS_BN[len(shape)](c, activation="relu" if relu else None, **kwargs).to(device, param_dtype)
    eager = TORCH_BN[len(shape)](c, **kwargs).to(device, param_dtype)
    ref = TORCH_BN[len(shape)](c, **kwargs).to(device, torch.float64)
    for m in (ours, eager, ref):
        _randomize(m, seed=1)
        m.train(training)
    fmt = CHANNELS_LAST[len(shape)] if channels_last else torch.contiguous_format
    for step in range(steps):
        x = make_input(shape, dtype, device, seed=step, mean=mean, std=std, memory_format=fmt)
        grad = make_input(shape, dtype, device, seed=1000 + step, memory_format=fmt)
        inputs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
        with dlkernels.backend("triton"):
            y_ours = ours(inputs[0])
            y_ours.backward(grad)
        y_eager = eager(inputs[1])
        y_ref = ref(inputs[2])
        if relu:
            y_eager, y_ref = torch.relu(y_eager), torch.relu(y_ref)
        y_eager.backward(grad)
        y_ref.backward(grad.double())
        if channels_last:
            assert y_ours.is_contiguous(memory_format=fmt), "output lost the channels_last layout"
            assert inputs[0].grad.is_contiguous(memory_format=fmt), "grad_input lost the channels_last layout"
        # In training every output depends on statistics summed over `terms` values (see dlkernels.testing).
        terms = x.numel() // c
        stat_terms = terms if training or not track else 1
        assert_close(y_ours, y_ref, y_eager, terms=stat_terms, name=f"step {step} output")
        assert_close(inputs[0].grad, inputs[2].grad, inputs[1].grad, terms=stat_terms, name=f"step {step} grad_input")
        if affine:
            assert_close(ours.weight.grad, ref.weight.grad, eager.weight.grad, terms=terms, name="grad_weight")
            assert_close(ours.bias.grad, ref.bias.grad, eager.bias.grad, terms=terms, name="grad_bias")
        if track:
            assert_close(ours.running_mean, ref.running_mean, eager.running_mean, terms=terms, name="running_mean")
            assert_close(ours.running_var, ref.running_var, eager.running_var, terms=terms, name="running_var")
            assert int(ours.num_batches_tracked) == int(eager.num_batches_tracked)
        for m in (ours, eager, ref):
            m.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,channels_last",
    [((8, 3), False), ((5, 6, 13), False), ((4, 3, 7, 5), False), ((4, 3, 7, 5), True), ((2, 6, 3, 5, 3), False),
     ((2, 6, 3, 5, 3), True), ((7, 1, 11, 3), False), ((3, 13, 1, 1), False), ((3, 13, 1, 1), True)],
    ids=str,
)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
def test_training_matches_torch(shape, channels_last, dtype, relu):
    check_against_torch(shape, dtype, channels_last=channels_last, relu=relu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,channels_last", [((1, 3, 5, 7), False), ((1, 6, 4, 4), True), ((1, 3), False), ((2, 6, 3, 2, 3), True)],
    ids=str,
)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
def test_eval_matches_torch(shape, channels_last, dtype, relu):
    check_against_torch(shape, dtype, channels_last=channels_last, relu=relu, training=False)


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_affine_and_tracking_options(affine, track):
    check_against_torch((4, 6, 5, 3), torch.float32, affine=affine, track=track)
    check_against_torch((4, 6, 5, 3), torch.float32, affine=affine, track=track, training=False)


def test_momentum_none_is_cumulative_average():
    check_against_torch((6, 3, 4, 4), torch.float32, momentum=None, steps=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_mean_is_stable(dtype):
    """Statistics of 1e4 + randn: a naive sum of squares loses every digit of the variance in fp32."""
    check_against_torch((8, 3, 9, 7), dtype, mean=1e4 if dtype == torch.float32 else 300.0)
    check_against_torch((8, 3, 9, 7), dtype, mean=1e4 if dtype == torch.float32 else 300.0, channels_last=True)


def test_bf16_parameters_and_statistics():
    """A module converted whole to bf16 (bf16 weights and running statistics)."""
    check_against_torch((4, 5, 6, 3), torch.bfloat16, param_dtype=torch.bfloat16)


def test_strided_input_without_dense_layout():
    x = make_input((6, 8, 5, 4), seed=3)[:, ::2]  # every other channel: neither NCHW- nor NHWC-dense
    w, b = make_input(4, seed=4), make_input(4, seed=5)
    with dlkernels.backend("triton"):
        y = dlkernels.ops.batch_norm(x, None, None, w, b, training=True)
    y_ref = torch.nn.functional.batch_norm(x.double(), None, None, w.double(), b.double(), training=True)
    y_eager = torch.nn.functional.batch_norm(x, None, None, w, b, training=True)
    assert_close(y, y_ref, y_eager)


@pytest.mark.parametrize(
    "training,relu,channels_last", [(True, False, False), (True, True, True), (False, True, False)], ids=str
)
def test_gradcheck_float64(training, relu, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = make_input((3, 2, 2, 2), torch.float64, seed=7, memory_format=fmt, requires_grad=True)
    w = make_input(2, torch.float64, seed=8, requires_grad=True)
    b = make_input(2, torch.float64, seed=9, std=0.3, requires_grad=True)
    rm, rv = make_input(2, torch.float64, seed=10), make_input(2, torch.float64, seed=11).abs() + 0.5

    def fn(x, w, b):
        return dlkernels.ops.batch_norm(x, rm.clone(), rv.clone(), w, b, training, activation="relu" if relu else None)

    with dlkernels.backend("triton"):
        assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)


def test_double_backward():
    """create_graph=True (gradient penalties) differentiates through the reference, as torch's own BN allows."""
    x = make_input((3, 2, 4), torch.float64, seed=1, requires_grad=True)
    w = make_input(2, torch.float64, seed=2, mean=1.0, std=0.2, requires_grad=True)
    b = make_input(2, torch.float64, seed=3, requires_grad=True)
    with dlkernels.backend("triton"), pytest.warns(UserWarning, match="double backward"):
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: dlkernels.ops.batch_norm(x, None, None, w, b, True, activation="relu"), (x, w, b),
            fast_mode=True,
        )


def test_empty_batch_leaves_running_stats_alone():
    ours, theirs = dlkernels.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for m in (ours, theirs):
        _randomize(m, seed=4)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    with dlkernels.backend("triton"):
        y = ours(x)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    theirs(torch.randn(0, 3, 4, 4))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))
    assert dlkernels.ops.batch_norm(torch.randn(2, 0, 4), torch.zeros(0), torch.ones(0), training=True).shape == (2, 0, 4)


def test_weight_and_bias_of_shape_1_by_c_as_in_torch():
    x, w, b = make_input((4, 3, 5), seed=1), make_input((1, 3), seed=2), make_input((1, 3), seed=3)
    with dlkernels.backend("triton"):
        y = dlkernels.ops.batch_norm(x, None, None, w, b, training=True)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, w, b, training=True))


def test_running_stats_update_in_place():
    x = make_input((5, 3, 4), seed=2)
    rm, rv = torch.zeros(3), torch.ones(3)
    ptrs = (rm.data_ptr(), rv.data_ptr())
    with dlkernels.backend("triton"):
        dlkernels.ops.batch_norm(x, rm, rv, training=True, momentum=0.3)
    assert (rm.data_ptr(), rv.data_ptr()) == ptrs
    var, mean = torch.var_mean(x.double(), dim=(0, 2), correction=1)
    torch.testing.assert_close(rm.double(), 0.3 * mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv.double(), 0.7 + 0.3 * var, rtol=1e-6, atol=1e-7)


def test_opcheck():
    x = make_input((4, 3, 5, 2), seed=1)
    w, b = make_input(3, seed=2), make_input(3, seed=3)
    rm, rv = make_input(3, seed=4), make_input(3, seed=5).abs() + 0.5
    with dlkernels.backend("triton"):
        for training in (True, False):
            torch.library.opcheck(
                torch.ops.dlkernels.batch_norm_forward.default, (x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, True)
            )
        out, stats = torch.ops.dlkernels.batch_norm_forward(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, True)
        g = make_input(x.shape, seed=6)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            torch.library.opcheck(
                torch.ops.dlkernels.batch_norm_backward.default, (g, x, w, b, stats, True, True, mask)
            )


def test_fullgraph_compile_small_model():
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), dlkernels.nn.BatchNorm2d(4, activation="relu"), torch.nn.Conv2d(4, 2, 1),
        dlkernels.nn.BatchNorm2d(2),
    )
    eager_model = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = make_input((3, 3, 6, 5), seed=12)
    with dlkernels.backend("triton"):
        y = compiled(x)
        y.square().sum().backward()
        y_eager = eager_model(x)
        y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(model[1].running_var, eager_model[1].running_var)
    torch.testing.assert_close(model[0].weight.grad, eager_model[0].weight.grad)


def test_module_is_drop_in():
    ours = dlkernels.nn.BatchNorm2d(5, momentum=0.2, activation="relu")
    theirs = torch.nn.BatchNorm2d(5, momentum=0.2)
    assert isinstance(ours, torch.nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _randomize(theirs, seed=3)
    theirs.num_batches_tracked.fill_(7)
    ours.load_state_dict(theirs.state_dict())
    assert int(ours.num_batches_tracked) == 7
    theirs.load_state_dict(ours.state_dict())
    assert "activation='relu'" in repr(ours)
    with pytest.raises(ValueError, match="activation"):
        dlkernels.nn.BatchNorm1d(3, activation="gelu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,channels_last", [((32, 64, 28, 28), False), ((32, 64, 28, 28), True),
                                                 ((64, 6, 28, 28), False), ((256, 2048, 7, 7), True),
                                                 ((4, 96, 5, 7, 3), True), ((512, 300), False)], ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
def test_gpu_matches_torch(shape, channels_last, dtype, relu):
    check_against_torch(shape, dtype, channels_last=channels_last, relu=relu, device="cuda")
    check_against_torch(shape, dtype, channels_last=channels_last, relu=relu, device="cuda", training=False, steps=1)


@pytest.mark.gpu
def test_gpu_more_than_2_to_the_31_elements():
    """64-bit offsets: the last elements of a tensor past 2^31 elements are normalized like the first."""
    x = torch.randn(2, 4, 2**28 + 7, device="cuda", dtype=torch.bfloat16)
    with dlkernels.backend("triton"):
        y = dlkernels.ops.batch_norm(x, None, None, training=True)
    tail = x[:, :, -4096:].float()
    mean = x.float().mean(dim=(0, 2), keepdim=True)
    var = x.float().var(dim=(0, 2), keepdim=True, correction=0)
    torch.testing.assert_close(y[:, :, -4096:].float(), (tail - mean) * torch.rsqrt(var + 1e-5), atol=2e-2, rtol=1e-2)


class TestBadInput:
    def test_wrong_dims(self):
        with pytest.raises(ValueError, match="4D"):
            dlkernels.nn.BatchNorm2d(3)(make_input((2, 3, 4)))
        with pytest.raises(ValueError, match="at least 2 dims"):
            dlkernels.ops.batch_norm(make_input(5), torch.zeros(5), torch.ones(5))

    @pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
    def test_channel_mismatch(self, name):
        args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(3), bias=torch.zeros(3))
        args[name] = torch.ones(4)
        with pytest.raises(RuntimeError, match=name):
            dlkernels.ops.batch_norm(make_input((2, 3, 4)), training=True, **args)

    def test_dtype_mismatch(self):
        with pytest.raises(RuntimeError, match="weight"):
            dlkernels.ops.batch_norm(make_input((2, 3)), None, None, torch.ones(3, dtype=torch.float64), training=True)
        with pytest.raises(RuntimeError, match="running_mean"):
            dlkernels.ops.batch_norm(make_input((2, 3)), torch.zeros(3, dtype=torch.float16), torch.ones(3))

    def test_device_mismatch(self):
        with pytest.raises(RuntimeError, match="bias is on meta"):
            dlkernels.ops.batch_norm(make_input((2, 3)), None, None, None, torch.zeros(3, device="meta"), training=True)

    def test_integer_input(self):
        with pytest.raises(NotImplementedError, match="dtype"):
            dlkernels.ops.batch_norm(torch.ones(2, 3, dtype=torch.int64), torch.zeros(3), torch.ones(3))

    def test_single_value_per_channel_in_training(self):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            dlkernels.nn.BatchNorm1d(3)(make_input((1, 3)))
        dlkernels.nn.BatchNorm1d(3).eval()(make_input((1, 3)))  # fine in eval

    def test_running_stats_both_or_neither(self):
        with pytest.raises(ValueError, match="running_mean and running_var"):
            dlkernels.ops.batch_norm(make_input((2, 3)), torch.zeros(3), None, training=True)

    def test_eval_needs_running_stats(self):
        with pytest.raises(RuntimeError, match="running_mean must be defined"):
            dlkernels.ops.batch_norm(make_input((2, 3)), None, None, training=False)

    def test_bad_activation(self):
        with pytest.raises(ValueError, match="activation"):
            dlkernels.ops.batch_norm(make_input((2, 3)), None, None, training=True, activation="tanh")


# ---------------------------------------------------------------------------------------------------------------
# Issue 7: strided per-channel tensors, NaN/Inf as torch, torch's errors before any mutation, drop-in arguments.

BACKENDS = ["reference", "triton"]


def _strided(values: torch.Tensor, kind: str) -> torch.Tensor:
    """``values`` (C,) as a tensor of the given memory kind, holding the same values."""
    c = values.numel()
    if kind == "contiguous":
        return values.clone()
    if kind == "sliced":  # every other element of a 2C buffer
        buf = torch.full((2 * c,), -7.0, dtype=values.dtype)
        buf[::2] = values
        return buf[::2]
    if kind == "column":  # a column of a (C, 2) buffer
        buf = torch.full((c, 2), -7.0, dtype=values.dtype)
        buf[:, 1] = values
        return buf[:, 1]
    if kind == "expanded":  # stride 0: one value for every channel
        return values[:1].clone().expand(c)
    raise ValueError(kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["sliced", "column", "expanded"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_strided_per_channel_tensors(backend, training, kind, channels_last):
    """Sliced, column and (read-only) expanded weight, bias and running statistics give torch's outputs and
    gradients, and the running statistics are updated in the caller's tensor, in the right slots only."""
    c = 4
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = make_input((3, c, 2, 3), seed=1, mean=0.5, memory_format=fmt)
    values = dict(w=make_input(c, seed=2, mean=1.0, std=0.3), b=make_input(c, seed=3),
                  rm=make_input(c, seed=4), rv=make_input(c, seed=5).abs() + 0.5)
    stat_kind = "sliced" if kind == "expanded" and training else kind  # expanded stats are refused in training
    ours = dict(w=_strided(values["w"], kind), b=_strided(values["b"], kind),
                rm=_strided(values["rm"], stat_kind), rv=_strided(values["rv"], stat_kind))
    theirs = {k: _strided(v, kind if k in "wb" else stat_kind).contiguous() for k, v in values.items()}
    bases = [t._base for t in (ours["rm"], ours["rv"])]
    before = [b.clone() for b in bases]
    ours["w"].requires_grad_(), ours["b"].requires_grad_()
    theirs["w"].requires_grad_(), theirs["b"].requires_grad_()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    g = make_input(x.shape, seed=6, memory_format=fmt)
    with dlkernels.backend(backend):
        y = dlkernels.ops.batch_norm(xs[0], ours["rm"], ours["rv"], ours["w"], ours["b"], training, 0.3)
        y.backward(g)
    y_ref = torch.nn.functional.batch_norm(xs[1], theirs["rm"], theirs["rv"], theirs["w"], theirs["b"], training, 0.3)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    if kind != "expanded":  # an expanded parameter's gradient is summed over its channels by autograd
        torch.testing.assert_close(ours["w"].grad, theirs["w"].grad)
        torch.testing.assert_close(ours["b"].grad, theirs["b"].grad)
    for name in ("rm", "rv"):
        torch.testing.assert_close(ours[name], theirs[name], msg=f"{name} not updated in the caller's tensor")
    for base, old, view in zip(bases, before, (ours["rm"], ours["rv"])):
        untouched = torch.ones_like(base, dtype=torch.bool)
        untouched.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(False)
        assert torch.equal(base[untouched], old[untouched]), "wrote outside the running statistics' slots"


def _pattern(t: torch.Tensor) -> torch.Tensor:
    """Where a tensor is NaN (2), +inf (1), -inf (-1) or finite (0)."""
    t = t.detach().double()
    return torch.where(t.isnan(), 2, torch.where(t.isposinf(), 1, torch.where(t.isneginf(), -1, 0)))


NONFINITE = [("x_first", "nan"), ("x_first", "inf"), ("x_later", "inf"), ("x_later", "-inf"), ("x_both", "inf"),
             ("running_mean", "inf"), ("running_mean", "nan"), ("running_var", "inf"), ("running_var", "nan"),
             ("running_var", "-inf"), ("bias", "inf"), ("weight", "nan")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where,value", NONFINITE, ids=lambda v: str(v))
@pytest.mark.parametrize("training,relu", [(True, False), (True, True), (False, True)], ids=str)
@pytest.mark.parametrize("shape", [(4, 3, 5), (6, 3)], ids=str)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_and_inf_propagate_as_in_torch(backend, where, value, training, relu, shape):
    """The same NaN/+inf/-inf pattern as torch in the output, running statistics and every gradient; finite values
    as torch's. (An inf in the first tile used to make the center inf and every output NaN, tl.maximum dropped NaN
    from the variance and from the fused ReLU, and +inf gave -inf outputs.)"""
    v = float(value)
    x = make_input(shape, seed=1)
    rm, rv = make_input(3, seed=2), make_input(3, seed=3).abs() + 0.5
    w, b = make_input(3, seed=4, mean=1.0, std=0.3), make_input(3, seed=5)
    if where.startswith("x"):
        x[(0, 1) if len(shape) == 2 else (0, 1, 0)] = v  # sample 0: the tile the kernels center on
        if where != "x_first":
            x[(-1, 1) if len(shape) == 2 else (-1, 1, -1)] = v
    else:
        dict(running_mean=rm, running_var=rv, weight=w, bias=b)[where][1] = v
    grad = make_input(shape, seed=6)
    results = []
    for impl in ("torch", backend):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        rmi, rvi = rm.clone(), rv.clone()
        if impl == "torch":
            y = torch.nn.functional.batch_norm(xi, rmi, rvi, wi, bi, training, 0.1)
            y = torch.relu(y) if relu else y
            y.backward(grad)
        else:
            with dlkernels.backend(impl):
                y = dlkernels.ops.batch_norm(xi, rmi, rvi, wi, bi, training, 0.1, activation="relu" if relu else None)
                y.backward(grad)
        results.append(dict(output=y, running_mean=rmi, running_var=rvi, grad_input=xi.grad, grad_weight=wi.grad,
                            grad_bias=bi.grad))
    expected, got = results
    for name in expected:
        assert torch.equal(_pattern(got[name]), _pattern(expected[name])), (
            f"{name}: NaN/inf pattern {_pattern(got[name]).flatten().tolist()} != torch's "
            f"{_pattern(expected[name]).flatten().tolist()}"
        )
        torch.testing.assert_close(got[name], expected[name], equal_nan=True, rtol=1e-4, atol=1e-4)


def _x(shape=(4, 3, 5), dtype=torch.float32, device="cpu"):
    return make_input(shape, dtype, seed=1).to(device)


def _stats(c=3, dtype=torch.float32, device="cpu"):
    return [make_input(c, dtype, seed=2).to(device), (make_input(c, seed=3).abs() + 0.5).to(dtype).to(device)]


def _params(c=3, dtype=torch.float32):
    return [make_input(c, dtype, seed=4, mean=1.0, std=0.3), make_input(c, dtype, seed=5)]


TORCH = "torch's error"  # torch raises this exception type, and so must we
OURS = "dlkernels error"  # torch's error is unhelpful or absent: ours, with a message naming the argument
RESULT = "torch's result"

# (id, arguments of F.batch_norm as a function of nothing (fresh tensors each call), expectation, exception, match)
FUNCTIONAL_CASES = [
    ("input_a_list", lambda: ([[1.0, 2.0]], None, None, None, None, True), OURS, TypeError, "input"),
    ("input_1d", lambda: (torch.randn(5), torch.zeros(5), torch.ones(5)), OURS, ValueError, "input"),
    ("input_0d", lambda: (torch.tensor(1.0), None, None, None, None, True), OURS, ValueError, "input"),
    ("input_int64", lambda: (torch.ones(4, 3, dtype=torch.long), *_stats()), TORCH, NotImplementedError, "dtype"),
    ("input_bool", lambda: (torch.ones(4, 3, dtype=torch.bool), None, None, None, None, True), TORCH,
     NotImplementedError, "dtype"),
    ("input_complex", lambda: (torch.ones(4, 3, dtype=torch.cfloat), None, None, None, None, True), TORCH,
     NotImplementedError, "dtype"),
    ("weight_4_elements", lambda: (_x(), None, None, torch.ones(4), None, True), TORCH, RuntimeError, "weight"),
    ("bias_4_elements", lambda: (_x(), None, None, None, torch.ones(4), True), TORCH, RuntimeError, "bias"),
    ("running_mean_4_elements", lambda: (_x(), torch.zeros(4), torch.ones(3), None, None, True), TORCH,
     RuntimeError, "running_mean"),
    ("running_var_4_elements_eval", lambda: (_x(), torch.zeros(3), torch.ones(4)), TORCH, RuntimeError,
     "running_var"),
    ("running_mean_2d", lambda: (_x(), torch.zeros(1, 3), torch.ones(1, 3), None, None, True), TORCH, RuntimeError,
     "running_mean"),
    ("weight_float64", lambda: (_x(), None, None, torch.ones(3, dtype=torch.float64), None, True), TORCH,
     RuntimeError, "weight"),
    ("running_mean_float16", lambda: (_x(), torch.zeros(3, dtype=torch.half), torch.ones(3)), TORCH, RuntimeError,
     "running_mean"),
    ("bf16_weight_fp32_stats", lambda: (_x(dtype=torch.bfloat16), *_stats(), *_params(dtype=torch.bfloat16), True),
     TORCH, RuntimeError, "mixed dtype"),
    ("float64_input_fp32_weight", lambda: (_x(dtype=torch.float64), None, None, torch.ones(3), None, True), TORCH,
     RuntimeError, "weight"),
    ("bf16_input_fp32_params", lambda: (_x(dtype=torch.bfloat16), *_stats(), *_params(), True), RESULT, None, None),
    ("fp16_input_fp16_params_eval", lambda: (_x(dtype=torch.half), *_stats(dtype=torch.half),
                                             *_params(dtype=torch.half), False), RESULT, None, None),
    ("running_mean_on_meta", lambda: (_x(), torch.zeros(3, device="meta"), torch.ones(3), None, None, True), TORCH,
     RuntimeError, "running_mean"),
    ("input_on_meta_params_on_cpu", lambda: (_x(device="meta"), *_stats(), *_params(), True), TORCH, RuntimeError,
     "meta"),
    ("everything_on_meta", lambda: (_x(device="meta"), *_stats(device="meta"), None, None, True), RESULT, None,
     None),
    ("one_value_per_channel", lambda: (_x((1, 3)), None, None, None, None, True), TORCH, ValueError,
     "more than 1 value"),
    ("one_value_per_channel_3d", lambda: (_x((1, 3, 1)), None, None, None, None, True), TORCH, ValueError,
     "more than 1 value"),
    ("no_channels_one_sample", lambda: (_x((1, 0)), None, None, None, None, True), TORCH, ValueError,
     "more than 1 value"),
    ("one_value_per_channel_eval", lambda: (_x((1, 3)), *_stats()), RESULT, None, None),
    ("eps_0_training", lambda: (_x(), *_stats(), None, None, True, 0.1, 0.0), TORCH, ValueError, "eps"),
    ("eps_negative_training", lambda: (_x(), None, None, None, None, True, 0.1, -1e-5), TORCH, ValueError, "eps"),
    ("eps_negative_eval", lambda: (_x(), *_stats(), None, None, False, 0.1, -1e-5), TORCH, ValueError, "eps"),
    ("eps_0_eval", lambda: (_x(), *_stats(), None, None, False, 0.1, 0.0), RESULT, None, None),
    ("eps_nan", lambda: (_x(), *_stats(), None, None, True, 0.1, float("nan")), RESULT, None, None),
    ("eps_0d_tensor", lambda: (_x(), *_stats(), None, None, True, 0.1, torch.tensor(1e-3)), RESULT, None, None),
    ("eps_1d_tensor", lambda: (_x(), *_stats(), None, None, True, 0.1, torch.tensor([1e-3])), TORCH, TypeError,
     "eps"),
    ("eps_none", lambda: (_x(), *_stats(), None, None, True, 0.1, None), TORCH, TypeError, ""),
    ("momentum_0d_tensor", lambda: (_x(), *_stats(), *_params(), True, torch.tensor(0.4)), RESULT, None, None),
    ("momentum_1d_tensor", lambda: (_x(), *_stats(), None, None, True, torch.tensor([0.4])), TORCH, TypeError,
     "momentum"),
    ("momentum_none", lambda: (_x(), *_stats(), None, None, True, None), TORCH, TypeError, "momentum"),
    ("momentum_a_string", lambda: (_x(), *_stats(), None, None, True, "0.1"), TORCH, TypeError, "momentum"),
    ("momentum_nan", lambda: (_x(), *_stats(), None, None, True, float("nan")), RESULT, None, None),
    ("momentum_int_1", lambda: (_x(), *_stats(), None, None, True, 1), RESULT, None, None),
    ("training_none", lambda: (_x(), *_stats(), None, None, None), TORCH, TypeError, "training"),
    ("training_int", lambda: (_x(), *_stats(), None, None, 1), TORCH, TypeError, "training"),
    ("running_mean_without_var_training", lambda: (_x(), torch.zeros(3), None, None, None, True), TORCH, ValueError,
     "running_mean and running_var"),
    ("running_var_without_mean_eval", lambda: (_x(), None, torch.ones(3)), TORCH, RuntimeError, "running_mean"),
    ("no_running_stats_eval", lambda: (_x(), None, None), TORCH, RuntimeError, "running_mean"),
    ("running_mean_requires_grad", lambda: (_x(), torch.zeros(3, requires_grad=True), torch.ones(3), None, None,
                                            True), TORCH, RuntimeError, "running_mean"),
    ("weight_1_by_c", lambda: (_x(), *_stats(), torch.ones(1, 3), torch.zeros(1, 3), True), RESULT, None, None),
    ("weight_c_by_1", lambda: (_x(), *_stats(), torch.ones(3, 1), None, True), RESULT, None, None),
    ("weight_expanded", lambda: (_x(), *_stats(), torch.tensor([1.5]).expand(3), None, True), RESULT, None, None),
    ("running_stats_expanded_eval", lambda: (_x(), torch.tensor([0.3]).expand(3), torch.tensor([2.0]).expand(3)),
     RESULT, None, None),
    # torch's in-place update of a stride-0 statistic keeps whichever channel's thread writes last.
    ("running_mean_expanded_training", lambda: (_x(), torch.zeros(1).expand(3), torch.ones(3), None, None, True),
     OURS, RuntimeError, "running_mean is expanded"),
    ("empty_batch", lambda: (_x((0, 3, 4)), *_stats(), *_params(), True), RESULT, None, None),
    ("no_channels", lambda: (_x((2, 0, 4)), torch.zeros(0), torch.ones(0), None, None, True), RESULT, None, None),
    ("channels_last_strided_input", lambda: (_x((4, 6, 3, 2)).to(memory_format=torch.channels_last)[:, ::2],
                                             *_stats(), *_params(), True), RESULT, None, None),
    ("expanded_input", lambda: (_x((1, 3, 1)).expand(4, 3, 5), *_stats(), *_params(), True), RESULT, None, None),
]


def _call(fn, args, **kwargs):
    return fn(*args, **kwargs)


def _compare_results(ours, theirs, args_ours, args_theirs):
    assert ours.device == theirs.device and ours.shape == theirs.shape and ours.dtype == theirs.dtype
    if ours.device.type != "meta":
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        for a, b in zip(args_ours, args_theirs):  # running statistics, updated in place
            if isinstance(a, torch.Tensor) and a.device.type != "meta":
                torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FUNCTIONAL_CASES, ids=[c[0] for c in FUNCTIONAL_CASES])
def test_bad_input_matrix_functional(case, backend):
    """Every case's class is checked: torch's own exception type (and torch must raise it too), a dlkernels error
    naming the argument, or torch's result; a refused call leaves the running statistics as they were."""
    name, make_args, expect, exc, match = case
    torch_args, our_args = make_args(), make_args()
    snapshot = [a.clone() if isinstance(a, torch.Tensor) and a.device.type != "meta" else a for a in our_args]
    if expect == TORCH:
        with pytest.raises(exc):
            torch.nn.functional.batch_norm(*torch_args)
    if expect == RESULT:
        theirs = torch.nn.functional.batch_norm(*torch_args)
    with dlkernels.backend(backend):
        if expect == RESULT:
            _compare_results(dlkernels.ops.batch_norm(*our_args), theirs, our_args, torch_args)
            return
        with pytest.raises(exc, match=match):
            dlkernels.ops.batch_norm(*our_args)
    for before, after in zip(snapshot, our_args):
        if isinstance(before, torch.Tensor) and before.device.type != "meta":
            assert torch.equal(before, after), "a refused call changed an argument"


def _module_pair(cls_name, *args, **kwargs):
    ours = getattr(dlkernels.nn, cls_name)(*args, **kwargs)
    theirs = getattr(torch.nn, cls_name)(*args, **kwargs)
    return ours, theirs


MODULE_CASES = [
    ("bn2d_on_3d_input", lambda: (_module_pair("BatchNorm2d", 3), _x()), TORCH, ValueError, "4D"),
    ("bn1d_on_4d_input", lambda: (_module_pair("BatchNorm1d", 3), _x((2, 3, 4, 4))), TORCH, ValueError, "2D or 3D"),
    ("bn3d_on_4d_input", lambda: (_module_pair("BatchNorm3d", 3), _x((2, 3, 4, 4))), TORCH, ValueError, "5D"),
    ("num_features_mismatch", lambda: (_module_pair("BatchNorm2d", 4), _x((2, 3, 4, 4))), TORCH, RuntimeError,
     "should contain 3 elements not 4"),
    ("float64_module_float32_input", lambda: (_module_pair("BatchNorm2d", 3, dtype=torch.float64),
                                              _x((2, 3, 4, 4))), TORCH, RuntimeError, "mixed dtype"),
    ("int_input", lambda: (_module_pair("BatchNorm1d", 3), torch.ones(4, 3, dtype=torch.long)), TORCH,
     NotImplementedError, "dtype"),
    ("eps_0_training", lambda: (_module_pair("BatchNorm2d", 3, eps=0.0), _x((2, 3, 4, 4))), TORCH, ValueError,
     "eps"),
    ("one_value_per_channel", lambda: (_module_pair("BatchNorm1d", 3), _x((1, 3))), TORCH, ValueError,
     "more than 1 value"),
    ("module_on_meta_input_on_cpu", lambda: (_module_pair("BatchNorm2d", 3, device="meta"), _x((2, 3, 4, 4))),
     TORCH, RuntimeError, "meta"),
    ("module_and_input_on_meta", lambda: (_module_pair("BatchNorm2d", 3, device="meta"),
                                          _x((2, 3, 4, 4), device="meta")), RESULT, None, None),
    ("bias_false", lambda: (_module_pair("BatchNorm2d", 3, bias=False), _x((2, 3, 4, 4))), RESULT, None, None),
    ("affine_false_bias_false", lambda: (_module_pair("BatchNorm1d", 3, affine=False, bias=False), _x()), RESULT,
     None, None),
    ("momentum_0d_tensor", lambda: (_module_pair("BatchNorm3d", 3, momentum=torch.tensor(0.3)),
                                    _x((2, 3, 2, 2, 3))), RESULT, None, None),
    ("momentum_none", lambda: (_module_pair("BatchNorm1d", 3, momentum=None), _x()), RESULT, None, None),
    ("not_tracking", lambda: (_module_pair("BatchNorm2d", 3, track_running_stats=False), _x((2, 3, 4, 4))), RESULT,
     None, None),
    ("channels_last_3d", lambda: (_module_pair("BatchNorm3d", 3),
                                  _x((2, 3, 2, 2, 3)).to(memory_format=torch.channels_last_3d)), RESULT, None, None),
    ("empty_batch", lambda: (_module_pair("BatchNorm2d", 3), _x((0, 3, 2, 2))), RESULT, None, None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_bad_input_matrix_modules(case, training, backend):
    """The drop-in modules: torch's exception types, or torch's outputs, running statistics and batch count; a
    refused call changes no buffer (torch counts the batch before failing; validating first is deliberate)."""
    name, make, expect, exc, match = case
    (ours, theirs), x = make()
    if not training and name in ("eps_0_training", "one_value_per_channel"):
        expect = RESULT  # fine in eval
    ours.load_state_dict(theirs.state_dict()) if x.device.type != "meta" else None
    ours.train(training), theirs.train(training)
    buffers = {k: v.clone() for k, v in ours.state_dict().items()}
    if expect == TORCH:
        with pytest.raises(exc):
            theirs(x)
        with dlkernels.backend(backend), pytest.raises(exc, match=match):
            ours(x)
        for k, v in ours.state_dict().items():
            assert v.device.type == "meta" or torch.equal(v, buffers[k]), f"a refused call changed {k}"
        return
    for _ in range(2):
        y_theirs = theirs(x)
        with dlkernels.backend(backend):
            y_ours = ours(x)
        _compare_results(y_ours, y_theirs, [], [])
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert a.device == b.device and a.dtype == b.dtype, k
        if a.device.type != "meta":
            torch.testing.assert_close(a, b, msg=k)


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_signatures_match_torch(name):
    """Every constructor and forward argument of the installed torch's module, with its default and kind, so a new
    torch argument cannot slip by; only ``activation`` (keyword-only) is added."""
    import inspect

    ours, theirs = getattr(dlkernels.nn, name), getattr(torch.nn, name)
    ours_init = dict(inspect.signature(ours.__init__).parameters)
    assert ours_init.pop("activation").kind is inspect.Parameter.KEYWORD_ONLY
    theirs_init = dict(inspect.signature(theirs.__init__).parameters)
    assert [(p.name, p.kind, p.default) for p in ours_init.values()] == \
        [(p.name, p.kind, p.default) for p in theirs_init.values()]
    assert list(inspect.signature(ours.forward).parameters) == list(inspect.signature(theirs.forward).parameters)
    assert list(inspect.signature(dlkernels.ops.batch_norm).parameters)[:8] == \
        list(inspect.signature(torch.nn.functional.batch_norm).parameters)


# ---------------------------------------------------------------------------------------------------------------
# Property tests (hypothesis; `pytest -m fuzz` runs the long profile): shapes, layouts and strides of every
# argument, dtypes, NaN/inf placement and option combinations against float64 torch, by the tolerance rule.

from hypothesis import given, strategies as st  # noqa: E402


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout (the kernels must not care)."""
    if layout == "channels_last" and x.dim() in (4, 5):
        return x.contiguous(memory_format=CHANNELS_LAST[x.dim()])
    if layout == "permuted" and x.dim() >= 3:  # dense, but neither NC... nor channels-last
        return x.transpose(-1, 0).contiguous().transpose(-1, 0)
    if layout == "batch_expanded":  # stride 0 along the batch (the values repeat along it)
        return x[:1].expand(x.shape)
    if layout == "sliced":  # every other element of the last dim of a twice-as-wide buffer
        buf = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        buf[..., ::2] = x
        return buf[..., ::2]
    return x.clone()


def _check_nonfinite_aware(name, ours, ref, eager, terms):
    """NaN/inf exactly where eager torch has them; every finite entry within the tolerance rule of float64."""
    expected = _pattern(eager)
    assert torch.equal(_pattern(ours), expected), f"{name}: NaN/inf pattern differs from torch's"
    finite = expected == 0
    if finite.any():
        assert_close(ours.detach()[finite], ref.detach()[finite], eager.detach()[finite], terms=terms, name=name)


@st.composite
def _functional_cases(draw):
    dims = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 4)), draw(st.integers(1, 5))] + [draw(st.integers(1, 3)) for _ in range(dims - 2)]
    training = draw(st.booleans())
    if training and math.prod([shape[0], *shape[2:]]) == 1:
        shape[0] = 2
    numel = math.prod(shape)
    kinds = ["contiguous", "sliced", "column", "expanded"]
    return dict(
        shape=tuple(shape), training=training,
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "permuted", "sliced", "batch_expanded"])),
        affine=draw(st.booleans()), with_bias=draw(st.booleans()), with_running=draw(st.booleans()) or not training,
        momentum=draw(st.sampled_from([0.1, 0.0, 1.0, 0.6, "tensor"])), relu=draw(st.booleans()),
        kinds={k: draw(st.sampled_from(kinds if k in "wb" or not training else kinds[:3]))
               for k in ("w", "b", "rm", "rv")},
        nonfinite=draw(st.sampled_from([None, None, None, "nan", "inf", "-inf"])),
        position=draw(st.integers(0, numel - 1)), seed=draw(st.integers(0, 2**16)),
        mean=draw(st.sampled_from([0.0, 0.0, 3.0, -50.0])),
    )


@pytest.mark.fuzz
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@given(case=_functional_cases())
def test_property_functional_matches_float64_torch(case):
    """ops.batch_norm (Triton backend) vs torch's F.batch_norm in float64 (values) and in the same dtype (error bar,
    NaN/inf pattern): outputs, running statistics and the gradients of input, weight and bias."""
    shape, training, dtype, c = case["shape"], case["training"], case["dtype"], case["shape"][1]
    x64 = make_input(shape, torch.float64, seed=case["seed"], mean=case["mean"])
    if case["nonfinite"] is not None:
        x64.view(-1)[case["position"]] = float(case["nonfinite"])
    if case["layout"] == "batch_expanded":  # stride 0 along the batch: every sample is sample 0
        x64 = x64[:1].expand(shape).clone()
    grad64 = make_input(shape, torch.float64, seed=case["seed"] + 1)
    per_channel = dict(w=make_input(c, torch.float64, seed=case["seed"] + 2, mean=1.0, std=0.3),
                       b=make_input(c, torch.float64, seed=case["seed"] + 3),
                       rm=make_input(c, torch.float64, seed=case["seed"] + 4),
                       rv=make_input(c, torch.float64, seed=case["seed"] + 5).abs() + 0.5)
    if not case["affine"]:
        per_channel.pop("w")
    if not case["with_bias"]:
        per_channel.pop("b")
    if not case["with_running"]:
        per_channel.pop("rm"), per_channel.pop("rv")
    momentum = torch.tensor(0.3) if case["momentum"] == "tensor" else case["momentum"]
    param_dtype = torch.float32 if dtype != torch.float32 else dtype
    runs = {}
    for impl, x_dtype, p_dtype in (("ours", dtype, param_dtype), ("eager", dtype, param_dtype),
                                   ("ref", torch.float64, torch.float64)):
        x = _layout(x64.to(x_dtype), case["layout"] if impl == "ours" else "contiguous").requires_grad_()
        t = {k: v.to(p_dtype) for k, v in per_channel.items()}
        t = {k: _strided(v, case["kinds"][k]) for k, v in t.items()}  # expanded: one value for every channel
        if impl != "ours":
            t = {k: v.contiguous() for k, v in t.items()}
        for k in ("w", "b"):
            if k in t:
                t[k].requires_grad_()
        args = (x, t.get("rm"), t.get("rv"), t.get("w"), t.get("b"), training, momentum)
        if impl == "ours":
            with dlkernels.backend("triton"):
                y = dlkernels.ops.batch_norm(*args, activation="relu" if case["relu"] else None)
                y.backward(grad64.to(x_dtype))
        else:
            y = torch.nn.functional.batch_norm(*args)
            y = torch.relu(y) if case["relu"] else y
            y.backward(grad64.to(x_dtype))
        runs[impl] = dict(output=y, grad_input=x.grad, **{f"grad_{k}": t[k].grad for k in ("w", "b") if k in t},
                          **{k: t[k] for k in ("rm", "rv") if k in t})
    terms = math.prod(shape) // c
    for name in runs["ref"]:
        stat_terms = terms if training or name.startswith("grad_") and name != "grad_input" else 1
        _check_nonfinite_aware(name, runs["ours"][name], runs["ref"][name], runs["eager"][name], stat_terms)


@st.composite
def _module_cases(draw):
    dims = draw(st.integers(2, 5))
    shape = [draw(st.integers(2, 4)), draw(st.integers(1, 4))] + [draw(st.integers(1, 3)) for _ in range(dims - 2)]
    return dict(
        shape=tuple(shape), dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        channels_last=draw(st.booleans()) and dims >= 4, affine=draw(st.booleans()), bias=draw(st.booleans()),
        track=draw(st.booleans()), momentum=draw(st.sampled_from([None, 0.1, 0.5, "tensor"])),
        relu=draw(st.booleans()), modes=draw(st.sampled_from([(True, True), (True, False), (False, True)])),
    )


@pytest.mark.fuzz
@given(case=_module_cases())
def test_property_modules_match_float64_torch(case):
    """The drop-in modules over option combinations (affine, bias, track_running_stats, momentum None/float/0-d
    tensor, fused ReLU, train/eval sequences) against torch's modules in float64, by the tolerance rule."""
    momentum = torch.tensor(0.4) if case["momentum"] == "tensor" else case["momentum"]
    dtype, shape = case["dtype"], case["shape"]
    kwargs = dict(affine=case["affine"], track_running_stats=case["track"], momentum=momentum, bias=case["bias"])
    c = shape[1]
    ours = OURS_BN[len(shape)](c, activation="relu" if case["relu"] else None, **kwargs)
    eager, ref = TORCH_BN[len(shape)](c, **kwargs), TORCH_BN[len(shape)](c, **kwargs).double()
    for m in (ours, eager, ref):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5)
    fmt = CHANNELS_LAST[len(shape)] if case["channels_last"] else torch.contiguous_format
    for step, training in enumerate(case["modes"]):
        x = make_input(shape, dtype, seed=step, memory_format=fmt)
        g = make_input(shape, dtype, seed=10 + step, memory_format=fmt)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
        outs = []
        for m, xi in zip((ours, eager, ref), xs):
            m.train(training)
            m.zero_grad()
            with dlkernels.backend("triton"):
                y = m(xi)
            y = torch.relu(y) if case["relu"] and m is not ours else y
            y.backward(g.to(y.dtype))
            outs.append(y)
        batch_stats = training or not case["track"]
        terms = x.numel() // c
        assert_close(outs[0], outs[2], outs[1], terms=terms if batch_stats else 1, name=f"step {step} output")
        assert_close(xs[0].grad, xs[2].grad, xs[1].grad, terms=terms if batch_stats else 1, name="grad_input")
        for name, p in ours.named_parameters():
            assert_close(p.grad, dict(ref.named_parameters())[name].grad, dict(eager.named_parameters())[name].grad,
                         terms=terms, name=f"grad {name}")
        for name, buf in ours.named_buffers():
            if name == "num_batches_tracked":
                assert int(buf) == int(eager.num_batches_tracked)
            else:
                assert_close(buf, dict(ref.named_buffers())[name], dict(eager.named_buffers())[name], terms=terms,
                             name=name)


def _module_db_inputs():
    from torch.testing._internal.common_modules import module_db

    cases = []
    for info in module_db:
        if info.module_cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d):
            inputs = info.module_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=True, training=True)
            cases += [pytest.param(info.module_cls, i, id=f"{info.module_cls.__name__}-{i.desc or 'default'}")
                      for i in inputs]
    return cases


@pytest.mark.parametrize("cls,module_input", _module_db_inputs())
def test_pytorch_module_db_inputs(cls, module_input):
    """PyTorch's own test inputs for BatchNorm1d/2d/3d (common_modules.module_db): the drop-in (Triton backend)
    against torch's module in float64 and float32, for outputs, every gradient, running statistics and the batch
    count, over a training step and then an eval step."""
    ctor, fwd = module_input.constructor_input, module_input.forward_input
    ours = getattr(dlkernels.nn, cls.__name__)(*ctor.args, **ctor.kwargs)
    eager = cls(*ctor.args, **ctor.kwargs)
    ref = cls(*ctor.args, **ctor.kwargs).double()
    for m in (ours, eager, ref):
        _randomize(m, seed=5)
    x = fwd.args[0].detach()
    for step, training in enumerate((True, False)):
        for m in (ours, eager, ref):
            m.train(training)
        x_step = x + step
        xs = [x_step.clone().requires_grad_(), x_step.clone().requires_grad_(), x_step.double().requires_grad_()]
        g = make_input(x.shape, seed=step)
        with dlkernels.backend("triton"):
            y = ours(xs[0])
            y.backward(g)
        outs = [y]
        for m, xi in ((eager, xs[1]), (ref, xs[2])):
            outs.append(m(xi))
            outs[-1].backward(g.to(xi.dtype))
        terms = max(1, x.numel() // max(1, x.shape[1]))
        batch = training or not ours.track_running_stats
        assert_close(outs[0], outs[2], outs[1], terms=terms if batch else 1, name="output")
        assert_close(xs[0].grad, xs[2].grad, xs[1].grad, terms=terms if batch else 1, name="grad_input")
        for (name, p), p_eager, p_ref in zip(ours.named_parameters(), eager.parameters(), ref.parameters()):
            assert_close(p.grad, p_ref.grad, p_eager.grad, terms=terms, name=f"grad {name}")
        for (name, b), b_eager, b_ref in zip(ours.named_buffers(), eager.buffers(), ref.buffers()):
            if name == "num_batches_tracked":
                assert int(b) == int(b_eager)
            else:
                assert_close(b, b_ref, b_eager, terms=terms, name=name)


def test_store_rounded_compiles_to_a_plain_store_on_the_gpu(tmp_path):
    """Issue 8 item 6: the hand rounding of bf16 stores exists only under the interpreter; a GPU build (compiled
    here for sm_90 in a process without the interpreter) is a plain cast and store, with no integer rounding ops."""
    import subprocess
    import sys
    import textwrap

    (tmp_path / "store_probe.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl
        from dlkernels.kernels.common import store_rounded

        @triton.jit
        def probe(out_ptr, x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            store_rounded(out_ptr, offs, tl.load(x_ptr + offs), offs < BLOCK)
    """))
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import store_probe
        src = ASTSource(store_probe.probe, {"out_ptr": "*bf16", "x_ptr": "*fp32", "BLOCK": "constexpr"},
                        {(2,): 128})
        print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1}).asm["ttir"])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(Path(dlkernels.__file__).parent.parent)])
    ttir = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert "tt.store" in ttir and "bf16" in ttir
    for rounding_op in ("arith.andi", "arith.shrui", "tt.bitcast", "32767"):
        assert rounding_op not in ttir, f"{rounding_op} in a GPU build of store_rounded:\n{ttir}"
