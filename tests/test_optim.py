"""dlkernels.optim (Adam, AdamW, SGD, SWATS) against torch.optim's for-loop optimizers and a plain PyTorch SWATS.

Kernel runs are compared with the tolerance rule of dlkernels.testing: error against a float64 run of torch's
optimizer at most 2x the error of torch's optimizer in the same dtype (plus a dtype floor).
"""
import copy
import math

import pytest
import torch

import dlkernels
from dlkernels.ops.optim import adam_step, sgd_step
from dlkernels.testing import assert_close, make_input

SHAPES = [(33,), (7, 11), (4, 3, 5)]
STEPS = 20

CONFIGS = {
    "adam": (dlkernels.optim.Adam, torch.optim.Adam, dict(lr=1e-2)),
    "adam_wd_amsgrad": (dlkernels.optim.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "adam_maximize_betas_eps": (
        dlkernels.optim.Adam, torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, maximize=True)
    ),
    "adam_lr_tensor": (dlkernels.optim.Adam, torch.optim.Adam, dict(lr=torch.tensor(1e-2))),
    "adam_decoupled_flag": (
        dlkernels.optim.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
    ),
    "adamw": (dlkernels.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    "adamw_amsgrad_maximize": (
        dlkernels.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, amsgrad=True, maximize=True)
    ),
    "sgd": (dlkernels.optim.SGD, torch.optim.SGD, dict(lr=0.1)),
    "sgd_momentum_dampening_wd": (
        dlkernels.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=1e-2)
    ),
    "sgd_nesterov_maximize": (
        dlkernels.optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)
    ),
    "sgd_lr_tensor": (dlkernels.optim.SGD, torch.optim.SGD, dict(lr=torch.tensor(0.05), momentum=0.5)),
}


def _initial_params(dtype, device="cpu"):
    return [make_input(s, dtype, device, seed=i) for i, s in enumerate(SHAPES)]


def _grad(step: int, index: int, p: torch.Tensor) -> torch.Tensor:
    """The same values (rounded to p's dtype) for every run: seeded by step and tensor."""
    return make_input(p.shape, torch.float64, seed=1000 + 37 * step + index).to(device=p.device, dtype=p.dtype)


def _groups(params, kwargs):
    """Two param groups; the second overrides lr (halved) to check per-group hyperparameters."""
    lr = kwargs.get("lr", 1e-3)
    second_lr = lr * 0.5 if not isinstance(lr, torch.Tensor) else torch.tensor(float(lr) * 0.5)
    return [{"params": params[:2]}, {"params": params[2:], "lr": second_lr}]


def _train(opt, params, first: int, last: int, scheduler=None):
    for k in range(first, last):
        for i, p in enumerate(params):
            p.grad = _grad(k, i, p)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _make(cls, params, kwargs, torch_flavour: bool):
    extra = {"foreach": False} if torch_flavour else {}
    return cls(_groups(params, kwargs), **kwargs, **extra)


def _state_tensors(opt, params):
    """(name, tensor) of every floating state tensor except step, in a fixed order."""
    out = []
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            if key in opt.state[p] and opt.state[p][key] is not None:
                out.append((f"{key}[{i}]", opt.state[p][key]))
    return out


def _compare_to_torch(ours_cls, torch_cls, kwargs, dtype, steps=STEPS, scheduler=None):
    runs = {}
    for name, cls, run_dtype in (("ours", ours_cls, dtype), ("eager", torch_cls, dtype),
                                 ("reference", torch_cls, torch.float64)):
        params = [p.to(run_dtype) for p in _initial_params(dtype)]
        opt = _make(cls, params, kwargs, torch_flavour=cls is torch_cls)
        sched = scheduler(opt) if scheduler else None
        _train(opt, params, 0, steps, sched)
        runs[name] = (opt, params)
    ours, eager, reference = (runs[k] for k in ("ours", "eager", "reference"))
    for i, (p, r, e) in enumerate(zip(ours[1], reference[1], eager[1])):
        assert_close(p, r, e, name=f"param[{i}]")
    for (name, s), (_, r), (_, e) in zip(*(_state_tensors(o, ps) for o, ps in (ours, reference, eager))):
        assert_close(s, r, e, name=name)
    assert len(_state_tensors(*ours)) == len(_state_tensors(*eager))
    for p, e in zip(ours[1], eager[1]):
        assert set(ours[0].state[p]) == set(eager[0].state[e])
        if "step" in eager[0].state[e]:
            step = ours[0].state[p]["step"]
            assert step.dtype == torch.float32 and step.shape == () and float(step) == float(eager[0].state[e]["step"])


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_torch_fp32_triton(config):
    ours, theirs, kwargs = CONFIGS[config]
    with dlkernels.backend("triton"):
        _compare_to_torch(ours, theirs, kwargs, torch.float32)


@pytest.mark.parametrize("config", ["adam_wd_amsgrad", "adamw", "sgd_momentum_dampening_wd"])
def test_matches_torch_reference_backend(config):
    """The reference path (the CPU fallback) is torch's own math: identical results."""
    ours_cls, torch_cls, kwargs = CONFIGS[config]
    with dlkernels.backend("reference"):
        results = []
        for cls in (ours_cls, torch_cls):
            params = _initial_params(torch.float32)
            _train(_make(cls, params, kwargs, torch_flavour=cls is torch_cls), params, 0, 5)
            results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", ["adam_wd_amsgrad", "adamw", "sgd_momentum_dampening_wd"])
def test_matches_torch_low_precision_triton(config, dtype):
    ours, theirs, kwargs = CONFIGS[config]
    with dlkernels.backend("triton"):
        _compare_to_torch(ours, theirs, kwargs, dtype)


def test_lr_scheduler_triton():
    with dlkernels.backend("triton"):
        _compare_to_torch(
            dlkernels.optim.Adam, torch.optim.Adam, dict(lr=1e-2), torch.float32, steps=12,
            scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5),
        )


@pytest.mark.parametrize(
    "ours_cls, torch_cls, kwargs",
    [
        (dlkernels.optim.Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
        (dlkernels.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2)),
        (dlkernels.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    ],
    ids=["adam", "adamw", "sgd"],
)
def test_state_dict_round_trip_torch_ours_torch(ours_cls, torch_cls, kwargs):
    """torch for 6 steps -> dlkernels for 6 -> torch for 6 continues like torch alone for 18 (and both ways the
    state loads into the other class, with torch's keys and types)."""
    with dlkernels.backend("triton"):
        runs = {}
        for name, dtype in (("eager", torch.float32), ("reference", torch.float64)):
            params = [p.to(dtype) for p in _initial_params(torch.float32)]
            _train(_make(torch_cls, params, kwargs, True), params, 0, 18)
            runs[name] = params

        params = _initial_params(torch.float32)
        first = _make(torch_cls, params, kwargs, True)
        _train(first, params, 0, 6)
        ours = _make(ours_cls, params, kwargs, False)
        ours.load_state_dict(first.state_dict())
        del first
        _train(ours, params, 6, 12)
        saved = ours.state_dict()
        for state in saved["state"].values():
            if "step" in state:
                assert state["step"].dtype == torch.float32 and state["step"].shape == ()
        last = _make(torch_cls, params, kwargs, True)
        last.load_state_dict(saved)
        _train(last, params, 12, 18)
    for i, (p, r, e) in enumerate(zip(params, runs["reference"], runs["eager"])):
        assert_close(p, r, e, name=f"param[{i}]")


def test_state_dict_loaded_copy_is_independent():
    """A loaded state dict continues on its own. state_dict() returns live tensors and torch's load_state_dict keeps
    them (torch shares buffers between two of its own optimizers the same way), so the state dict is copied, as a
    checkpoint would be; our load_state_dict copies by itself."""
    params_a = _initial_params(torch.float32)
    params_b = [p.clone() for p in params_a]
    with dlkernels.backend("triton"):
        a = dlkernels.optim.Adam(params_a, lr=1e-2)
        _train(a, params_a, 0, 3)
        b = torch.optim.Adam(params_b, lr=1e-2, foreach=False)
        for pa, pb in zip(params_a, params_b):
            pb.data.copy_(pa)
        b.load_state_dict(copy.deepcopy(a.state_dict()))
        _train(a, params_a, 3, 6)
        _train(b, params_b, 3, 6)
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert float(a.state[params_a[0]]["step"]) == 6.0


def test_params_without_grad_are_skipped_and_closure_returns_loss():
    params = _initial_params(torch.float32)
    before = params[1].clone()
    with dlkernels.backend("triton"):
        opt = dlkernels.optim.Adam(params, lr=1e-2)
        for i in (0, 2):
            params[i].grad = _grad(0, i, params[i])
        loss = opt.step(lambda: torch.tensor(3.5))
    assert float(loss) == 3.5
    assert params[1] not in opt.state or len(opt.state[params[1]]) == 0
    torch.testing.assert_close(params[1], before, rtol=0, atol=0)
    assert float(opt.state[params[0]]["step"]) == 1.0
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_add_param_group_mid_training():
    with dlkernels.backend("triton"):
        results = []
        for cls in (dlkernels.optim.SGD, torch.optim.SGD):
            params = _initial_params(torch.float32)
            opt = cls([params[0]], lr=0.1, momentum=0.9)
            for k in range(3):
                params[0].grad = _grad(k, 0, params[0])
                opt.step()
            opt.add_param_group({"params": params[1:], "lr": 0.05})
            _train(opt, params, 3, 6)
            results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- AMP: grad_scale / found_inf read on device --------------------------------------------------------------------


def _adam_lists(dtype=torch.float32):
    params = _initial_params(dtype)
    grads = [_grad(0, i, p) for i, p in enumerate(params)]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    return params, grads, exp_avgs, exp_avg_sqs, steps


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_adam_op_grad_scale_and_found_inf(backend):
    hyper = dict(lr=1e-2, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False, decoupled_weight_decay=False)
    with dlkernels.backend(backend):
        # Scaled grads with grad_scale = 4: the same update as unscaled grads, and the grads end unscaled.
        scaled = _adam_lists()
        plain = _adam_lists()
        for g in scaled[1]:
            g.mul_(4.0)
        adam_step(*scaled[:4], [], scaled[4], **hyper, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
        adam_step(*plain[:4], [], plain[4], **hyper)
        for a, b in zip(scaled[0] + scaled[1], plain[0] + plain[1]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        # found_inf set: nothing moves, step counts included.
        skipped = _adam_lists()
        before = [t.clone() for t in skipped[0] + skipped[2] + skipped[3] + skipped[4]]
        skipped[1][0][3] = float("inf")
        adam_step(*skipped[:4], [], skipped[4], **hyper, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0))
        for a, b in zip(skipped[0] + skipped[2] + skipped[3] + skipped[4], before):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_sgd_op_found_inf_skips(backend):
    params = _initial_params(torch.float32)
    grads = [_grad(0, i, p) for i, p in enumerate(params)]
    buffers = [torch.ones_like(p) for p in params]
    before = [t.clone() for t in params + buffers]
    with dlkernels.backend(backend):
        sgd_step(params, grads, buffers, False, 0.1, None, 0.9, 0.0, 0.0, False, False,
                 grad_scale=None, found_inf=torch.tensor(1.0))
    for a, b in zip(params + buffers, before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_optimizer_reads_grad_scaler_attributes():
    """GradScaler's contract with optimizers that set _step_supports_amp_scaling: grad_scale / found_inf
    attributes set around step()."""
    with dlkernels.backend("triton"):
        params = _initial_params(torch.float32)
        reference = [p.clone() for p in params]
        opt = dlkernels.optim.SGD(params, lr=0.1, momentum=0.9)
        ref_opt = torch.optim.SGD(reference, lr=0.1, momentum=0.9, foreach=False)
        assert opt._step_supports_amp_scaling
        for k in range(3):
            for i, (p, r) in enumerate(zip(params, reference)):
                p.grad = _grad(k, i, p) * 8.0
                r.grad = _grad(k, i, r)
            opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
            opt.step()
            ref_opt.step()
        opt.found_inf = torch.tensor(1.0)
        before = [p.clone() for p in params]
        opt.step()
        del opt.grad_scale, opt.found_inf
    for a, b, c in zip(params, reference, before):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def _check_grad_scaler_skips_inf_step(device: str) -> None:
    """torch.amp.GradScaler with an injected inf: the step is skipped (step count included), the scale halves, and
    the next step runs on unscaled gradients."""
    params = [p.requires_grad_() for p in _initial_params(torch.float32, device)]
    opt = dlkernels.optim.Adam(params, lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0)
    scaler.scale(sum((p * p).sum() for p in params)).backward()
    params[0].grad[0] = float("inf")
    before = [p.detach().clone() for p in params]
    scaler.step(opt)
    scaler.update()
    for a, b in zip(params, before):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    assert float(opt.state[params[0]]["step"]) == 0.0
    assert scaler.get_scale() == 512.0
    opt.zero_grad()
    scaler.scale(sum((p * p).sum() for p in params)).backward()
    scaler.step(opt)
    scaler.update()
    assert float(opt.state[params[0]]["step"]) == 1.0
    assert not torch.equal(params[0].detach(), before[0])
    # 2 p - the unscaled gradient of sum(p^2) - drives the first Adam step: -lr * sign(grad) (about).
    expected = before[1] - 1e-2 * torch.sign(before[1])
    torch.testing.assert_close(params[1].detach(), expected, rtol=1e-4, atol=1e-4)


def test_grad_scaler_cpu_skips_inf_step():
    with dlkernels.backend("triton"):
        _check_grad_scaler_skips_inf_step("cpu")


# --- SWATS against the paper ---------------------------------------------------------------------------------------

SWATS_LR, SWATS_BETAS, SWATS_EPS, SWATS_STEPS = 1e-2, (0.9, 0.999), 1e-4, 40


def _swats_problem(dtype):
    """A noisy quadratic: grad = c * w + noise(step), seeded. The switch comes at step 18 with the gap at 0.7 eps
    and at least 1.4 eps before it, so rounding cannot move it."""
    gen = torch.Generator().manual_seed(0)
    w0 = [torch.randn(33, generator=gen, dtype=torch.float64), torch.randn(7, 11, generator=gen, dtype=torch.float64)]
    curvature = [torch.rand(w.shape, generator=gen, dtype=torch.float64) + 0.5 for w in w0]

    def grads(ws, step):
        noise = torch.Generator().manual_seed(100 + step)
        return [
            (c * w.double() + 0.5 * torch.randn(w.shape, generator=noise, dtype=torch.float64)).to(dtype)
            for c, w in zip(curvature, ws)
        ]

    return [w.to(dtype) for w in w0], grads


def paper_swats(dtype):
    """SWATS, Keskar & Socher 2017, Algorithm 1, written out plainly (host-side switch test, one group)."""
    ws, grad_fn = _swats_problem(dtype)
    beta1, beta2 = SWATS_BETAS
    m = [torch.zeros_like(w) for w in ws]
    a = [torch.zeros_like(w) for w in ws]
    v = [torch.zeros_like(w) for w in ws]
    lam, phase_sgd, sgd_lr, switch_step = 0.0, False, 0.0, None
    for k in range(1, SWATS_STEPS + 1):
        gs = grad_fn(ws, k)
        if phase_sgd:
            for w, g, vk in zip(ws, gs, v):
                vk.mul_(beta1).add_(g)
                w.sub_((1 - beta1) * sgd_lr * vk)
            continue
        ps = []
        for w, g, mk, ak in zip(ws, gs, m, a):
            mk.mul_(beta1).add_((1 - beta1) * g)
            ak.mul_(beta2).add_((1 - beta2) * g * g)
            p = -SWATS_LR * math.sqrt(1 - beta2**k) / (1 - beta1**k) * mk / (ak.sqrt() + SWATS_EPS)
            w.add_(p)
            ps.append(p)
        pg = sum(float((p.double() * g.double()).sum()) for p, g in zip(ps, gs))
        if pg != 0:
            gamma = sum(float((p.double() ** 2).sum()) for p in ps) / -pg
            lam = beta2 * lam + (1 - beta2) * gamma
            if k > 1 and abs(lam / (1 - beta2**k) - gamma) < SWATS_EPS:
                phase_sgd, sgd_lr, switch_step = True, lam / (1 - beta2**k), k
    return ws, switch_step, sgd_lr


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_swats_matches_paper(backend):
    reference, ref_switch, ref_sgd_lr = paper_swats(torch.float64)
    eager, eager_switch, _ = paper_swats(torch.float32)
    assert ref_switch == eager_switch == 18

    ws, grad_fn = _swats_problem(torch.float32)
    switch_step = None
    with dlkernels.backend(backend):
        opt = dlkernels.optim.SWATS(ws, lr=SWATS_LR, betas=SWATS_BETAS, eps=SWATS_EPS)
        for k in range(1, SWATS_STEPS + 1):
            for w, g in zip(ws, grad_fn(ws, k)):
                w.grad = g
            opt.step()
            if switch_step is None and opt.in_sgd_phase()[0]:
                switch_step = k
    assert switch_step == ref_switch
    assert math.isclose(opt.sgd_lr()[0], ref_sgd_lr, rel_tol=1e-5)
    for i, (w, r, e) in enumerate(zip(ws, reference, eager)):
        assert_close(w, r, e, name=f"w[{i}]")
    assert set(opt.state[ws[0]]) == {"step", "exp_avg", "exp_avg_sq", "momentum_buffer"}
    assert float(opt.state[ws[0]]["step"]) == SWATS_STEPS


def test_swats_groups_switch_independently_and_state_dict():
    ws, grad_fn = _swats_problem(torch.float32)
    with dlkernels.backend("triton"):
        opt = dlkernels.optim.SWATS(
            [{"params": ws[:1]}, {"params": ws[1:], "eps": 1e-12}], lr=SWATS_LR, betas=SWATS_BETAS, eps=SWATS_EPS
        )
        for k in range(1, 25):
            for w, g in zip(ws, grad_fn(ws, k)):
                w.grad = g
            opt.step()
        assert opt.in_sgd_phase() == [True, False]
        saved = opt.state_dict()
        clone = dlkernels.optim.SWATS([{"params": [w.clone() for w in ws[:1]]}, {"params": [ws[1].clone()]}])
        clone.load_state_dict(saved)
        assert clone.in_sgd_phase() == [True, False]
        assert clone.sgd_lr() == opt.sgd_lr()


def test_swats_found_inf_skips():
    ws, grad_fn = _swats_problem(torch.float32)
    with dlkernels.backend("triton"):
        opt = dlkernels.optim.SWATS(ws, lr=SWATS_LR, eps=SWATS_EPS)
        for w, g in zip(ws, grad_fn(ws, 1)):
            w.grad = g
        opt.step()
        state = opt.param_groups[0]["switch_state"].clone()
        before = [w.clone() for w in ws]
        opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
        opt.step()
    torch.testing.assert_close(opt.param_groups[0]["switch_state"], state, rtol=0, atol=0)
    for w, b in zip(ws, before):
        torch.testing.assert_close(w, b, rtol=0, atol=0)


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [dlkernels.optim.Adam, dlkernels.optim.AdamW, dlkernels.optim.SGD, dlkernels.optim.SWATS])
def test_bad_input(cls):
    p = make_input((4,), requires_grad=True)
    with pytest.raises(TypeError, match="floating point"):
        cls([torch.arange(4)])
    with pytest.raises(ValueError, match="learning rate"):
        cls([p], lr=-1.0)
    with pytest.raises(ValueError, match="1-element"):
        cls([p], lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="one device"):
        cls([p, torch.zeros(4, device="meta", requires_grad=True)])
    if cls is not dlkernels.optim.SGD:
        with pytest.raises(ValueError, match="beta parameter at index 0"):
            cls([p], betas=(1.0, 0.999))
        with pytest.raises(ValueError, match="beta parameter at index 1"):
            cls([p], betas=(0.9, -0.1))
    else:
        with pytest.raises(ValueError, match="Nesterov"):
            cls([p], nesterov=True)
        with pytest.raises(ValueError, match="momentum"):
            cls([p], momentum=-0.5)
    if cls is not dlkernels.optim.SGD:  # SGD takes torch's path for sparse gradients
        opt = cls([p], lr=0.1)
        p.grad = torch.sparse_coo_tensor([[0]], [1.0], (4,))
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()


def test_op_checks_mismatched_lists():
    params, grads, exp_avgs, exp_avg_sqs, steps = _adam_lists()
    with pytest.raises(ValueError, match="grads has 2 tensors"):
        adam_step(params, grads[:2], exp_avgs, exp_avg_sqs, [], steps, 1e-3, None, 0.9, 0.999, 1e-8, 0.0, False,
                  False, False)
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] has shape"):
        adam_step(params, grads, [exp_avgs[0], exp_avgs[0], exp_avgs[2]], exp_avg_sqs, [], steps, 1e-3, None, 0.9,
                  0.999, 1e-8, 0.0, False, False, False)


def test_float64_params_fall_back_to_reference(monkeypatch):
    monkeypatch.setattr(dlkernels._backend, "_warned", set())  # the fallback warning is given once per process
    params = [p.double() for p in _initial_params(torch.float32)]
    reference = [p.clone() for p in params]
    with dlkernels.backend("triton"), pytest.warns(UserWarning, match="float64"):
        opt = dlkernels.optim.Adam(params, lr=1e-2)
        _train(opt, params, 0, 2)
    ref_opt = torch.optim.Adam(reference, lr=1e-2, foreach=False)
    _train(ref_opt, reference, 0, 2)
    for a, b in zip(params, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_contiguous_params_fall_back_to_reference(monkeypatch):
    monkeypatch.setattr(dlkernels._backend, "_warned", set())  # the fallback warning is given once per process
    params = [make_input((7, 5), seed=1).t(), make_input((6,), seed=2)]
    reference = [p.clone() for p in params]
    assert not params[0].is_contiguous()
    with dlkernels.backend("triton"), pytest.warns(UserWarning, match="non-contiguous"):
        _train(dlkernels.optim.SGD(params, lr=0.1, momentum=0.9), params, 0, 3)
    _train(torch.optim.SGD(reference, lr=0.1, momentum=0.9, foreach=False), reference, 0, 3)
    for a, b in zip(params, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck_adam_step():
    params, grads, exp_avgs, exp_avg_sqs, steps = _adam_lists()
    with dlkernels.backend("triton"):
        torch.library.opcheck(
            torch.ops.dlkernels.adam_step.default,
            (params, grads, exp_avgs, exp_avg_sqs, [], steps, 1e-3, None, 0.9, 0.999, 1e-8, 0.0, False, False, False,
             None, None),
            test_utils=("test_schema", "test_faketensor"),
        )


# --- GPU: CUDA and Triton paths, graph capture, GradScaler ----------------------------------------------------------


def _gpu_backends():
    return ["triton"] + (["cuda"] if dlkernels.available_backends()["cuda"] else [])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", ["adam_wd_amsgrad", "adamw_amsgrad_maximize", "adam_lr_tensor",
                                    "sgd_momentum_dampening_wd", "sgd_nesterov_maximize", "sgd"])
def test_gpu_matches_torch(config, dtype):
    ours_cls, torch_cls, kwargs = CONFIGS[config]
    for backend in _gpu_backends():
        runs = {}
        for name, cls, run_dtype in (("ours", ours_cls, dtype), ("eager", torch_cls, dtype),
                                     ("reference", torch_cls, torch.float64)):
            params = [p.to(run_dtype) for p in _initial_params(dtype, "cuda")]
            # Mixed sizes: one tensor over a chunk, one unaligned view-sized tensor.
            params.append(make_input((70001,), dtype, "cuda", seed=9).to(run_dtype))
            with dlkernels.backend(backend):
                opt = _make(cls, params, kwargs, torch_flavour=cls is torch_cls)
                _train(opt, params, 0, STEPS)
            runs[name] = params
        for i, (p, r, e) in enumerate(zip(runs["ours"], runs["reference"], runs["eager"])):
            assert_close(p, r, e, name=f"{backend} param[{i}]")


@pytest.mark.gpu
def test_gpu_swats_matches_paper():
    reference, ref_switch, ref_sgd_lr = paper_swats(torch.float64)
    eager, _, _ = paper_swats(torch.float32)
    for backend in _gpu_backends():
        ws, grad_fn = _swats_problem(torch.float32)
        ws = [w.cuda() for w in ws]
        with dlkernels.backend(backend):
            opt = dlkernels.optim.SWATS(ws, lr=SWATS_LR, betas=SWATS_BETAS, eps=SWATS_EPS)
            switch_step = None
            for k in range(1, SWATS_STEPS + 1):
                for w, g in zip(ws, grad_fn([w.cpu() for w in ws], k)):
                    w.grad = g.cuda()
                opt.step()
                if switch_step is None and opt.in_sgd_phase()[0]:
                    switch_step = k
        assert switch_step == ref_switch, backend
        assert math.isclose(opt.sgd_lr()[0], ref_sgd_lr, rel_tol=1e-5)
        for w, r, e in zip(ws, reference, eager):
            assert_close(w, r, e, name=f"{backend} w")


@pytest.mark.gpu
@pytest.mark.parametrize("cls, kwargs", [(dlkernels.optim.Adam, dict(lr="device tensor")),
                                         (dlkernels.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                         (dlkernels.optim.SWATS, dict(lr=1e-2))], ids=["adam", "sgd", "swats"])
def test_gpu_cuda_graph_capture(cls, kwargs):
    if kwargs["lr"] == "device tensor":
        kwargs = dict(kwargs, lr=torch.tensor(1e-2, device="cuda"))
    for backend in _gpu_backends():
        params = _initial_params(torch.float32, "cuda")
        eager_params = [p.clone() for p in params]
        with dlkernels.backend(backend):
            opt = cls(params, **kwargs)
            eager_opt = cls(eager_params, **kwargs)
            grads = [_grad(0, i, p) for i, p in enumerate(params)]
            for p, e, g in zip(params, eager_params, grads):
                p.grad, e.grad = g.clone(), g.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm up: state allocated, kernels compiled
                    opt.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            for _ in range(2):
                eager_opt.step()
            for _ in range(3):
                graph.replay()
                eager_opt.step()
            torch.cuda.synchronize()
        for p, e in zip(params, eager_params):
            torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-6)
        assert float(opt.state[params[0]]["step"]) == 5.0 if "step" in opt.state[params[0]] else True


@pytest.mark.gpu
def test_gpu_grad_scaler_inf_skips_step():
    for backend in _gpu_backends():
        with dlkernels.backend(backend):
            _check_grad_scaler_skips_inf_step("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not dlkernels.available_backends()["cuda"], reason="dlkernels._C not built")
@pytest.mark.parametrize("cls, kwargs", [(dlkernels.optim.Adam, dict(lr=1e-3)),
                                         (dlkernels.optim.SGD, dict(lr=1e-3, momentum=0.9)),
                                         (dlkernels.optim.SWATS, dict(lr=1e-3))], ids=["adam", "sgd", "swats"])
def test_gpu_one_kernel_per_step_lenet5(cls, kwargs):
    """The LeNet-5 list (10 tensors, one dtype, one group): a step is exactly one CUDA kernel."""
    sizes = [6 * 25, 6, 16 * 6 * 25, 16, 120 * 400, 120, 84 * 120, 84, 10 * 84, 10]
    params = [make_input((s,), device="cuda", seed=i) for i, s in enumerate(sizes)]
    for i, p in enumerate(params):
        p.grad = _grad(0, i, p)
    with dlkernels.backend("cuda"):
        opt = cls(params, **kwargs)
        opt.step()  # state allocated, counters created
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]
