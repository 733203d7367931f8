"""Batch norm: the Triton kernels (interpreter on CPU) against torch.nn.BatchNorm*, values, running statistics and
gradients, each measured against a float64 reference and held to 2x eager PyTorch's own error."""
import copy

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
            module.bias.copy_(torch.randn(module.num_features, generator=gen))
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
    x = make_input((4, 3, 5), torch.float64, seed=1, requires_grad=True)
    w = make_input(3, torch.float64, seed=2, mean=1.0, std=0.2, requires_grad=True)
    b = make_input(3, torch.float64, seed=3, requires_grad=True)
    with dlkernels.backend("triton"), pytest.warns(UserWarning, match="double backward"):
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: dlkernels.ops.batch_norm(x, None, None, w, b, True, activation="relu"), (x, w, b)
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
