"""dlkernels.optim on edge and bad input (issue 7): NaN/Inf patterns, a bad-input matrix per optimizer family with
the expected outcome of each case, duplicated params, meta tensors, foreign state dicts, PyTorch's own optimizer test
inputs (optim_db), and hypothesis property tests against torch's for-loop optimizers in float64.

Expected outcomes in the matrix: ``TORCH`` (torch.optim raises, and ours raises the same exception type with the
same message), ``ours(Type, regex)`` (a dlkernels error naming the argument; torch accepts or fails later, unclearly)
and ``SAME`` (no error: the result is torch's).
"""
import copy
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

import dlkernels
from dlkernels.ops.optim import adam_step, sgd_step, swats_step
from dlkernels.testing import assert_close, make_input

# NaN/Inf inputs make numpy (under Triton's interpreter) warn about invalid values in sqrt: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

TORCH_CLS = {dlkernels.optim.Adam: torch.optim.Adam, dlkernels.optim.AdamW: torch.optim.AdamW,
             dlkernels.optim.SGD: torch.optim.SGD}
BACKENDS = ["triton", "reference"]


def _grads(params, step, specials=None):
    """Seeded gradients (the same for every run), optionally with NaN/+-inf at seeded places."""
    out = []
    for i, p in enumerate(params):
        g = make_input(p.shape, torch.float64, seed=500 + 31 * step + i)
        if specials is not None:
            _sprinkle(g, seed=900 + 31 * step + i, fraction=specials)
        out.append(g.to(p.dtype))
    return out


def _sprinkle(t: torch.Tensor, seed: int, fraction: float) -> None:
    """Puts NaN, +inf and -inf at about ``fraction`` of ``t``'s elements (seeded), in place."""
    if t.numel() == 0:
        return
    gen = torch.Generator().manual_seed(seed)
    flat = t.view(-1)
    pick = torch.rand(flat.numel(), generator=gen) < fraction
    kinds = torch.randint(0, 3, (flat.numel(),), generator=gen)
    values = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=t.dtype)[kinds]
    flat[pick] = values[pick]


def _run(cls, params, kwargs, steps, specials=None, state_specials=None, backend="triton"):
    """``steps`` steps of ``cls`` on ``params`` (modified in place); NaN/Inf sprinkled in the gradients and, after
    the first step, in every state tensor."""
    extra = {"foreach": False} if cls in TORCH_CLS.values() else {}
    with dlkernels.backend(backend):
        opt = cls(params, **kwargs, **extra)
        for k in range(steps):
            for p, g in zip(params, _grads(params, k, specials)):
                p.grad = g
            opt.step()
            if k == 0 and state_specials:
                for j, p in enumerate(params):
                    for key in sorted(opt.state[p]):
                        if key != "step" and opt.state[p][key] is not None:
                            _sprinkle(opt.state[p][key], seed=1300 + 7 * j + len(key), fraction=state_specials)
    return opt


def _assert_same_pattern_and_close(ours, eager, reference, name):
    """Same NaN / +inf / -inf places as torch's run in the same dtype; the finite values within the tolerance rule.

    In fp16/bf16 the pattern is the float64 reference's instead: torch's for-loop optimizers round every intermediate
    to the param dtype (eps=1e-8 is 0 in fp16, a small exp_avg_sq underflows to 0) and so make infs that fp32 math —
    ours, and torch's own fused kernels — does not. NaN/Inf inputs are placed in fp32 runs only."""
    pattern = eager if ours.dtype in (torch.float32, torch.float64) else reference
    for what, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        mismatch = fn(ours.double()) != fn(pattern.double())
        assert not mismatch.any(), f"{name}: {what} at {mismatch.nonzero().flatten().tolist()[:10]} differs from torch"
    finite = torch.isfinite(eager.float()) & torch.isfinite(reference)
    assert_close(ours[finite], reference[finite], eager[finite], name=name)


# --- drop-in signatures -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ours_cls", sorted(TORCH_CLS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_constructor_signature_and_defaults_match_installed_torch(ours_cls):
    """Every constructor argument of the installed torch's class, same name, kind and default (so an argument a new
    torch adds cannot slip by), and every group default torch keeps."""
    import inspect

    ours, theirs = (inspect.signature(c.__init__).parameters for c in (ours_cls, TORCH_CLS[ours_cls]))
    assert [(p.name, p.kind, p.default) for p in ours.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.values()]
    p = make_input((3,), requires_grad=True)
    assert ours_cls([p]).defaults == TORCH_CLS[ours_cls]([p]).defaults


# --- NaN / Inf -------------------------------------------------------------------------------------------------------

NAN_CONFIGS = {
    "adam": (dlkernels.optim.Adam, dict(lr=1e-2)),
    "adam_wd_amsgrad": (dlkernels.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "adam_maximize_small_beta1": (dlkernels.optim.Adam, dict(lr=1e-2, betas=(0.3, 0.9), maximize=True)),
    "adamw": (dlkernels.optim.AdamW, dict(lr=1e-2)),
    "adamw_no_decay_amsgrad": (dlkernels.optim.AdamW, dict(lr=1e-2, weight_decay=0.0, amsgrad=True)),
    "sgd": (dlkernels.optim.SGD, dict(lr=0.1)),
    "sgd_momentum": (dlkernels.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "sgd_nesterov_wd": (dlkernels.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "sgd_dampening_maximize": (dlkernels.optim.SGD, dict(lr=0.1, momentum=0.5, dampening=0.3, maximize=True)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", sorted(NAN_CONFIGS))
def test_nan_inf_pattern_as_torch(config, backend):
    """NaN and +-inf at random places in params, gradients (every step) and states: the pattern torch's for-loop
    optimizer gives, over 4 steps."""
    cls, kwargs = NAN_CONFIGS[config]
    runs = {}
    for name, run_cls, dtype in (("ours", cls, torch.float32), ("eager", TORCH_CLS[cls], torch.float32),
                                 ("reference", TORCH_CLS[cls], torch.float64)):
        params = [make_input(s, torch.float64, seed=i) for i, s in enumerate([(70,), (9, 13)])]
        for i, p in enumerate(params):
            _sprinkle(p, seed=77 + i, fraction=0.1)
        params = [p.to(dtype) for p in params]
        runs[name] = (_run(run_cls, params, kwargs, 4, specials=0.05, state_specials=0.05, backend=backend), params)
    for i in range(2):
        _assert_same_pattern_and_close(runs["ours"][1][i], runs["eager"][1][i], runs["reference"][1][i], f"param[{i}]")
        for key, value in runs["eager"][0].state[runs["eager"][1][i]].items():
            if key != "step" and value is not None:
                ours_value = runs["ours"][0].state[runs["ours"][1][i]][key]
                ref_value = runs["reference"][0].state[runs["reference"][1][i]][key]
                _assert_same_pattern_and_close(ours_value, value, ref_value, f"{key}[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [dlkernels.optim.Adam, dlkernels.optim.AdamW, dlkernels.optim.SGD,
                                 dlkernels.optim.SWATS], ids=lambda c: c.__name__)
def test_minus_inf_mask_stays_minus_inf_without_weight_decay(cls, backend):
    """A learnable mask holding -inf: with weight_decay == 0 there is no ``wd * param`` term, so no NaN."""
    mask = torch.tensor([0.0, float("-inf"), 1.0, float("-inf")])
    kwargs = dict(lr=0.1, weight_decay=0.0)
    with dlkernels.backend(backend):
        opt = cls([mask], **kwargs)
        for _ in range(3):
            mask.grad = torch.tensor([0.5, 0.25, -1.0, 0.0])
            opt.step()
    assert torch.isneginf(mask[[1, 3]]).all() and torch.isfinite(mask[[0, 2]]).all(), mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_inf_grad_does_not_spread_nan(backend):
    """An inf gradient once, then finite ones: torch's SGD keeps +-inf (no NaN) in params and buffers."""
    results = []
    for cls in (dlkernels.optim.SGD, torch.optim.SGD):
        p = torch.tensor([1.0, 2.0, 3.0])
        with dlkernels.backend(backend):
            opt = cls([p], lr=0.1, momentum=0.9) if cls is dlkernels.optim.SGD else cls([p], lr=0.1, momentum=0.9,
                                                                                        foreach=False)
            for k in range(3):
                p.grad = torch.tensor([float("inf"), 1.0, -float("inf")]) if k == 0 else torch.ones(3)
                opt.step()
        results.append((p, opt.state[p]["momentum_buffer"]))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    assert not torch.isnan(results[0][0]).any()


# --- duplicates, meta, state dicts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, kwargs", [(dlkernels.optim.Adam, dict(lr=1e-2, amsgrad=True)),
                                         (dlkernels.optim.AdamW, dict(lr=1e-2)),
                                         (dlkernels.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1))],
                         ids=["adam", "adamw", "sgd"])
def test_param_listed_twice_updates_twice_as_torch(cls, kwargs, backend):
    """torch warns, then updates a param listed twice twice per step, its step count moving on in between (the first
    update at step 1, not 2)."""
    results = []
    for run_cls in (cls, TORCH_CLS[cls]):
        a, b = make_input((40,), seed=1), make_input((5, 3), seed=2)
        params = [a, b, a]
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = run_cls(params, **kwargs, **({"foreach": False} if run_cls is TORCH_CLS[cls] else {}))
        with dlkernels.backend(backend):
            for k in range(3):
                a.grad, b.grad = _grads([a, b], k)
                opt.step()
        results.append((a, b, opt.state[a].get("step")))
    for ours, theirs in zip(results[0][:2], results[1][:2]):
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6)
    if results[1][2] is not None:
        assert float(results[0][2]) == float(results[1][2]) == 6.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_swats_param_listed_twice_matches_reference(backend):
    """SWATS has no torch class: a duplicated param is updated twice in a row, as the reference loop does."""
    runs = []
    for run_backend in (backend, "reference"):
        a = make_input((50,), seed=3)
        with pytest.warns(UserWarning, match="duplicate"):
            opt = dlkernels.optim.SWATS([a, a], lr=1e-2)
        with dlkernels.backend(run_backend):
            for k in range(3):
                a.grad = _grads([a], k)[0]
                opt.step()
        runs.append((a, float(opt.state[a]["step"]), opt.param_groups[0]["switch_state"].clone()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=2e-6, atol=2e-6)
    assert runs[0][1] == runs[1][1] == 6.0
    torch.testing.assert_close(runs[0][2], runs[1][2], rtol=1e-5, atol=1e-12)


def _adam_op_args(device_of=None):
    """Arguments of dlkernels.ops.adam_step on CPU; ``device_of``: the name of one argument to put on meta."""
    params = [make_input((6,), seed=1)]
    args = dict(params=params, grads=[make_input((6,), seed=2)], exp_avgs=[torch.zeros(6)],
                exp_avg_sqs=[torch.zeros(6)], max_exp_avg_sqs=[], steps=[torch.zeros(())], lr=1e-2, lr_tensor=None,
                beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                decoupled_weight_decay=False, grad_scale=None, found_inf=None)
    if device_of in ("lr_tensor", "grad_scale", "found_inf"):
        args[device_of] = torch.ones((), device="meta")
    elif device_of is not None:
        args[device_of] = [t.to("meta") for t in args[device_of]]
    return args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["grads", "exp_avgs", "exp_avg_sqs", "steps", "lr_tensor", "grad_scale", "found_inf"])
def test_op_meta_argument_is_an_error_not_a_silent_no_op(name, backend):
    """One argument on the meta device sends the call to the fake kernel: it must raise naming that argument."""
    args = _adam_op_args(name)
    before = args["params"][0].clone()
    with dlkernels.backend(backend), pytest.raises(ValueError, match=name):
        adam_step(**args)
    torch.testing.assert_close(args["params"][0], before, rtol=0, atol=0)


def test_op_meta_sgd_and_swats_arguments_raise():
    p = make_input((6,))
    with pytest.raises(ValueError, match="grads"):
        sgd_step([p], [torch.ones(6, device="meta")], [], False, 0.1, None, 0.0, 0.0, 0.0, False, False)
    with pytest.raises(ValueError, match="switch_state"):
        swats_step([p], [torch.ones(6)], [torch.zeros(6)], [torch.zeros(6)], [torch.zeros(6)], [torch.zeros(())],
                   torch.zeros(6, dtype=torch.float64, device="meta"), 1e-3, None, 0.9, 0.999, 1e-9, 0.0)


@pytest.mark.parametrize("cls", [dlkernels.optim.Adam, dlkernels.optim.SGD], ids=lambda c: c.__name__)
def test_meta_params_step_as_torch(cls):
    """All on meta (shape-only tensors): torch's optimizer steps without values and so does ours, state included."""
    results = []
    for run_cls in (cls, TORCH_CLS[cls]):
        p = torch.zeros(5, device="meta", requires_grad=True)
        p.grad = torch.ones(5, device="meta")
        opt = run_cls([p], lr=0.1, **({"momentum": 0.9} if cls is dlkernels.optim.SGD else {}))
        opt.step()
        results.append((p.device, sorted(opt.state[p])))
    assert results[0] == results[1]


@pytest.mark.parametrize("target, source, missing", [
    (dlkernels.optim.Adam, torch.optim.SGD, "betas"),
    (dlkernels.optim.AdamW, dlkernels.optim.SGD, "betas"),
    (dlkernels.optim.SGD, torch.optim.Adam, "momentum"),
    (dlkernels.optim.SWATS, torch.optim.Adam, "momentum_buffer"),
])
def test_load_state_dict_of_another_optimizer_is_refused_at_load(target, source, missing):
    """torch loads it and fails at step() with a KeyError; ours refuses at load, naming what is missing, and keeps
    its own state and groups."""
    p = make_input((4,), requires_grad=True)
    other = source([p], lr=0.1, **({"momentum": 0.9} if source in (torch.optim.SGD, dlkernels.optim.SGD) else {}))
    p.grad = torch.ones(4)
    other.step()
    ours = target([p], lr=0.1)
    def plain_groups():
        return [{k: v for k, v in g.items() if k != "params" and not isinstance(v, torch.Tensor)}
                for g in ours.param_groups]

    groups_before = copy.deepcopy(plain_groups())
    with pytest.raises(ValueError, match=missing):
        ours.load_state_dict(other.state_dict())
    assert plain_groups() == groups_before and len(ours.state) == 0


# --- the bad-input matrix --------------------------------------------------------------------------------------------

TORCH, SAME = "torch's error", "torch's result"


def ours(exc, match):
    return (exc, match)


def _p(shape=(4,), seed=0, **kw):
    return make_input(shape, seed=seed, requires_grad=True, **kw)


def _steps(opt, params, n=2):
    for k in range(n):
        for i, p in enumerate(params):
            p.grad = make_input(p.shape, torch.float64, seed=40 + 3 * k + i).to(p.dtype)
        opt.step()
    return [p.detach() for p in params] + [opt.state[p].get("momentum_buffer") for p in params
                                           if opt.state[p].get("momentum_buffer") is not None]


def _sparse_steps(opt, params, n=2):
    for k in range(n):
        for p in params:
            p.grad = torch.sparse_coo_tensor([[0, 2]], torch.tensor([1.0, -2.0 + k]), p.shape)
        opt.step()
    return [p.detach() for p in params]


def _stepped(cls, kwargs, *params):
    """Two steps of a new ``cls(params, **kwargs)``: the params (and momentum buffers) after them."""
    return _steps(cls(list(params), **kwargs), list(params))


def _sparse_stepped(cls, kwargs, *params):
    return _sparse_steps(cls(list(params), **kwargs), list(params))


def _bad_add_param_group(group):
    def case(cls, **kw):
        opt = cls([_p()], **kw)
        try:
            opt.add_param_group(group)
        finally:
            assert len(opt.param_groups) == 1, "a refused param group was registered"
    return case


def _common_cases(d):
    """Cases every family shares; ``d``: the family's default kwargs."""
    p = _p()
    return [
        ("params a tensor", lambda c: c(_p(), **d), TORCH),
        ("group params a set", lambda c: c([{"params": {_p()}}], **d), TORCH),
        ("empty params", lambda c: c([], **d), TORCH),
        ("non-leaf param", lambda c: c([_p() * 2], **d), TORCH),
        ("param in two groups", lambda c: c([{"params": [p]}, {"params": [p]}], **d), TORCH),
        ("lr negative", lambda c: c([_p()], **{**d, "lr": -1.0}), TORCH),
        ("lr tensor of 2", lambda c: c([_p()], **{**d, "lr": torch.tensor([0.1, 0.1])}), TORCH),
        ("weight_decay negative", lambda c: c([_p()], **{**d, "weight_decay": -1.0}), TORCH),
        ("names on some params", lambda c: c([("a", _p()), _p()], **d), TORCH),
        ("integer param", lambda c: c([torch.arange(4.0).long()], **d), ours(TypeError, "floating point")),
        ("complex param", lambda c: c([torch.zeros(4, dtype=torch.complex64, requires_grad=True)], **d),
         ours(TypeError, "complex")),
        ("params on two devices", lambda c: c([_p(), torch.zeros(4, device="meta", requires_grad=True)], **d),
         ours(ValueError, "one device")),
        ("add_param_group integer param", lambda c: _bad_add_param_group({"params": [torch.arange(3)]})(c, **d),
         ours(TypeError, "floating point")),
        ("add_param_group negative lr", lambda c: _bad_add_param_group({"params": [_p()], "lr": -1.0})(c, **d),
         ours(ValueError, "learning rate")),
        ("add_param_group param already in a group",
         lambda c: (lambda q: c([q], **d).add_param_group({"params": [q]}))(_p()), TORCH),
        ("tensor lr", lambda c: _stepped(c, {**d, "lr": torch.tensor(0.05)}, _p()), SAME),
        ("0-dim and empty params", lambda c: _stepped(c, d, _p(()), _p((0, 3)), _p((5,))), SAME),
        ("param without grad", lambda c: _steps(c([_p(), _p(seed=5)], **d), []), SAME),
    ]


def _adam_cases():
    d = dict(lr=1e-2)
    return _common_cases(d) + [
        ("eps negative", lambda c: c([_p()], **{**d, "eps": -1e-8}), TORCH),
        ("beta1 = 1", lambda c: c([_p()], **{**d, "betas": (1.0, 0.999)}), TORCH),
        ("beta2 negative", lambda c: c([_p()], **{**d, "betas": (0.9, -0.1)}), TORCH),
        ("one beta", lambda c: c([_p()], **{**d, "betas": (0.9,)}), TORCH),
        ("a float and a tensor beta", lambda c: c([_p()], **{**d, "betas": (0.9, torch.tensor(0.99))}), TORCH),
        ("integer beta", lambda c: c([_p()], **{**d, "betas": (0, 0.99)}), TORCH),
        ("tensor betas of 2", lambda c: c([_p()], **{**d, "betas": (torch.tensor([0.9, 0.8]), torch.tensor(0.99))}),
         TORCH),
        ("tensor lr with foreach", lambda c: c([_p()], **{**d, "lr": torch.tensor(0.1), "foreach": True}), TORCH),
        ("fused and foreach", lambda c: c([_p()], **{**d, "fused": True, "foreach": True}), TORCH),
        ("fused and differentiable", lambda c: c([_p()], **{**d, "fused": True, "differentiable": True}), TORCH),
        ("three betas", lambda c: c([_p()], **{**d, "betas": (0.9, 0.99, 0.5)}), ours(ValueError, "two values")),
        ("differentiable", lambda c: c([_p()], **{**d, "differentiable": True}), ours(ValueError, "differentiable")),
        ("sparse gradient", lambda c: _sparse_stepped(c, d, _p()), TORCH),
        ("add_param_group one beta", lambda c: _bad_add_param_group({"params": [_p()], "betas": (0.9,)})(c, **d),
         ours(IndexError, "")),
        ("tensor betas", lambda c: _stepped(c, {**d, "betas": (torch.tensor(0.8), torch.tensor(0.9))}, _p()), SAME),
        ("capturable, fused and foreach flags", lambda c: _stepped(
            c, {**d, "capturable": False, "foreach": False, "fused": False, "maximize": True}, _p()), SAME),
        ("amsgrad on fp16", lambda c: _stepped(c, {**d, "amsgrad": True}, _p((33,), dtype=torch.float16)), SAME),
    ]


def _sgd_cases():
    d = dict(lr=0.1)
    return _common_cases(d) + [
        ("momentum negative", lambda c: c([_p()], **{**d, "momentum": -0.5}), TORCH),
        ("nesterov without momentum", lambda c: c([_p()], **{**d, "nesterov": True}), TORCH),
        ("nesterov with dampening", lambda c: c([_p()], **{**d, "nesterov": True, "momentum": 0.9, "dampening": 0.1}),
         TORCH),
        ("fused and foreach", lambda c: c([_p()], **{**d, "fused": True, "foreach": True}), TORCH),
        ("fused and differentiable", lambda c: c([_p()], **{**d, "fused": True, "differentiable": True}), TORCH),
        ("differentiable", lambda c: c([_p()], **{**d, "differentiable": True}), ours(ValueError, "differentiable")),
        ("add_param_group nesterov without momentum",
         lambda c: _bad_add_param_group({"params": [_p()], "nesterov": True})(c, **d), ours(ValueError, "Nesterov")),
        ("sparse gradient", lambda c: _sparse_stepped(c, d, _p()), SAME),
        ("sparse gradient with momentum", lambda c: _sparse_stepped(c, {**d, "momentum": 0.9}, _p()), SAME),
        ("sparse gradient with weight decay", lambda c: _sparse_stepped(c, {**d, "weight_decay": 0.1}, _p()), TORCH),
        ("tensor momentum, dampening and decay", lambda c: _stepped(c, {
            **d, "momentum": torch.tensor(0.9), "dampening": torch.tensor(0.1), "weight_decay": torch.tensor(0.01)},
            _p()), SAME),
        ("negative dampening", lambda c: _stepped(c, {**d, "momentum": 0.5, "dampening": -0.5}, _p()), SAME),
        ("fused and foreach flags", lambda c: _stepped(c, {**d, "fused": False, "foreach": False}, _p()), SAME),
    ]


def _swats_cases():
    d = dict(lr=1e-2)
    swats_only = [
        ("eps negative", lambda c: c([_p()], **{**d, "eps": -1e-8}), TORCH),
        ("beta1 = 1", lambda c: c([_p()], **{**d, "betas": (1.0, 0.999)}), TORCH),
        ("beta2 negative", lambda c: c([_p()], **{**d, "betas": (0.9, -0.1)}), TORCH),
        ("one beta", lambda c: c([_p()], **{**d, "betas": (0.9,)}), TORCH),
        ("a float and a tensor beta", lambda c: c([_p()], **{**d, "betas": (0.9, torch.tensor(0.99))}), TORCH),
        ("sparse gradient", lambda c: _sparse_stepped(c, d, _p()), TORCH),
        ("three betas", lambda c: c([_p()], **{**d, "betas": (0.9, 0.99, 0.5)}), ours(ValueError, "two values")),
    ]
    # SAME cases have no torch SWATS to compare with; they are covered by test_optim.py's paper comparison.
    return [c for c in _common_cases(d) if c[2] is not SAME] + swats_only


FAMILIES = {
    "adam": (dlkernels.optim.Adam, torch.optim.Adam, _adam_cases),
    "adamw": (dlkernels.optim.AdamW, torch.optim.AdamW, _adam_cases),
    "sgd": (dlkernels.optim.SGD, torch.optim.SGD, _sgd_cases),
    "swats": (dlkernels.optim.SWATS, torch.optim.Adam, _swats_cases),  # torch's Adam: the same generic checks
}
MATRIX = [(family, case[0]) for family, (_, _, cases) in FAMILIES.items() for case in cases()]


def test_matrix_has_twenty_cases_per_family():
    for family in FAMILIES:
        assert sum(f == family for f, _ in MATRIX) >= 20, family


def _outcome(fn, cls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(cls), None
        except Exception as e:  # noqa: BLE001 - the exception is the outcome compared
            return None, e


@pytest.mark.parametrize("family, case", MATRIX, ids=[f"{f}-{c}" for f, c in MATRIX])
def test_bad_input_matrix(family, case):
    ours_cls, torch_cls, cases = FAMILIES[family]
    fn, expected = next((fn, exp) for name, fn, exp in cases() if name == case)
    with dlkernels.backend("triton"):
        result, error = _outcome(fn, ours_cls)
    theirs, their_error = _outcome(fn, torch_cls if expected is not SAME else
                                   (lambda *a, **k: torch_cls(*a, **k, foreach=False)
                                    if "foreach" not in k else torch_cls(*a, **k)))
    if expected is TORCH:
        assert their_error is not None, "torch accepts this case"
        assert type(error) is type(their_error), f"ours: {error!r}, torch: {their_error!r}"
        assert str(error).replace(ours_cls.__name__, torch_cls.__name__) == str(their_error)
    elif expected is SAME:
        assert error is None and their_error is None, (error, their_error)
        for a, b in zip(result, theirs):
            torch.testing.assert_close(a, b, equal_nan=True)
    else:
        exc, match = expected
        assert isinstance(error, exc), f"expected {exc.__name__}, got {error!r}"
        assert match.lower() in str(error).lower(), str(error)


# --- PyTorch's own optimizer test inputs ------------------------------------------------------------------------------


def _optim_db_entries():
    from torch.testing._internal.common_optimizers import optim_db

    out = []
    for info in optim_db:
        ours_cls = {v: k for k, v in TORCH_CLS.items()}.get(info.optim_cls)
        if ours_cls is None:
            continue
        for oi in info.optim_inputs_func(device="cpu"):
            out.append(pytest.param(ours_cls, info.optim_cls, oi.params, oi.kwargs,
                                    id=f"{info.optim_cls.__name__}-{oi.desc}"))
    return out


@pytest.mark.parametrize("ours_cls, torch_cls, params_arg, kwargs", _optim_db_entries())
def test_optim_db_inputs(ours_cls, torch_cls, params_arg, kwargs):
    """optim_db's optim_inputs_func configurations, 3 steps on our kernels vs torch's for-loop optimizer (fp32, with a
    float64 reference), two param groups when the input asks for them."""
    runs = {}
    for name, cls, dtype in (("ours", ours_cls, torch.float32), ("eager", torch_cls, torch.float32),
                             ("reference", torch_cls, torch.float64)):
        params = [make_input(s, dtype, seed=i) for i, s in enumerate([(17,), (3, 5)])]
        groups = params if params_arg is None else [{**g, "params": [params[i]]} for i, g in enumerate(params_arg)]
        extra = {"foreach": False} if cls is torch_cls and "foreach" not in kwargs else {}
        kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and cls is torch_cls and dtype == torch.float64 else v)
              for k, v in kwargs.items()}
        with dlkernels.backend("triton"):
            _steps(cls(groups, **kw, **extra), params, 3)
        runs[name] = params
    for i, (a, r, e) in enumerate(zip(runs["ours"], runs["reference"], runs["eager"])):
        assert_close(a, r, e, name=f"param[{i}]")


def _optim_db_error_entries():
    from torch.testing._internal.common_optimizers import optim_db

    out = []
    for info in optim_db:
        ours_cls = {v: k for k, v in TORCH_CLS.items()}.get(info.optim_cls)
        if ours_cls is None or info.optim_error_inputs_func is None:
            continue
        for i, ei in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            out.append(pytest.param(ours_cls, ei, id=f"{info.optim_cls.__name__}-{i}-{ei.optimizer_error_input.desc}"))
    return out


@pytest.mark.parametrize("ours_cls, error_input", _optim_db_error_entries())
def test_optim_db_error_inputs(ours_cls, error_input):
    """optim_db's optim_error_inputs_func: the same exception (or warning) and message as torch."""
    oi = error_input.optimizer_error_input
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            ours_cls(oi.params, **oi.kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            ours_cls(oi.params, **oi.kwargs)


# --- property tests ---------------------------------------------------------------------------------------------------

SHAPES = st.sampled_from([(), (0,), (1,), (5,), (3, 0), (7, 3), (65,), (2, 3, 11)])
ADAM_OPTIONS = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-3, 0.05]), "weight_decay": st.sampled_from([0.0, 0.1]),
    "amsgrad": st.booleans(), "maximize": st.booleans(),
    "betas": st.sampled_from([(0.9, 0.999), (0.3, 0.8)]), "eps": st.sampled_from([1e-8, 1e-3]),
})
SGD_OPTIONS = st.fixed_dictionaries({
    "lr": st.sampled_from([0.01, 0.1]), "weight_decay": st.sampled_from([0.0, 0.05]),
    "momentum": st.sampled_from([0.0, 0.9]), "dampening": st.sampled_from([0.0, 0.3]),
    "maximize": st.booleans(), "nesterov": st.booleans(),
})


def _layout(t: torch.Tensor, strided: bool) -> torch.Tensor:
    """``t``'s values in a non-contiguous view (every other element of a wider buffer) when ``strided``."""
    if not strided or t.dim() == 0:
        return t
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    view = wide[..., ::2]
    view.copy_(t)
    return view


@pytest.mark.fuzz
@given(family=st.sampled_from(["adam", "adamw", "sgd"]), shapes=st.lists(SHAPES, min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), adam=ADAM_OPTIONS, sgd=SGD_OPTIONS,
       strided=st.booleans(), specials=st.booleans(), steps=st.integers(1, 3), backend=st.sampled_from(BACKENDS),
       seed=st.integers(0, 2**16))
def test_property_matches_torch_for_loop(family, shapes, dtype, adam, sgd, strided, specials, steps, backend, seed):
    """Random shapes (0-dim, empty, odd), layouts (non-contiguous params and grads), dtypes, options, NaN/Inf (fp32)
    and step counts: ours vs torch's for-loop optimizer in the same dtype and in float64 (the tolerance rule)."""
    ours_cls, torch_cls, _ = FAMILIES[family]
    kwargs = sgd if family == "sgd" else adam
    if family == "sgd" and kwargs["nesterov"] and (kwargs["momentum"] == 0 or kwargs["dampening"] != 0):
        kwargs = {**kwargs, "nesterov": False}
    sprinkle = 0.1 if specials and dtype == torch.float32 else None
    runs = {}
    for name, cls, run_dtype in (("ours", ours_cls, dtype), ("eager", torch_cls, dtype),
                                 ("reference", torch_cls, torch.float64)):
        params = []
        for i, shape in enumerate(shapes):
            p = make_input(shape, torch.float64, seed=seed + i)
            if sprinkle:
                _sprinkle(p, seed=seed + 100 + i, fraction=sprinkle)
            params.append(_layout(p.to(dtype).to(run_dtype), strided and name == "ours"))
        extra = {} if cls is ours_cls else {"foreach": False}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback warning for non-contiguous params
            with dlkernels.backend(backend):
                opt = cls(params, **kwargs, **extra)
                for k in range(steps):
                    for p, g in zip(params, _grads(params, k + seed, sprinkle)):
                        p.grad = _layout(g.to(dtype).to(run_dtype), strided and name == "ours")
                    opt.step()
        runs[name] = params
    for i, (a, e, r) in enumerate(zip(runs["ours"], runs["eager"], runs["reference"])):
        _assert_same_pattern_and_close(a, e, r, f"param[{i}]")


# --- Triton: one launch per group ----------------------------------------------------------------------------------


def _count_launches(monkeypatch) -> dict:
    from triton.runtime.interpreter import InterpretedFunction

    counts: dict = {}
    original_run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        counts[self.fn.__name__] = counts.get(self.fn.__name__, 0) + 1
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    return counts


@pytest.mark.parametrize("cls, kwargs, kernel", [
    (dlkernels.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True), "_adam_kernel"),
    (dlkernels.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True), "_sgd_kernel"),
], ids=["adam", "sgd"])
def test_triton_one_launch_per_dtype_and_alignment_bucket(cls, kwargs, kernel, monkeypatch):
    """A group of 7 tensors: fp32 ones (aligned, and unaligned views into a flat buffer), bf16 ones and an empty one;
    one launch per (dtypes, alignment) bucket, the same results as torch's for-loop optimizer."""
    def make_params():
        flat = make_input((200,), seed=9)
        return [make_input((130,), seed=1), make_input((3, 7), seed=2), flat[1:66], flat[67:80].view(13),
                make_input((70,), torch.bfloat16, seed=3), make_input((5,), torch.bfloat16, seed=4), torch.zeros(0)]

    ours_params, torch_params = make_params(), make_params()
    counts = _count_launches(monkeypatch)
    with dlkernels.backend("triton"):
        opt = cls(ours_params, **kwargs)
        for k in range(3):
            for p, g in zip(ours_params, _grads(ours_params, k)):
                p.grad = g
            opt.step()
    assert counts[kernel] == 3 * 3, counts  # fp32 aligned, fp32 unaligned, bf16: 3 launches per step
    reference_params = [p.double() for p in make_params()]
    for params in (torch_params, reference_params):
        reference = TORCH_CLS[cls](params, **kwargs, foreach=False)
        for k in range(3):
            for p, g in zip(params, _grads(torch_params, k)):
                p.grad = g.to(p.dtype)
            reference.step()
    for i, (a, e, r) in enumerate(zip(ours_params, torch_params, reference_params)):
        assert_close(a, r, e, name=f"param[{i}]")


@pytest.mark.fuzz
@given(shapes=st.lists(SHAPES, min_size=1, max_size=3), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       lr=st.sampled_from([1e-3, 0.05]), weight_decay=st.sampled_from([0.0, 0.1]), specials=st.booleans(),
       duplicate=st.booleans(), steps=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_property_swats_kernels_match_reference(shapes, dtype, lr, weight_decay, specials, duplicate, steps, seed):
    """SWATS has no torch class: the Triton kernels vs its eager reference in the same dtype and in float64, over
    random shapes, dtypes, decay, NaN/Inf (fp32) and a param listed twice."""
    sprinkle = 0.1 if specials and dtype == torch.float32 else None
    runs = {}
    for name, backend, run_dtype in (("ours", "triton", dtype), ("eager", "reference", dtype),
                                     ("reference", "reference", torch.float64)):
        params = []
        for i, shape in enumerate(shapes):
            p = make_input(shape, torch.float64, seed=seed + i)
            if sprinkle:
                _sprinkle(p, seed=seed + 100 + i, fraction=sprinkle)
            params.append(p.to(dtype).to(run_dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the duplicate-parameter warning
            opt = dlkernels.optim.SWATS(params + params[:1] if duplicate else params, lr=lr, weight_decay=weight_decay)
        with dlkernels.backend(backend):
            for k in range(steps):
                for p, g in zip(params, _grads(params, k + seed, sprinkle)):
                    p.grad = g.to(dtype).to(run_dtype)
                opt.step()
        runs[name] = params
    for i, (a, e, r) in enumerate(zip(runs["ours"], runs["eager"], runs["reference"])):
        _assert_same_pattern_and_close(a, e, r, f"param[{i}]")
