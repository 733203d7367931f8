"""dlkernels.nn.MultiheadAttention and TransformerEncoderLayer against torch's modules with the same state_dict.

Each comparison runs ours (on the Triton kernel through the interpreter, or on the reference backend), torch in
the same dtype (the eager error) and torch in float64 (the reference), and holds ours to 2x eager PyTorch's error
for outputs and 3x for gradients. Windows are checked against torch given the equivalent explicit mask.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dlkernels
from dlkernels import _backend
from dlkernels.nn import attention as layers
from dlkernels.testing import assert_close, make_input

E, HEADS = 32, 2  # head dim 16: the smallest the kernel's tl.dot takes
BACKENDS = ["triton", "reference"]
ENCODER = dict(d_model=E, nhead=HEADS, dim_feedforward=48, dropout=0.0)


def randomize(module: nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter (torch zeroes the biases), the same for a given seed."""
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(make_input(p.shape, p.dtype, seed=seed * 100 + i, std=0.4, mean=1.0 if norm_scale else 0.0))


def blocked_by_window(nq, nk, left, right, causal=False):
    """Bool (nq, nk), True where query i must not see key j, written independently of the layer's helper."""
    blocked = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            inside = (left is None or j >= i - left) and (right is None or j <= i + right) and not (causal and j > i)
            blocked[i, j] = not inside
    return blocked


def trio(torch_cls, ours_cls, kwargs, *, window=None, seed=0, dtype=torch.float32, device="cpu"):
    """(ours, torch, torch in float64), the first two in ``dtype``, all holding the same randomized parameters."""
    eager = torch_cls(**kwargs).to(device)
    randomize(eager, seed)
    ours = ours_cls(**kwargs, window=window).to(device)
    ours.load_state_dict(eager.state_dict())
    reference = copy.deepcopy(eager).double()
    return ours.to(dtype), eager.to(dtype), reference


def run_and_compare(modules, inputs, call, backend, *, grads=True, name=""):
    """Runs ``call(module, *inputs)`` for (ours, eager, reference) of ``trio``, each in its module's dtype and on
    its device; checks outputs and, with ``grads``, every input and parameter gradient. ``call`` returns a tensor
    or a tuple whose None entries are skipped."""
    ours, eager, ref = modules
    results, grad_of = [], []
    for module in modules:
        param = next(module.parameters())
        converted = {}  # keeps identity: a self-attention call passes one tensor three times
        for x in inputs:
            converted.setdefault(id(x), x.detach().to(param.device, param.dtype).requires_grad_(grads))
        xs = [converted[id(x)] for x in inputs]
        if module is ours:
            with dlkernels.backend(backend):
                out = call(module, *xs)
        else:
            out = call(module, *xs)
        out = out if isinstance(out, tuple) else (out,)
        results.append(out)
        if grads:
            grad_out = make_input(out[0].shape, param.dtype, param.device, seed=77)
            with dlkernels.backend(backend if module is ours else "auto"):
                torch.autograd.backward(out[0], grad_out)
            grad_of.append([x.grad for x in xs] + [p.grad for p in module.parameters()])
    for k, (a, b, c) in enumerate(zip(*results)):
        if a is None:
            assert b is None and c is None, f"{name} result {k}: ours None, torch not"
            continue
        assert_close(a, c, b, name=f"{name} result {k}")
    if grads:
        names = [f"input {i}" for i in range(len(inputs))] + [n for n, _ in ours.named_parameters()]
        for n, a, b, c in zip(names, *grad_of):
            if a is None:
                assert b is None, f"{name} grad of {n}: ours None, torch not"
                continue
            assert_close(a, c, b, factor=3.0, name=f"{name} grad of {n}")
    return results


def mha_inputs(batch_first, nq=11, nk=None, batch=2, kdim=E, vdim=E):
    nk = nq if nk is None else nk

    def shaped(n, dim, seed):
        return make_input((batch, n, dim) if batch_first else (n, batch, dim), seed=seed)

    return shaped(nq, E, 1), shaped(nk, kdim, 2), shaped(nk, vdim, 3)


# --------------------------------------------------------------------------------------------- drop-in identity


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bias": False}, {"kdim": 24, "vdim": 20}, {"add_bias_kv": True, "add_zero_attn": True}],
    ids=["default", "no-bias", "kdim-vdim", "bias-kv"],
)
def test_mha_is_a_drop_in(kwargs):
    torch.manual_seed(5)
    theirs = nn.MultiheadAttention(E, HEADS, **kwargs)
    torch.manual_seed(5)
    ours = dlkernels.nn.MultiheadAttention(E, HEADS, **kwargs)
    assert isinstance(ours, nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():  # same initialisation for the same seed
        assert torch.equal(ours.state_dict()[key], value), key
    randomize(theirs, 1)
    ours.load_state_dict(theirs.state_dict())
    randomize(ours, 2)
    theirs.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value), key


def test_encoder_layer_is_a_drop_in():
    kwargs = dict(d_model=E, nhead=HEADS, dim_feedforward=48, dropout=0.0)
    torch.manual_seed(5)
    theirs = nn.TransformerEncoderLayer(**kwargs)
    after_theirs = torch.rand(3)
    torch.manual_seed(5)
    ours = dlkernels.nn.TransformerEncoderLayer(**kwargs, window=(2, 3))
    assert torch.equal(torch.rand(3), after_theirs), "construction used the random stream differently from torch's"
    assert isinstance(ours, nn.TransformerEncoderLayer)
    assert isinstance(ours.self_attn, dlkernels.nn.MultiheadAttention)
    assert ours.window == (2, 3) and ours.self_attn.window == (2, 3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert all(p.requires_grad and p.device.type == "cpu" for p in ours.parameters())
    randomize(ours, 3)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())


def test_window_argument_is_checked():
    for bad in [(1,), 3, (1, 2, 3)]:
        with pytest.raises(TypeError, match="window"):
            dlkernels.nn.MultiheadAttention(E, HEADS, window=bad)
    with pytest.raises(TypeError, match="window left"):
        dlkernels.nn.MultiheadAttention(E, HEADS, window=(1.5, 2))
    with pytest.raises(ValueError, match="window right"):
        dlkernels.nn.TransformerEncoderLayer(E, HEADS, window=(1, -1))
    layer = dlkernels.nn.TransformerEncoderLayer(E, HEADS)
    with pytest.raises(ValueError, match="window left"):
        layer.window = (-2, None)
    with pytest.raises(TypeError, match="window"):
        layer.self_attn.window = 4
    layer.window = [3, None]
    assert layer.self_attn.window == (3, None)


def test_nested_input_follows_torch():
    """Nested tensors take torch's own (eval fast) path; with a window they are refused rather than unwindowed."""
    theirs = nn.MultiheadAttention(E, HEADS, batch_first=True).eval()
    ours = dlkernels.nn.MultiheadAttention(E, HEADS, batch_first=True).eval()
    ours.load_state_dict(theirs.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's prototype-API warning for nested tensors
        x = torch.nested.nested_tensor([make_input((5, E), seed=1), make_input((3, E), seed=2)])
    with torch.no_grad():
        expected = theirs(x, x, x, need_weights=False)[0]
        got = ours(x, x, x, need_weights=False)[0]
        for a, b in zip(got.unbind(), expected.unbind()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        ours.window = (1, 1)
        with pytest.raises(NotImplementedError, match="nested"):
            ours(x, x, x, need_weights=False)


def _x(*shape, seed=0):
    return make_input(shape, seed=seed)


def _nan_row(x, row):
    x = x.clone()
    x[:, row] = float("nan")
    return x


_KPM = torch.zeros(2, 5, dtype=torch.bool).index_fill_(1, torch.tensor([3, 4]), True)
_STRIDED_KPM = torch.zeros(5, 4, dtype=torch.bool).index_fill_(0, torch.tensor([4]), True).t()[1:3]  # (2, 5), strided

# Bad and edge input for the drop-ins, each with the class it must give on both backends: ``"torch"`` (torch's own
# result, to rounding), ``"math"`` (torch's math path, ``need_weights=True``: torch's CPU SDPA drops a NaN query row,
# its math path and ours keep it NaN), or the exception class torch raises (ours must raise the same).
# Modules: "mha" = MultiheadAttention(E, HEADS, batch_first=True), "tel" = TransformerEncoderLayer(batch_first=True).
LAYER_INPUTS = [
    ("embed-size", "mha", lambda m: m(*[_x(2, 5, E + 1)] * 3, need_weights=False), AssertionError),
    ("key-value-lengths", "mha", lambda m: m(_x(2, 5, E), _x(2, 6, E), _x(2, 7, E), need_weights=False),
     AssertionError),
    ("kpm-shape", "mha", lambda m: m(*[_x(2, 5, E)] * 3, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool),
                                     need_weights=False), AssertionError),
    ("kpm-int", "mha", lambda m: m(*[_x(2, 5, E)] * 3, key_padding_mask=torch.zeros(2, 5, dtype=torch.int32),
                                   need_weights=False), AssertionError),
    ("kpm-1d-batched", "mha", lambda m: m(*[_x(2, 5, E)] * 3, key_padding_mask=torch.zeros(5, dtype=torch.bool),
                                          need_weights=False), AssertionError),
    ("query-4d", "mha", lambda m: m(_x(2, 5, E, 1), _x(2, 5, E), _x(2, 5, E), need_weights=False), AssertionError),
    ("query-1d", "mha", lambda m: m(_x(E), _x(E), _x(E), need_weights=False), AssertionError),
    ("unbatched-query-batched-key", "mha", lambda m: m(_x(5, E), _x(2, 5, E), _x(2, 5, E), need_weights=False),
     AssertionError),
    ("batch-mismatch", "mha", lambda m: m(_x(2, 5, E), _x(3, 5, E), _x(3, 5, E), need_weights=False), RuntimeError),
    ("attn-mask-shape", "mha", lambda m: m(*[_x(2, 5, E)] * 3, attn_mask=torch.zeros(3, 3, dtype=torch.bool),
                                           need_weights=False), RuntimeError),
    ("attn-mask-int", "mha", lambda m: m(*[_x(2, 5, E)] * 3, attn_mask=torch.zeros(5, 5, dtype=torch.int64),
                                         need_weights=False), AssertionError),
    ("attn-mask-3d-batch", "mha", lambda m: m(*[_x(2, 5, E)] * 3, attn_mask=torch.zeros(3, 5, 5, dtype=torch.bool),
                                              need_weights=False), RuntimeError),
    ("dtype-mismatch", "mha", lambda m: m(*[_x(2, 5, E).double()] * 3, need_weights=False), RuntimeError),
    ("empty-sequence", "mha", lambda m: m(*[_x(2, 0, E)] * 3, need_weights=False), "torch"),
    ("empty-sequence-weights", "mha", lambda m: m(*[_x(2, 0, E)] * 3), "torch"),
    ("empty-keys", "mha", lambda m: m(_x(2, 5, E), _x(2, 0, E), _x(2, 0, E), need_weights=False), "torch"),
    ("empty-batch", "mha", lambda m: m(*[_x(0, 5, E)] * 3, need_weights=False), "torch"),
    ("padding", "mha", lambda m: m(*[_x(2, 5, E)] * 3, key_padding_mask=_KPM, need_weights=False), "torch"),
    ("strided-padding", "mha", lambda m: m(*[_x(2, 5, E)] * 3, key_padding_mask=_STRIDED_KPM, need_weights=False),
     "torch"),
    ("strided-query", "mha", lambda m: m(_x(5, 2, E).transpose(0, 1), _x(2, 5, E), _x(2, 5, E), need_weights=False),
     "torch"),
    ("fully-padded", "mha", lambda m: m(*[_x(2, 5, E)] * 3, key_padding_mask=torch.ones(2, 5, dtype=torch.bool),
                                        need_weights=False), "torch"),
    ("nan-query-row", "mha", lambda m: m(_nan_row(_x(2, 5, E), 2), _x(2, 5, E), _x(2, 5, E), need_weights=False),
     "math"),
    ("nan-key-row", "mha", lambda m: m(_x(2, 5, E), _nan_row(_x(2, 5, E), 1), _x(2, 5, E), need_weights=False),
     "torch"),
    ("tel-embed-size", "tel", lambda m: m(_x(2, 5, E + 2)), AssertionError),
    ("tel-kpm-shape", "tel", lambda m: m(_x(2, 5, E), src_key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)),
     AssertionError),
    ("tel-src-mask-shape", "tel", lambda m: m(_x(2, 5, E), src_mask=torch.zeros(4, 4, dtype=torch.bool)),
     RuntimeError),
    ("tel-empty-sequence", "tel", lambda m: m(_x(2, 0, E)), "torch"),
    ("tel-padding", "tel", lambda m: m(_x(2, 5, E), src_key_padding_mask=_KPM), "torch"),
]


def _math_path(call, module):
    """torch's result on its math path: need_weights=True (the weights are dropped)."""
    def with_weights(m):
        return call(lambda *a, **kw: m(*a, **{**kw, "need_weights": True}))
    return with_weights(module)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module_kind,call,expected", [c[1:] for c in LAYER_INPUTS], ids=[c[0] for c in LAYER_INPUTS])
def test_bad_and_edge_inputs_follow_torch(module_kind, call, expected, backend):
    if module_kind == "mha":
        theirs = nn.MultiheadAttention(E, HEADS, batch_first=True)
        ours = dlkernels.nn.MultiheadAttention(E, HEADS, batch_first=True)
    else:
        theirs = nn.TransformerEncoderLayer(**ENCODER, batch_first=True)
        ours = dlkernels.nn.TransformerEncoderLayer(**ENCODER, batch_first=True)
    randomize(theirs, 3)
    ours.load_state_dict(theirs.state_dict())
    if isinstance(expected, type):
        with pytest.raises(expected):
            call(theirs)
        with dlkernels.backend(backend), pytest.raises(expected):
            call(ours)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp32 runs the op's reference path (it says so once)
        with dlkernels.backend(backend):
            got = call(ours)
        wanted = _math_path(call, theirs) if expected == "math" else call(theirs)
    got, wanted = (r[0] if isinstance(r, tuple) else r for r in (got, wanted))
    torch.testing.assert_close(got, wanted, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("window", [None, (1, 2)], ids=str)
def test_half_precision_edges_on_the_kernel(window):
    """fp16 on the Triton kernel: empty sequences, NaN query rows and strided padding as torch's math path gives."""
    ours, theirs, ref = trio(nn.MultiheadAttention, dlkernels.nn.MultiheadAttention,
                             dict(embed_dim=E, num_heads=HEADS, batch_first=True), window=window, dtype=torch.float16)
    blocked = None if window is None else blocked_by_window(5, 5, *window)
    x = _x(2, 5, E).half()
    with dlkernels.backend("triton"):
        empty = ours(*[x[:, :0]] * 3, need_weights=False)[0]
        got = ours(_nan_row(x, 2), x, x, key_padding_mask=_STRIDED_KPM, need_weights=False)[0]
    assert empty.shape == (2, 0, E)
    wanted = ref(_nan_row(x, 2).double(), x.double(), x.double(), key_padding_mask=_STRIDED_KPM, attn_mask=blocked)[0]
    eager = theirs(_nan_row(x, 2), x, x, key_padding_mask=_STRIDED_KPM, attn_mask=blocked)[0]
    assert torch.equal(got.isnan(), wanted.isnan()) and got[:, 2].isnan().all()
    finite = ~wanted.isnan()
    assert_close(got[finite], wanted[finite], eager[finite])


# --------------------------------------------------------------------------------------------- MultiheadAttention


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize(
    "kwargs,cross",
    [({}, False), ({"bias": False}, False), ({}, True), ({"kdim": 24, "vdim": 20}, True),
     ({"add_bias_kv": True, "add_zero_attn": True}, False)],
    ids=["self", "self-no-bias", "cross", "cross-kdim-vdim", "bias-kv"],
)
def test_mha_matches_torch(backend, batch_first, need_weights, kwargs, cross):
    kwargs = dict(embed_dim=E, num_heads=HEADS, batch_first=batch_first, **kwargs)
    modules = trio(nn.MultiheadAttention, dlkernels.nn.MultiheadAttention, kwargs)
    if cross:
        inputs = list(mha_inputs(batch_first, nq=9, nk=13, kdim=kwargs.get("kdim", E), vdim=kwargs.get("vdim", E)))
    else:
        inputs = [mha_inputs(batch_first)[0]] * 3
    padding = torch.rand(2, inputs[1].shape[1 if batch_first else 0], generator=torch.Generator().manual_seed(0)) < 0.3
    padding[:, 0] = False

    def call(m, q, k, v):
        return m(q, k, v, key_padding_mask=padding, need_weights=need_weights, average_attn_weights=False)

    run_and_compare(modules, inputs, call, backend, name="mha")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mha_unbatched_input(backend):
    modules = trio(nn.MultiheadAttention, dlkernels.nn.MultiheadAttention, dict(embed_dim=E, num_heads=HEADS))
    x = make_input((10, E), seed=4)
    padding = torch.zeros(10, dtype=torch.bool)
    padding[7:] = True
    run_and_compare(modules, [x, x, x], lambda m, q, k, v: m(q, k, v, key_padding_mask=padding, need_weights=False),
                    backend, name="unbatched")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, (2, 3)], ids=str)
def test_float_padding_mask(backend, window):
    """Float 0/-inf masks (what nn.TransformerEncoder passes down) run the kernel; other additive values the
    reference path; both match torch."""
    modules = trio(nn.MultiheadAttention, dlkernels.nn.MultiheadAttention, dict(embed_dim=E, num_heads=HEADS,
                                                                                    batch_first=True), window=window)
    x = make_input((2, 12, E), seed=4)
    additive = torch.zeros(2, 12)
    additive[0, 9:] = float("-inf")
    window_mask = None if window is None else torch.zeros(12, 12).masked_fill(blocked_by_window(12, 12, *window),
                                                                                float("-inf"))

    def call(m, q, k, v):
        if m is modules[0]:
            return m(q, k, v, key_padding_mask=additive.to(q.dtype), need_weights=False)
        mask = None if window_mask is None else window_mask.to(q.dtype)
        return m(q, k, v, key_padding_mask=additive.to(q.dtype), attn_mask=mask, need_weights=False)

    run_and_compare(modules, [x, x, x], call, backend, name="0/-inf float mask")
    additive[1, :4] = -0.75
    run_and_compare(modules, [x, x, x], call, backend, name="additive float mask")


@pytest.mark.parametrize("window", [None, (3, 1)], ids=str)
def test_half_precision_on_the_kernel(window):
    """float16 (the kernel's GPU dtype; bf16 arithmetic does not run in the interpreter) against torch in float16."""
    kwargs = dict(embed_dim=E, num_heads=HEADS, batch_first=True)
    modules = trio(nn.MultiheadAttention, dlkernels.nn.MultiheadAttention, kwargs, window=window, dtype=torch.float16)
    x = make_input((2, 13, E), seed=22)
    padding = torch.zeros(2, 13, dtype=torch.bool)
    padding[0, 10:] = True
    blocked = None if window is None else blocked_by_window(13, 13, *window)

    def call(m, q, k, v):
        mask = None if m is modules[0] else blocked
        return m(q, k, v, key_padding_mask=padding, attn_mask=mask, need_weights=False)

    run_and_compare(modules, [x, x, x], call, "triton", name="float16 mha")
    layers_ = trio(nn.TransformerEncoderLayer, dlkernels.nn.TransformerEncoderLayer, dict(ENCODER, batch_first=True),
                   window=window, dtype=torch.float16)
    run_and_compare(layers_, [x], lambda m, src: m(src, src_mask=None if m is layers_[0] else blocked,
                                                   src_key_padding_mask=padding), "triton", name="float16 encoder")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_layers_on_the_kernel(dtype, device):
    """Real shapes on the GPU kernel: head dim 64, windows, padding, both layers, against torch in the same dtype."""
    window = (32, 16)
    n = 200
    blocked = blocked_by_window(n, n, *window).to(device)
    padding = torch.zeros(3, n, dtype=torch.bool, device=device)
    padding[1, 150:] = True
    x = make_input((3, n, 256), seed=23)
    modules = trio(nn.MultiheadAttention, dlkernels.nn.MultiheadAttention,
                   dict(embed_dim=256, num_heads=4, batch_first=True), window=window, dtype=dtype, device=device)

    def call(m, q, k, v):
        mask = None if m is modules[0] else blocked
        return m(q, k, v, key_padding_mask=padding, attn_mask=mask, need_weights=False)

    run_and_compare(modules, [x, x, x], call, "auto", name=f"gpu {dtype} mha")
    layers_ = trio(nn.TransformerEncoderLayer, dlkernels.nn.TransformerEncoderLayer,
                   dict(d_model=256, nhead=4, dim_feedforward=512, dropout=0.0, batch_first=True, norm_first=True),
                   window=window, dtype=dtype, device=device)
    run_and_compare(layers_, [x], lambda m, src: m(src, src_mask=None if m is layers_[0] else blocked,
                                                   src_key_padding_mask=padding), "auto", name=f"gpu {dtype} encoder")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_padded_sequence(backend):
    """A sequence whose keys are all padding: ours returns zero attention (so out_proj.bias) with finite gradients,
    as torch's need_weights=False (SDPA) path does on the CPU; need_weights=True gives torch's own NaN."""
    modules = trio(nn.MultiheadAttention, dlkernels.nn.MultiheadAttention, dict(embed_dim=E, num_heads=HEADS,
                                                                                    batch_first=True))
    ours = modules[0]
    x = make_input((2, 7, E), seed=6)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1] = True
    padding[0, 5:] = True
    call = lambda m, q, k, v: m(q, k, v, key_padding_mask=padding, need_weights=False)  # noqa: E731
    results = run_and_compare(modules, [x, x, x], call, backend, name="fully padded")
    assert torch.equal(results[0][0][1], ours.out_proj.bias.detach().expand(7, E))
    xq = x.clone().requires_grad_()
    with dlkernels.backend(backend):
        ours(xq, xq, xq, key_padding_mask=padding, need_weights=False)[0].sum().backward()
    assert torch.isfinite(xq.grad).all() and all(torch.isfinite(p.grad).all() for p in ours.parameters())
    with dlkernels.backend(backend):
        out, weights = ours(x, x, x, key_padding_mask=padding)
    torch_out, torch_weights = modules[1](x, x, x, key_padding_mask=padding)
    assert torch.equal(out.isnan(), torch_out.isnan()) and out[1].isnan().all()
    torch.testing.assert_close(out, torch_out, equal_nan=True)
    torch.testing.assert_close(weights, torch_weights, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("with_padding", [False, True])
def test_is_causal(backend, need_weights, with_padding):
    modules = trio(nn.MultiheadAttention, dlkernels.nn.MultiheadAttention, dict(embed_dim=E, num_heads=HEADS,
                                                                                    batch_first=True))
    x = make_input((2, 10, E), seed=8)
    causal = torch.ones(10, 10, dtype=torch.bool).triu(1)
    padding = torch.zeros(2, 10, dtype=torch.bool) if with_padding else None
    if with_padding:
        padding[0, 6:] = True

    def hinted(m, q, k, v):
        return m(q, k, v, key_padding_mask=padding, attn_mask=causal, is_causal=True,
                 need_weights=need_weights)

    run_and_compare(modules, [x, x, x], hinted, backend, name="is_causal with its mask")
    ours, eager, ref = modules
    with dlkernels.backend(backend):
        without_mask = ours(x, x, x, key_padding_mask=padding, is_causal=True, need_weights=need_weights)
        with_mask = hinted(ours, x, x, x)
    for a, b in zip(without_mask, with_mask):  # is_causal alone (torch raises there) means the same
        torch.testing.assert_close(a, b, rtol=0, atol=0)


WINDOWS = [(0, 0), (2, 1), (None, 3), (4, None), (0, None), (None, None), (40, 40), (3, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_window_matches_explicit_mask(backend, window, causal):
    modules = trio(nn.MultiheadAttention, dlkernels.nn.MultiheadAttention, dict(embed_dim=E, num_heads=HEADS,
                                                                                    batch_first=True), window=window)
    ours, eager, ref = modules
    x = make_input((2, 12, E), seed=9)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 8:] = True
    blocked = blocked_by_window(12, 12, *window, causal=causal)

    def call(m, q, k, v):
        if m is ours:
            return m(q, k, v, key_padding_mask=padding, is_causal=causal, need_weights=False)
        return m(q, k, v, key_padding_mask=padding, attn_mask=blocked, need_weights=False)

    run_and_compare(modules, [x, x, x], call, backend, name=f"window {window}")
    with dlkernels.backend(backend):  # the weights path applies the window too
        out, weights = ours(x, x, x, key_padding_mask=padding, is_causal=causal)
    torch_out, torch_weights = eager(x, x, x, key_padding_mask=padding, attn_mask=blocked)
    torch.testing.assert_close(out, torch_out, rtol=0, atol=0, equal_nan=True)  # NaN: rows with no key
    torch.testing.assert_close(weights, torch_weights, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_cross_attention(backend):
    """Different query and key lengths: the window is top-left aligned on absolute positions."""
    window = (1, 4)
    modules = trio(nn.MultiheadAttention, dlkernels.nn.MultiheadAttention, dict(embed_dim=E, num_heads=HEADS),
                   window=window)
    inputs = list(mha_inputs(False, nq=7, nk=13))
    blocked = blocked_by_window(7, 13, *window)

    def call(m, q, k, v):
        if m is modules[0]:
            return m(q, k, v, need_weights=False)
        return m(q, k, v, attn_mask=blocked, need_weights=False)

    run_and_compare(modules, inputs, call, backend, name="cross window")


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_window_composes_with_an_attn_mask(kind):
    """An arbitrary attn_mask takes torch's path; the window is still applied on top of it."""
    window = (3, 2)
    ours, eager, _ = trio(nn.MultiheadAttention, dlkernels.nn.MultiheadAttention,
                          dict(embed_dim=E, num_heads=HEADS, batch_first=True), window=window)
    x = make_input((2, 10, E), seed=10)
    user_blocked = torch.rand(10, 10, generator=torch.Generator().manual_seed(3)) < 0.2
    user_blocked.fill_diagonal_(False)
    user_mask = user_blocked if kind == "bool" else make_input((HEADS * 2, 10, 10), seed=11) * 0.5
    both = (user_mask | blocked_by_window(10, 10, *window) if kind == "bool"
            else user_mask.masked_fill(blocked_by_window(10, 10, *window), float("-inf")))
    for need_weights in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = ours(x, x, x, attn_mask=user_mask, need_weights=need_weights)
        expected = eager(x, x, x, attn_mask=both, need_weights=need_weights)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float64_gradients_match_torch_closely():
    """In float64 both sides are exact to rounding: every gradient within 1e-12 of torch's."""
    ours, _, ref = trio(nn.MultiheadAttention, dlkernels.nn.MultiheadAttention,
                        dict(embed_dim=E, num_heads=HEADS, kdim=24, vdim=20), window=(2, 5))
    ours.double()
    q, k, v = (t.double() for t in mha_inputs(False, nq=9, nk=12, kdim=24, vdim=20))
    blocked = blocked_by_window(9, 12, 2, 5)
    results = []
    for m in (ours, ref):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        extra = {} if m is ours else {"attn_mask": blocked}
        out = m(*xs, need_weights=False, **extra)[0]
        out.backward(make_input(out.shape, torch.float64, seed=5))
        results.append([out] + [t.grad for t in xs] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_goes_through_the_op(backend, monkeypatch):
    """Training passes the module's dropout to the op (eval passes 0); dropout is reproducible under a seed."""
    seen = []
    real_op = layers.attention_op

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return real_op(*args, **kwargs)

    monkeypatch.setattr(layers, "attention_op", spy)
    ours = dlkernels.nn.MultiheadAttention(E, HEADS, dropout=0.4, batch_first=True)
    x = make_input((2, 16, E), seed=12)
    with dlkernels.backend(backend):
        ours.eval()
        plain = ours(x, x, x, need_weights=False)[0]
        ours.train()
        torch.manual_seed(1)
        dropped = ours(x, x, x, need_weights=False)[0]
        torch.manual_seed(1)
        again = ours(x, x, x, need_weights=False)[0]
    assert seen == [0.0, 0.4, 0.4]
    assert torch.equal(dropped, again)
    assert not torch.allclose(dropped, plain, atol=1e-3)


def test_deterministic_algorithms_ask_for_a_deterministic_backward(monkeypatch):
    seen = []
    real_op = layers.attention_op
    monkeypatch.setattr(layers, "attention_op", lambda *a, **kw: seen.append(kw["deterministic"]) or real_op(*a, **kw))
    ours = dlkernels.nn.MultiheadAttention(E, HEADS)
    x = make_input((5, 2, E))
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for flag in (True, False):
            torch.use_deterministic_algorithms(flag)
            ours(x, x, x, need_weights=False)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [True, False]


def test_fallback_warnings(monkeypatch):
    """Warn once where the caller asked for the output only and the kernel cannot serve; never for the default
    need_weights=True call, whose weights are a legitimate request."""
    monkeypatch.setattr(_backend, "_warned", set())
    ours = dlkernels.nn.MultiheadAttention(E, HEADS).half()  # fp16: the op's kernel dtype (fp32 warns in the op)
    x = make_input((6, 2, E), torch.float16)
    with dlkernels.backend("triton"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours(x, x, x)
            ours(x, x, x, need_weights=False, is_causal=True)
        mask = torch.zeros(6, 6, dtype=torch.bool)
        with pytest.warns(UserWarning, match="attn_mask"):
            ours(x, x, x, need_weights=False, attn_mask=mask)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours(x, x, x, need_weights=False, attn_mask=mask)  # once per reason


# --------------------------------------------------------------------------------------------- encoder layer



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [dict(), dict(norm_first=True), dict(batch_first=True, activation="gelu"),
     dict(batch_first=True, norm_first=True, activation=F.silu, bias=False), dict(layer_norm_eps=1e-3)],
    ids=["post-norm", "pre-norm", "batch-first-gelu", "pre-norm-silu-no-bias", "eps"],
)
def test_encoder_layer_matches_torch(backend, options):
    modules = trio(nn.TransformerEncoderLayer, dlkernels.nn.TransformerEncoderLayer, dict(ENCODER, **options))
    batch_first = options.get("batch_first", False)
    x = make_input((2, 11, E) if batch_first else (11, 2, E), seed=13)
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[0, 7:] = True
    run_and_compare(modules, [x], lambda m, src: m(src, src_key_padding_mask=padding), backend, name="encoder")
    causal = nn.Transformer.generate_square_subsequent_mask(11)
    run_and_compare(modules, [x], lambda m, src: m(src, src_mask=causal.to(src.dtype), is_causal=True), backend,
                    name="causal encoder")


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_layer_window_in_eval_skips_torch_fast_path(backend, monkeypatch):
    """In eval under no_grad (where torch's layer runs its fused native path) ours still runs its own attention
    with the window: equal to torch's layer given the window as a mask."""
    window = (2, 1)
    ours, eager, ref = trio(nn.TransformerEncoderLayer, dlkernels.nn.TransformerEncoderLayer,
                            dict(ENCODER, batch_first=True), window=window)
    for m in (ours, eager, ref):
        m.eval()
    x = make_input((2, 12, E), seed=14)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 9:] = True
    blocked = blocked_by_window(12, 12, *window)
    with torch.no_grad():
        expected = ref(x.double(), src_mask=blocked, src_key_padding_mask=padding)
        eager_out = eager(x, src_mask=blocked, src_key_padding_mask=padding)

        def forbidden(*args, **kwargs):
            raise AssertionError("torch's fused native path ran")

        monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", forbidden)
        monkeypatch.setattr(torch, "_native_multi_head_attention", forbidden)
        with dlkernels.backend(backend):
            got = ours(x, src_key_padding_mask=padding)
    # The fused path leaves padded query rows unspecified: compare the real ones.
    keep = ~padding
    assert_close(got[keep], expected[keep], eager_out[keep], name="eval encoder with window")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stock_transformer_encoder_of_our_layers(backend, monkeypatch):
    """nn.TransformerEncoder built from our layers: its nested-tensor path stays off (our layers get plain tensors
    and the float 0/-inf padding mask it makes runs the kernel), in training and in eval."""
    calls = []
    real_op = layers.attention_op
    monkeypatch.setattr(layers, "attention_op", lambda *a, **kw: calls.append(1) or real_op(*a, **kw))
    window = (3, 3)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor=True: torch warns that it is off for these layers
        stack = nn.TransformerEncoder(dlkernels.nn.TransformerEncoderLayer(**ENCODER, batch_first=True,
                                                                          window=window), num_layers=2)
    reference = nn.TransformerEncoder(nn.TransformerEncoderLayer(**ENCODER, batch_first=True), num_layers=2,
                                      enable_nested_tensor=False)
    randomize(stack, 15)
    reference.load_state_dict(stack.state_dict())
    x = make_input((2, 10, E), seed=16)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[0, 6:] = True
    blocked = blocked_by_window(10, 10, *window)
    for training in (True, False):
        stack.train(training)
        reference.train(training)
        with torch.no_grad():
            with dlkernels.backend(backend):
                got = stack(x, src_key_padding_mask=padding)
            expected = reference.double()(x.double(), mask=blocked, src_key_padding_mask=padding)
            eager = reference.float()(x, mask=blocked, src_key_padding_mask=padding)
        assert_close(got[~padding], expected[~padding], eager[~padding], name=f"stack training={training}")
    assert len(calls) == 4, "the layers did not run the attention op"


# --------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize(
    "backend,compiler", [("triton", "aot_eager"), ("reference", "aot_eager"), ("triton", "inductor")]
)
def test_compile_fullgraph_encoder(backend, compiler):
    """Two windowed layers compiled with fullgraph=True: output and gradients as accurate as eager's."""
    torch._dynamo.reset()
    layer_kwargs = dict(ENCODER, batch_first=True, norm_first=True)
    encoder = nn.Sequential(
        dlkernels.nn.TransformerEncoderLayer(**layer_kwargs, window=(4, 0)),
        dlkernels.nn.TransformerEncoderLayer(**layer_kwargs, window=(2, 2)),
    )
    randomize(encoder, 17)
    x = make_input((2, 12, E), seed=18)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 8:] = True

    def step(module, src):
        out = src
        for layer in module:
            out = layer(out, src_key_padding_mask=padding)
        return out

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    results = []
    for fn, dtype in [(step, torch.float32), (compiled, torch.float32), (step, torch.float64)]:
        model = copy.deepcopy(encoder).to(dtype)
        src = x.detach().to(dtype).requires_grad_()
        with dlkernels.backend(backend if dtype == torch.float32 else "reference"):
            out = fn(model, src)
            out.backward(make_input(out.shape, dtype, seed=19))
        results.append([out, src.grad] + [p.grad for p in model.parameters()])
    names = ["output", "input grad"] + [n for n, _ in encoder.named_parameters()]
    for name, eager, got, reference in zip(names, *results):
        assert_close(got, reference, eager, factor=2.0 if name == "output" else 3.0, name=name)


def test_compile_fullgraph_stock_encoder_and_weights():
    """Paths that fall back (the float padding mask nn.TransformerEncoder makes, need_weights=True) trace too."""
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack = nn.TransformerEncoder(dlkernels.nn.TransformerEncoderLayer(**ENCODER, window=(1, 2)), num_layers=2)
    randomize(stack, 20)
    x = make_input((9, 2, E), seed=21)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, 5:] = True
    attention = stack.layers[0].self_attn
    for fn, args in [(stack, (x, None, padding)), (attention, (x, x, x))]:
        with dlkernels.backend("triton"):
            expected = fn(*args)
            got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
        for a, b in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(got, tuple) else (expected,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- torch's module_db


def _module_db_cases():
    from torch.testing._internal.common_modules import module_db

    ours = {nn.MultiheadAttention: dlkernels.nn.MultiheadAttention,
            nn.TransformerEncoderLayer: dlkernels.nn.TransformerEncoderLayer}
    return [pytest.param(info, training, id=f"{info.module_cls.__name__}-{'train' if training else 'eval'}")
            for info in module_db if info.module_cls in ours for training in (True, False)], ours


_MODULE_DB_CASES, _OURS = _module_db_cases()


def _tensors(result):
    return [t for t in (result if isinstance(result, tuple) else (result,)) if t is not None]


@pytest.mark.parametrize("info,training", _MODULE_DB_CASES)
def test_module_db_inputs(info, training):
    """Every input torch's own module tests use (float64), as given and with need_weights=False for
    MultiheadAttention (our kernel path there): outputs and every gradient as torch's, to float64 rounding.
    One backend: float64 runs the op's reference implementation on both (the drop-in's own logic is under test)."""
    backend = "triton"
    inputs = info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True, training=training)
    assert inputs
    for module_input in inputs:
        ctor, fwd = module_input.constructor_input, module_input.forward_input
        variants = [fwd.kwargs]
        if info.module_cls is nn.MultiheadAttention:
            variants.append({**fwd.kwargs, "need_weights": False})
        for kwargs in variants:
            torch.manual_seed(0)
            theirs = info.module_cls(*ctor.args, **ctor.kwargs).double().train(training)
            mine = _OURS[info.module_cls](*ctor.args, **ctor.kwargs).double().train(training)
            mine.load_state_dict(theirs.state_dict())
            results, grads = [], []
            for module in (theirs, mine):
                args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                        for a in fwd.args]
                with dlkernels.backend(backend if module is mine else "auto"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # fallback notices
                    out = _tensors(module(*args, **kwargs))
                    loss = sum((o * make_input(o.shape, torch.float64, seed=i)).sum() for i, o in enumerate(out))
                    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
                    leaves += list(module.parameters())
                    grads.append(torch.autograd.grad(loss, leaves, allow_unused=True))
                results.append(out)
            for a, b in zip(*results):
                torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10, equal_nan=True)
            for a, b in zip(*grads):
                if a is None or b is None:
                    assert a is None and b is None or (a if b is None else b).abs().max() == 0
                    continue
                torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10, equal_nan=True)
