"""LSTM: the Triton per-step engine (interpreter on CPU) and the reference path against torch.nn.LSTM/LSTMCell.

Every output and gradient is measured against torch in float64 and held to 2x eager PyTorch's own error in the same
dtype (dlkernels.testing). Under the interpreter every step is a kernel launch (~20-40 ms), so the shapes are tiny
and T is short; the matrix skips only combinations that do not exist (batch_first does not apply to unbatched or
packed input: their layout does not depend on it).
"""
import copy
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import dlkernels
from dlkernels.testing import assert_close, make_input

INPUT, HIDDEN, PROJ = 5, 6, 3
LENGTHS = [7, 5, 5, 2, 1, 1]
ORDER = [2, 0, 5, 1, 4, 3]  # the batch order of the packed sequences: unsorted, so enforce_sorted=False sorts them
STEPS, BATCH = 3, 3  # padded and unbatched input (the packed input is T=7, B=6)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tests run thousands of tiny torch ops, which two threads on two shared cores
    only slow down (about 2x, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _modules(dtype, **kwargs):
    """(ours in dtype, torch in dtype, torch in float64), all with the same seeded parameters."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(INPUT, HIDDEN, **kwargs).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(make_input(p.shape, torch.float64, seed=p.numel(), std=0.4))
    eager = copy.deepcopy(ref).to(dtype)
    ours = dlkernels.nn.LSTM(INPUT, HIDDEN, **kwargs).to(dtype)
    ours.load_state_dict(eager.state_dict())
    return ours, eager, ref


def _run(module, x, hx, grads, backend=None):
    """Forward, then backward of sum(y * gy) + sum(h_n * gh) + sum(c_n * gc); returns outputs and every gradient."""
    x = x.detach().requires_grad_() if not isinstance(x, PackedSequence) else x
    hx = None if hx is None else tuple(t.detach().requires_grad_() for t in hx)
    if isinstance(x, PackedSequence):
        x = x._replace(data=x.data.detach().requires_grad_())
        leaf = x.data
    else:
        leaf = x
    if backend is not None:
        with dlkernels.backend(backend):
            y, (h, c) = module(x, hx)
    else:
        y, (h, c) = module(x, hx)
    y_data = y.data if isinstance(y, PackedSequence) else y
    gy, gh, gc = (g.to(y_data.dtype) for g in grads(y_data, h, c))
    loss = (y_data * gy).sum() + (h * gh).sum() + (c * gc).sum()
    if backend is not None:
        with dlkernels.backend(backend):
            loss.backward()
    else:
        loss.backward()
    named = {"output": y_data, "h_n": h, "c_n": c, "grad input": leaf.grad}
    if hx is not None:
        named["grad h0"], named["grad c0"] = hx[0].grad, hx[1].grad
    for name, p in module.named_parameters():
        named[f"grad {name}"] = p.grad
    return named, y


def _seeded_grads(y, h, c):
    return (make_input(y.shape, torch.float64, seed=11), make_input(h.shape, torch.float64, seed=12),
            make_input(c.shape, torch.float64, seed=13))


def _compare(dtype, kwargs, make_x, make_hx, backend="triton"):
    ours, eager, ref = _modules(dtype, **kwargs)
    x64, hx64 = make_x(torch.float64), make_hx(torch.float64)
    cast = lambda v: v if v is None else (  # noqa: E731
        v._replace(data=v.data.to(dtype)) if isinstance(v, PackedSequence) else
        tuple(t.to(dtype) for t in v) if isinstance(v, tuple) else v.to(dtype))
    got, y_ours = _run(ours, cast(x64), cast(hx64), _seeded_grads, backend)
    want, y_ref = _run(ref, x64, hx64, _seeded_grads)
    eager_out, _ = _run(eager, cast(x64), cast(hx64), _seeded_grads)
    assert type(y_ours) is type(y_ref)
    if isinstance(y_ref, PackedSequence):
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            torch.testing.assert_close(getattr(y_ours, field), getattr(y_ref, field))
    assert set(got) == set(want)
    packed = isinstance(x64, PackedSequence)
    steps = max(LENGTHS) if packed else STEPS
    batch = len(LENGTHS) if packed else (1 if x64.dim() == 2 else BATCH)
    for name in want:
        assert got[name].dtype == dtype, f"{name} has dtype {got[name].dtype}"
        terms = steps * batch if name.startswith("grad weight") or name.startswith("grad bias") else HIDDEN + INPUT
        assert_close(got[name], want[name], eager_out[name], terms=terms, name=name)


def _input_maker(kind, batch_first):
    def make(dtype):
        if kind == "unbatched":
            return make_input((STEPS, INPUT), dtype, seed=1)
        if kind == "packed":
            x = make_input((max(LENGTHS), len(LENGTHS), INPUT), dtype, seed=1)
            return pack_padded_sequence(x, torch.tensor(LENGTHS)[ORDER], enforce_sorted=False)
        x = make_input((STEPS, BATCH, INPUT), dtype, seed=1)
        return x.transpose(0, 1).contiguous() if batch_first else x

    return make


def _hx_maker(kind, zero, layers, bidirectional, proj):
    batch = {"unbatched": (), "packed": (len(LENGTHS),), "padded": (BATCH,)}[kind]
    shape = (layers * (2 if bidirectional else 1), *batch)

    def make(dtype):
        if zero:
            return None
        return (make_input((*shape, proj or HIDDEN), dtype, seed=2, std=0.5),
                make_input((*shape, HIDDEN), dtype, seed=3, std=0.5))

    return make


def _matrix():
    for bias, bidirectional, layers, proj, kind, zero in itertools.product(
        (True, False), (False, True), (1, 2, 3), (0, PROJ), ("padded", "packed", "unbatched"), (True, False)
    ):
        for batch_first in ((False, True) if kind == "padded" else (False,)):
            yield pytest.param(bias, batch_first, bidirectional, layers, proj, kind, zero,
                               id=f"{'bias' if bias else 'nobias'}-{'bf' if batch_first else 'tf'}-"
                                  f"{'bi' if bidirectional else 'uni'}-L{layers}-P{proj}-{kind}-"
                                  f"{'h0zero' if zero else 'h0'}")


@pytest.mark.parametrize("bias,batch_first,bidirectional,layers,proj,kind,zero", list(_matrix()))
def test_matrix_matches_torch(bias, batch_first, bidirectional, layers, proj, kind, zero):
    kwargs = dict(bias=bias, batch_first=batch_first, bidirectional=bidirectional, num_layers=layers, proj_size=proj)
    _compare(torch.float32, kwargs, _input_maker(kind, batch_first), _hx_maker(kind, zero, layers, bidirectional, proj))


# ---------------------------------------------------------------------------------------------------------------
# Long sequences in half precision, the cell, the drop-in contract.


def _relative(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_fp16_long_sequence_relative_error_against_fp32():
    """T=256 in fp16 (tiny B and H): every output and gradient within 2x eager fp16 PyTorch's relative error
    against fp32 (plus two fp16 ulps)."""
    steps, batch, size, hidden = 256, 2, 4, 8
    torch.manual_seed(0)
    fp32 = torch.nn.LSTM(size, hidden)
    eager = copy.deepcopy(fp32).half()
    ours = dlkernels.nn.LSTM(size, hidden).half()
    ours.load_state_dict(eager.state_dict())
    x = make_input((steps, batch, size), seed=5)
    gy = make_input((steps, batch, hidden), seed=6)
    results = {}
    for name, module, dtype in (("ours", ours, torch.float16), ("eager", eager, torch.float16),
                                ("fp32", fp32, torch.float32)):
        xi = x.to(dtype).requires_grad_()
        with dlkernels.backend("triton" if name == "ours" else "reference"):
            y, (h, c) = module(xi)
            (y * gy.to(dtype)).sum().backward()
        results[name] = [y, h, c, xi.grad] + [p.grad for p in module.parameters()]
    for i, (ours_t, eager_t, ref_t) in enumerate(zip(results["ours"], results["eager"], results["fp32"])):
        ours_err, eager_err = _relative(ours_t, ref_t), _relative(eager_t, ref_t)
        assert ours_err <= 2 * eager_err + 2 * torch.finfo(torch.float16).eps, (i, ours_err, eager_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batched,bias", [(True, True), (False, True), (True, False)])
def test_lstm_cell_op_matches_torch(dtype, batched, bias):
    size, hidden = 5, 7
    lead = (4,) if batched else ()
    args64 = [make_input((*lead, size), torch.float64, seed=1), make_input((*lead, hidden), torch.float64, seed=2),
              make_input((*lead, hidden), torch.float64, seed=3),
              make_input((4 * hidden, size), torch.float64, seed=4, std=0.5),
              make_input((4 * hidden, hidden), torch.float64, seed=5, std=0.5)]
    if bias:
        args64 += [make_input(4 * hidden, torch.float64, seed=6), make_input(4 * hidden, torch.float64, seed=7)]
    gh, gc = make_input((*lead, hidden), torch.float64, seed=8), make_input((*lead, hidden), torch.float64, seed=9)

    def run(fn, dt):
        args = [a.detach().to(dt).clone().requires_grad_() for a in args64]
        h, c = fn(args[0], args[1], args[2], *args[3:])
        ((h * gh.to(dt)).sum() + (c * gc.to(dt)).sum()).backward()
        return [h, c] + [a.grad for a in args]

    def torch_cell(x, hx, cx, *weights):  # torch.lstm_cell takes batched input only; nn.LSTMCell unsqueezes
        if x.dim() == 1:
            return tuple(t.squeeze(0) for t in torch.lstm_cell(x[None], (hx[None], cx[None]), *weights))
        return torch.lstm_cell(x, (hx, cx), *weights)

    with dlkernels.backend("triton"):
        got = run(dlkernels.ops.lstm_cell, dtype)
    want, eager = run(torch_cell, torch.float64), run(torch_cell, dtype)
    names = ["h", "c", "grad input", "grad hx", "grad cx", "grad w_ih", "grad w_hh", "grad b_ih", "grad b_hh"]
    for name, g, w, e in zip(names, got, want, eager):
        assert g.dtype == dtype
        assert_close(g, w, e, terms=4 if name.startswith("grad w") or name.startswith("grad b") else size + hidden,
                     name=name)


def test_lstm_cell_module_is_drop_in():
    torch.manual_seed(0)
    theirs = torch.nn.LSTMCell(5, 7)
    ours = dlkernels.nn.LSTMCell(5, 7)
    assert isinstance(ours, torch.nn.LSTMCell)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    with dlkernels.backend("triton"):
        for x, hx in ((make_input((3, 5), seed=1), None), (make_input(5, seed=2), None),
                      (make_input((3, 5), seed=3), (make_input((3, 7), seed=4), make_input((3, 7), seed=5))),
                      (make_input(5, seed=6), (make_input(7, seed=7), make_input(7, seed=8)))):
            for got, want in zip(ours(x, hx), theirs(x, hx)):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want)


def test_state_dict_both_ways():
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=2, batch_first=True)
    theirs, ours = torch.nn.LSTM(4, 5, **kwargs), dlkernels.nn.LSTM(4, 5, **kwargs)
    assert isinstance(ours, torch.nn.LSTM)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    ours.load_state_dict(theirs.state_dict())
    x = make_input((2, 3, 4), seed=1)
    with dlkernels.backend("triton"):
        torch.testing.assert_close(ours(x)[0], theirs(x)[0])
    fresh = torch.nn.LSTM(4, 5, **kwargs)
    fresh.load_state_dict(ours.state_dict())
    torch.testing.assert_close(fresh(x)[0], theirs(x)[0])


def test_autocast_runs_in_the_autocast_dtype_as_torch():
    """Under CPU autocast (bf16) torch's LSTM runs in bf16; ours too (fp32 parameters and input, bf16 results)."""
    ours, eager, ref = _modules(torch.float32, num_layers=2)
    x = make_input((STEPS, BATCH, INPUT), seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with dlkernels.backend("triton"):
            y, (h, c) = ours(x)
        y_eager, (h_eager, c_eager) = eager(x)
    y_ref, (h_ref, c_ref) = ref(x.double())
    for name, got, want, bar in (("output", y, y_ref, y_eager), ("h_n", h, h_ref, h_eager), ("c_n", c, c_ref, c_eager)):
        assert got.dtype == bar.dtype == torch.bfloat16, name
        assert_close(got, want, bar, terms=HIDDEN + INPUT, name=name)


def test_enforce_sorted_packed_input():
    """Sorted lengths packed with enforce_sorted=True (no permutation) give torch's outputs."""
    ours, eager, ref = _modules(torch.float64, num_layers=2, bidirectional=True)
    x = make_input((max(LENGTHS), len(LENGTHS), INPUT), torch.float64, seed=4)
    packed = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=True)
    with dlkernels.backend("reference"):
        y, (h, c) = ours(packed)
    y_ref, (h_ref, c_ref) = ref(packed)
    assert y.sorted_indices is None and y.unsorted_indices is None
    for a, b in ((y.data, y_ref.data), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Dropout between layers.


def test_dropout_uses_torch_random_stream_in_training():
    """Inter-layer dropout draws its masks from the same generator, in the same order, as torch's LSTM."""
    ours, _, ref = _modules(torch.float64, num_layers=3, dropout=0.4)
    ours.train(), ref.train()
    x = make_input((4, 3, INPUT), torch.float64, seed=2)
    torch.manual_seed(7)
    with dlkernels.backend("reference"):
        y = ours(x)[0]
    torch.manual_seed(7)
    torch.testing.assert_close(y, ref(x)[0])


def test_dropout_statistics_and_off_in_eval(monkeypatch):
    p = 0.3
    ours, _, ref = _modules(torch.float32, num_layers=3, dropout=p)
    seen = []
    real_dropout = torch.nn.functional.dropout

    def recording_dropout(x, p_, training=True, inplace=False):
        out = real_dropout(x, p_, training, inplace)
        seen.append((x.detach(), out.detach(), p_, training))
        return out

    monkeypatch.setattr(torch.nn.functional, "dropout", recording_dropout)
    x = make_input((STEPS, 64, INPUT), seed=3)
    with dlkernels.backend("triton"):
        ours.train()(x)
        assert len(seen) == 2  # between layers 1-2 and 2-3, never after the last
        kept = torch.cat([(out != 0).flatten() for _, out, _, _ in seen]).double()
        n = kept.numel()
        assert abs(1 - kept.mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5, "drop rate far from p"
        for inp, out, p_, training in seen:
            assert p_ == p and training
            torch.testing.assert_close(out[out != 0], inp[out != 0] / (1 - p))  # kept values scaled by 1/(1-p)
        seen.clear()
        y = ours.eval()(x)[0]
    assert not seen, "dropout ran in eval"
    torch.testing.assert_close(y, ref.float().eval()(x)[0])


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, opcheck, PyTorch's own module inputs.


class _Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(3, 4)
        self.lstm = dlkernels.nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(10, 2)

    def forward(self, x, hx):
        y, (h, c) = self.lstm(self.embed(x), hx)
        return self.head(y), h, c


def test_fullgraph_compile_model_with_lstm():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Tagger()
    eager_model = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = make_input((2, 3, 3), seed=1)
    hx = (make_input((4, 2, 5), seed=2), make_input((4, 2, 5), seed=3))
    with dlkernels.backend("triton"):
        outs = compiled(x, hx)
        sum(o.square().sum() for o in outs).backward()
        outs_eager = eager_model(x, hx)
        sum(o.square().sum() for o in outs_eager).backward()
    for a, b in zip(outs, outs_eager):
        torch.testing.assert_close(a, b)
    for (name, p), p_eager in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p.grad, p_eager.grad, msg=name)


def test_opcheck():
    steps, batch, hidden, proj = 2, 3, 4, 2
    x_proj = make_input((steps, batch, 4 * hidden), seed=1)
    lengths = torch.tensor([2, 0, 1])
    with dlkernels.backend("triton"):
        for w_hr, lens, reverse, training in ((None, None, False, True), (None, lengths, True, True),
                                              (make_input((proj, hidden), seed=2), lengths, False, True),
                                              (None, None, True, False)):
            out = proj if w_hr is not None else hidden
            w_hh = make_input((4 * hidden, out), seed=3, std=0.5)
            h0, c0 = make_input((batch, out), seed=4), make_input((batch, hidden), seed=5)
            args = (x_proj, w_hh, w_hr, h0, c0, lens, reverse, training)
            torch.library.opcheck(torch.ops.dlkernels.lstm_recurrence.default, args,
                                  test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
            if training:
                y, _, _, gates, c_all = torch.ops.dlkernels.lstm_recurrence(*args)
                grads = (make_input(y.shape, seed=6), make_input(h0.shape, seed=7), make_input(c0.shape, seed=8))
                torch.library.opcheck(torch.ops.dlkernels.lstm_recurrence_backward.default,
                                      (*grads, x_proj, w_hh, w_hr, h0, c0, lens, reverse, y, gates, c_all))
        gx, gh, cx = make_input((3, 8), seed=1), make_input((3, 8), seed=2), make_input((3, 2), seed=3)
        torch.library.opcheck(torch.ops.dlkernels.lstm_cell_forward.default, (gx, gh, cx))
        _, _, gates = torch.ops.dlkernels.lstm_cell_forward(gx, gh, cx)
        torch.library.opcheck(torch.ops.dlkernels.lstm_cell_backward.default,
                              (make_input((3, 2), seed=4), make_input((3, 2), seed=5), gates, cx, torch.float32))


def test_gradcheck_reference_float64():
    """The custom ops' autograd formulas (reference path, float64) against finite differences."""
    steps, batch, hidden = 3, 2, 2
    x_proj = make_input((steps, batch, 4 * hidden), torch.float64, seed=1, requires_grad=True)
    w_hh = make_input((4 * hidden, 1), torch.float64, seed=2, requires_grad=True)
    w_hr = make_input((1, hidden), torch.float64, seed=3, requires_grad=True)
    h0 = make_input((batch, 1), torch.float64, seed=4, requires_grad=True)
    c0 = make_input((batch, hidden), torch.float64, seed=5, requires_grad=True)
    lengths = torch.tensor([3, 1])

    def fn(x_proj, w_hh, w_hr, h0, c0):
        y, h, c, _, _ = torch.ops.dlkernels.lstm_recurrence(x_proj, w_hh, w_hr, h0, c0, lengths, True, True)
        return y, h, c

    with dlkernels.backend("reference"):
        assert torch.autograd.gradcheck(fn, (x_proj, w_hh, w_hr, h0, c0))


def _module_db_entries():
    try:
        from torch.testing._internal.common_modules import module_db
    except ImportError:
        return []
    return [m for m in module_db if m.module_cls in (torch.nn.LSTM, torch.nn.LSTMCell)]


@pytest.mark.parametrize("module_info", _module_db_entries(), ids=lambda m: m.module_cls.__name__)
def test_module_db_inputs(module_info):
    """PyTorch's own LSTM/LSTMCell test inputs (common_modules.module_db): forward values and gradients."""
    ours_cls = dlkernels.nn.LSTM if module_info.module_cls is torch.nn.LSTM else dlkernels.nn.LSTMCell
    inputs = module_info.module_inputs_func(module_info, device="cpu", dtype=torch.float64, requires_grad=True,
                                            training=True)
    assert inputs
    for module_input in inputs:
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        theirs = module_info.module_cls(*args, **kwargs).double()
        ours = ours_cls(*args, **kwargs).double()
        ours.load_state_dict(theirs.state_dict())
        fwd_args, fwd_kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        with dlkernels.backend("reference"):
            got = ours(*fwd_args, **fwd_kwargs)
        want = theirs(*fwd_args, **fwd_kwargs)
        got_flat, want_flat = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
        assert len(got_flat) == len(want_flat)
        for g, w in zip(got_flat, want_flat):
            torch.testing.assert_close(g, w)
        leaves = [t for t in torch.utils._pytree.tree_leaves((fwd_args, fwd_kwargs))
                  if isinstance(t, torch.Tensor) and t.requires_grad] + list(theirs.parameters())
        seeds = [make_input(w.shape, torch.float64, seed=i) for i, w in enumerate(want_flat)]
        with dlkernels.backend("reference"):
            g_ours = torch.autograd.grad(got_flat, leaves[:-len(list(theirs.parameters()))] + list(ours.parameters()),
                                         seeds)
        g_theirs = torch.autograd.grad(want_flat, leaves, seeds)
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Bad input.


class TestBadInput:
    def _lstm(self, **kwargs):
        return dlkernels.nn.LSTM(INPUT, HIDDEN, **kwargs)

    def test_wrong_input_size(self):
        with pytest.raises(RuntimeError, match="input_size"):
            self._lstm()(make_input((3, 2, INPUT + 1)))
        with pytest.raises(RuntimeError, match="input_size"):
            dlkernels.nn.LSTMCell(INPUT, HIDDEN)(make_input((2, INPUT + 1)))

    @pytest.mark.parametrize("shape", [(INPUT,), (1, 2, 3, INPUT)])
    def test_wrong_input_dims(self, shape):
        with pytest.raises(ValueError, match="Expected input to be 2D or 3D"):
            self._lstm()(make_input(shape))

    def test_wrong_h0_c0_shapes(self):
        x = make_input((3, 2, INPUT))
        h, c = make_input((1, 2, HIDDEN)), make_input((1, 2, HIDDEN))
        with pytest.raises(RuntimeError, match=r"hidden\[0\] size"):
            self._lstm()(x, (make_input((1, 3, HIDDEN)), c))
        with pytest.raises(RuntimeError, match=r"hidden\[1\] size"):
            self._lstm()(x, (h, make_input((2, 2, HIDDEN))))
        with pytest.raises(RuntimeError, match=r"hidden\[0\] size"):
            self._lstm(proj_size=2)(x, (h, c))  # h0 must have proj_size features
        with pytest.raises(RuntimeError, match="should also be 3-D"):
            self._lstm()(x, (h[0], c[0]))
        with pytest.raises(RuntimeError, match="should also be 2-D"):
            self._lstm()(x[:, 0], (h, c))

    def test_wrong_h0_c0_dtypes_and_devices(self):
        x = make_input((3, 2, INPUT))
        h, c = make_input((1, 2, HIDDEN)), make_input((1, 2, HIDDEN))
        with pytest.raises(RuntimeError, match="h_0 has dtype torch.float64"):
            self._lstm()(x, (h.double(), c))
        with pytest.raises(RuntimeError, match="c_0 has dtype torch.float16"):
            self._lstm()(x, (h, c.half()))
        with pytest.raises(RuntimeError, match="c_0 is on meta"):
            self._lstm()(x, (h, c.to("meta")))

    def test_non_floating_input(self):
        with pytest.raises(ValueError, match="dtype"):
            self._lstm()(torch.ones(3, 2, INPUT, dtype=torch.int64))
        w = make_input((4 * HIDDEN, INPUT))
        with pytest.raises(RuntimeError, match="floating dtype"):
            dlkernels.ops.lstm_layer(torch.ones(3, 2, INPUT, dtype=torch.int32), make_input((2, HIDDEN)),
                                     make_input((2, HIDDEN)), w, make_input((4 * HIDDEN, HIDDEN)))
        with pytest.raises(RuntimeError, match="floating dtype"):
            dlkernels.ops.lstm_cell(torch.ones(2, INPUT, dtype=torch.int64), make_input((2, HIDDEN)),
                                    make_input((2, HIDDEN)), w, make_input((4 * HIDDEN, HIDDEN)))

    def test_empty_sequence(self):
        with pytest.raises(RuntimeError, match="sequence length to be larger than 0"):
            self._lstm()(make_input((0, 2, INPUT)))
        y, (h, c) = self._lstm()(make_input((3, 0, INPUT)))  # an empty batch is fine, as in torch
        assert y.shape == (3, 0, HIDDEN) and h.shape == c.shape == (1, 0, HIDDEN)

    def test_unsorted_lengths_with_enforce_sorted(self):
        x = make_input((max(LENGTHS), len(LENGTHS), INPUT))
        with pytest.raises(RuntimeError, match="sorted in decreasing order"):
            self._lstm()(pack_padded_sequence(x, torch.tensor(LENGTHS)[ORDER], enforce_sorted=True))

    def test_op_argument_checks(self):
        x, h, c = make_input((3, 2, INPUT)), make_input((2, HIDDEN)), make_input((2, HIDDEN))
        w_ih, w_hh = make_input((4 * HIDDEN, INPUT)), make_input((4 * HIDDEN, HIDDEN))
        with pytest.raises(RuntimeError, match=r"w_ih has shape \(24, 4\)"):
            dlkernels.ops.lstm_layer(x, h, c, w_ih[:, :4], w_hh)
        with pytest.raises(RuntimeError, match="b_hh has shape"):
            dlkernels.ops.lstm_layer(x, h, c, w_ih, w_hh, make_input(4 * HIDDEN), make_input(3))
        with pytest.raises(RuntimeError, match="h0 has shape"):
            dlkernels.ops.lstm_layer(x, h[:1], c, w_ih, w_hh)
        with pytest.raises(RuntimeError, match="w_hh has dtype"):
            dlkernels.ops.lstm_layer(x, h, c, w_ih, w_hh.double())
        with pytest.raises(ValueError, match="lengths must lie in"):
            dlkernels.ops.lstm_layer(x, h, c, w_ih, w_hh, lengths=torch.tensor([4, 1]))
        with pytest.raises(TypeError, match="integer"):
            dlkernels.ops.lstm_layer(x, h, c, w_ih, w_hh, lengths=torch.tensor([3.0, 1.0]))
        with pytest.raises(RuntimeError, match="cx has shape"):
            dlkernels.ops.lstm_cell(x[0], h, c[:, :2], w_ih, w_hh)
        with pytest.raises(RuntimeError, match="w_hh has shape"):
            dlkernels.ops.lstm_cell(x[0], h, c, w_ih, w_hh[:, :2])

    def test_nan_and_inf_propagate_as_in_torch(self):
        ours, eager, _ = _modules(torch.float32)
        x = make_input((STEPS, BATCH, INPUT), seed=1)
        x[1, 0, 2] = float("nan")
        x[0, 2, 1] = float("inf")
        with dlkernels.backend("triton"):
            y, (h, c) = ours(x)
        y_eager, (h_eager, c_eager) = eager(x)
        for a, b in ((y, y_eager), (h, h_eager), (c, c_eager)):
            torch.testing.assert_close(a, b, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# Property tests: the ops on random shapes, lengths and directions against the float64 reference path.


@pytest.mark.fuzz
@settings(max_examples=min(8, settings().max_examples))
@given(
    steps=st.integers(1, 4), batch=st.integers(1, 3), size=st.integers(1, 4), hidden=st.integers(1, 5),
    proj=st.booleans(), reverse=st.booleans(), bias=st.booleans(), lengths_seed=st.integers(0, 2**16),
    packed=st.booleans(),
)
def test_fuzz_layer_matches_reference(steps, batch, size, hidden, proj, reverse, bias, lengths_seed, packed):
    out = max(1, hidden - 1) if proj and hidden > 1 else hidden
    w_hr = make_input((out, hidden), torch.float64, seed=5, std=0.5) if out != hidden else None
    params = [make_input((4 * hidden, size), torch.float64, seed=1, std=0.5),
              make_input((4 * hidden, out), torch.float64, seed=2, std=0.5)]
    biases = [make_input(4 * hidden, torch.float64, seed=3), make_input(4 * hidden, torch.float64, seed=4)] \
        if bias else [None, None]
    lengths = torch.randint(0, steps + 1, (batch,), generator=torch.Generator().manual_seed(lengths_seed)) \
        if packed else None
    x = make_input((steps, batch, size), torch.float64, seed=6)
    h0, c0 = make_input((batch, out), torch.float64, seed=7), make_input((batch, hidden), torch.float64, seed=8)
    seeds = [make_input(s, torch.float64, seed=9 + i) for i, s in
             enumerate(((steps, batch, out), (batch, out), (batch, hidden)))]

    def run(dtype, backend):
        leaves = [t.to(dtype).requires_grad_() for t in [x, h0, c0, *params, *(b for b in biases if b is not None)]
                  + ([w_hr] if w_hr is not None else [])]
        xi, hi, ci, wi, wh = leaves[:5]
        bi = leaves[5] if bias else None
        bh = leaves[6] if bias else None
        wr = leaves[-1] if w_hr is not None else None
        with dlkernels.backend(backend):
            outs = dlkernels.ops.lstm_layer(xi, hi, ci, wi, wh, bi, bh, wr, lengths=lengths, reverse=reverse)
            grads = torch.autograd.grad(outs, leaves, [s.to(dtype) for s in seeds])
        return list(outs) + list(grads)

    got, want, eager = run(torch.float32, "triton"), run(torch.float64, "reference"), run(torch.float32, "reference")
    for i, (g, w, e) in enumerate(zip(got, want, eager)):
        assert_close(g, w, e, terms=steps * batch + size + hidden, name=f"result {i}")


# ---------------------------------------------------------------------------------------------------------------
# The persistent engine's call path (reversal, lengths, dtypes, weight-gradient GEMMs), on the CPU: a stand-in for
# dlkernels._C that implements LSTM_CONTRACT.md's two functions with the reference math and checks their arguments.


class _ContractPersistent:
    calls = 0

    @staticmethod
    def _lengths(lengths, batch):
        assert lengths.dtype == torch.int32 and lengths.dim() == 1 and lengths.numel() in (0, batch)
        return None if lengths.numel() == 0 else lengths.long()

    @classmethod
    def lstm_persistent_forward(cls, x_proj, w_hh, h0, c0, lengths, training):
        from dlkernels.ops.lstm import reference_recurrence

        cls.calls += 1
        assert x_proj.is_contiguous() and w_hh.is_contiguous() and h0.dtype == x_proj.dtype == w_hh.dtype
        assert c0.dtype == torch.float32 and isinstance(training, bool)
        y, h, c, gates, c_all = reference_recurrence(x_proj, w_hh, None, h0, c0,
                                                     cls._lengths(lengths, x_proj.shape[1]), False)
        empty = torch.empty(0)
        return y, h, c.float(), gates if training else empty, c_all if training else empty

    @classmethod
    def lstm_persistent_backward(cls, grad_y, grad_h_n, grad_c_n, w_hh, gates, c_all, c0, lengths):
        from dlkernels.ops.lstm import reference_recurrence_backward

        cls.calls += 1
        for t in (grad_y, grad_h_n, grad_c_n, gates, c_all, c0):
            assert t.dtype == torch.float32 and t.is_contiguous()
        steps, batch, hidden = grad_y.shape
        unused = torch.zeros(steps, batch, hidden)  # y and h0 only feed grad W_hh, which the caller computes
        grad_gates, _, _, grad_h0, grad_c0 = reference_recurrence_backward(
            grad_y, grad_h_n, grad_c_n, w_hh, None, unused[0], c0, cls._lengths(lengths, batch), False, unused,
            gates, c_all)
        return grad_gates, grad_h0, grad_c0


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_persistent_call_path_with_a_contract_stand_in(monkeypatch, kind):
    from dlkernels import _backend
    from dlkernels.ops import lstm as lstm_ops

    monkeypatch.setattr(_backend, "cuda_extension", lambda: _ContractPersistent)
    monkeypatch.setattr(lstm_ops, "_engine", lambda x_proj, w_hr: "persistent")
    _ContractPersistent.calls = 0
    _compare(torch.float32, dict(num_layers=2, bidirectional=True), _input_maker(kind, False),
             _hx_maker(kind, False, 2, True, 0), backend="triton")
    assert _ContractPersistent.calls == 8  # 2 layers x 2 directions, forward and backward


@pytest.mark.parametrize("kind", ["padded", "packed", "unbatched"])
def test_cudnn_route_hands_the_call_to_torch_unchanged(monkeypatch, kind):
    """Where the engine table picks cuDNN (CUDA only), forward is torch's own with the caller's input and (h0, c0)."""
    from dlkernels.ops import lstm as lstm_ops

    ours, eager, _ = _modules(torch.float32, num_layers=2, bidirectional=True)
    x, hx = _input_maker(kind, False)(torch.float32), _hx_maker(kind, False, 2, True, 0)(torch.float32)
    assert not ours._use_cudnn(x)  # CPU tensors never take it
    monkeypatch.setattr(type(ours), "_use_cudnn", lambda self, input: True)
    monkeypatch.setattr(lstm_ops, "lstm_recurrence", None)  # no dlkernels recurrence may run
    y, (h, c) = ours(x, hx)
    y_eager, (h_eager, c_eager) = eager(x, hx)
    for a, b in ((y.data if kind == "packed" else y, y_eager.data if kind == "packed" else y_eager), (h, h_eager),
                 (c, c_eager)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# GPU: the engines at benchmark-like shapes against float64 (and the engine table's choices).


def _gpu_layer_check(dtype, steps, batch, hidden, backend, bidirectional=False, packed=False, proj=0):
    ours, eager, ref = (m.cuda() for m in _modules_sized(dtype, hidden, bidirectional=bidirectional, proj=proj))
    x = make_input((steps, batch, hidden), torch.float64, "cuda", seed=1)
    lengths = torch.randint(1, steps + 1, (batch,), generator=torch.Generator().manual_seed(0)) if packed else None
    make = (lambda dt: pack_padded_sequence(x.to(dt), lengths, enforce_sorted=False)) if packed else \
        (lambda dt: x.to(dt))
    got, _ = _run(ours, make(dtype), None, _seeded_grads, backend)
    want, _ = _run(ref, make(torch.float64), None, _seeded_grads)
    eager_out, _ = _run(eager, make(dtype), None, _seeded_grads)
    for name in want:
        terms = steps * batch if name.startswith("grad weight") or name.startswith("grad bias") else 2 * hidden
        assert_close(got[name], want[name], eager_out[name], terms=terms, name=name)


def _modules_sized(dtype, hidden, bidirectional, proj):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(hidden, hidden, bidirectional=bidirectional, proj_size=proj).double()
    eager = copy.deepcopy(ref).to(dtype)
    ours = dlkernels.nn.LSTM(hidden, hidden, bidirectional=bidirectional, proj_size=proj).to(dtype)
    ours.load_state_dict(eager.state_dict())
    return ours, eager, ref


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("steps,batch,hidden", [(64, 8, 256), (32, 64, 512), (16, 16, 1024)], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_engines_match_float64(dtype, steps, batch, hidden, backend):
    if backend == "cuda":
        from dlkernels.ops.lstm import persistent_available

        if not persistent_available(hidden, batch, torch.empty(0, device="cuda", dtype=dtype)):
            pytest.skip("the persistent kernel is not built or does not take this shape")
    _gpu_layer_check(dtype, steps, batch, hidden, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
def test_gpu_bidirectional_packed_proj(backend):
    try:
        _gpu_layer_check(torch.bfloat16, 32, 16, 256, backend, bidirectional=True, packed=True)
        _gpu_layer_check(torch.bfloat16, 16, 8, 256, backend, bidirectional=True, packed=True, proj=128)
    except dlkernels.BackendUnavailableError as exc:
        pytest.skip(str(exc))


def test_engine_table():
    from dlkernels.kernels.launch import lstm_engine

    assert lstm_engine("cpu", torch.float32, 8, 4, 16, False, persistent_ok=False) == "per_step"
    assert lstm_engine("cuda", torch.bfloat16, 256, 8, 512, False, persistent_ok=True) == "persistent"
    assert lstm_engine("cuda", torch.bfloat16, 256, 8, 512, True, persistent_ok=True, torch_path=True) == "cudnn"
    assert lstm_engine("cuda", torch.bfloat16, 256, 8, 512, False, persistent_ok=False) == "per_step"
    assert lstm_engine("cuda", torch.bfloat16, 256, 8, 512, False, persistent_ok=False, torch_path=True) == "cudnn"
    # The persistent backward is predicted slower than cuDNN's at large B * H^2: training goes to cuDNN there.
    big = dict(persistent_ok=True, torch_path=True)
    assert lstm_engine("cuda", torch.bfloat16, 512, 256, 1024, False, training=True, **big) == "cudnn"
    assert lstm_engine("cuda", torch.bfloat16, 512, 256, 1024, False, training=False, **big) == "persistent"
    assert lstm_engine("cuda", torch.bfloat16, 256, 64, 1024, False, training=True, **big) == "persistent"
