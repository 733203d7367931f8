"""dlkernels.ops.attention: Triton kernels (interpreter on CPU) against an explicit-mask float64 reference.

Error rule (dlkernels.testing): kernel error <= 2x (outputs) / 3x (gradients) eager PyTorch's error in the same
dtype, plus the dtype floor. Every Triton output is allocated NaN-poisoned (``poisoned_empty``), so elements a
kernel forgets to write fail the comparison.
"""
import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dlkernels
from dlkernels.ops import attention
from dlkernels.testing import compare, make_input

GRAD_FACTOR = 3.0


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled floating tensors for the duration of a test."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def make_qkv(b, hq, hkv, nq, nk, d, dtype, device, seed=0):
    q = make_input((b, hq, nq, d), dtype, device, seed=seed, requires_grad=True)
    k = make_input((b, hkv, nk, d), dtype, device, seed=seed + 1, requires_grad=True)
    v = make_input((b, hkv, nk, d), dtype, device, seed=seed + 2, requires_grad=True)
    return q, k, v


def explicit_allowed(nq, nk, window, causal, key_padding_mask, device):
    """The documented rule spelled out: i - left <= j <= i + right, causal caps right at 0, padding removed."""
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    i = torch.arange(nq, device=device).view(nq, 1)
    j = torch.arange(nk, device=device).view(1, nk)
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if left is not None:
        allowed = allowed & (i - left <= j)
    if right is not None:
        allowed = allowed & (j <= i + right)
    allowed = allowed.view(1, 1, nq, nk)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.view(key_padding_mask.shape[0], 1, 1, nk)
    return allowed


def explicit_attention(q, k, v, allowed, scale, keep=None, dropout_p=0.0):
    """Eager attention in q's dtype with an explicit mask; rows with no key give 0 (torch.nan_to_num-free)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * allowed
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return probs @ v


def check_against_reference(q, k, v, *, causal=False, window=None, scale=None, key_padding_mask=None,
                            deterministic=False, keep=None, dropout_p=0.0, run=None):
    """Runs the Triton path (or ``run``), then checks out, dq, dk, dv against float64 with the eager-error budget."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    grad_out = make_input((*q.shape[:3], v.shape[3]), q.dtype, q.device, seed=99)
    with dlkernels.backend("triton"):
        if run is None:
            out = attention(q, k, v, causal=causal, window=window, scale=scale, key_padding_mask=key_padding_mask,
                            deterministic=deterministic)
        else:
            out = run()
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    allowed = explicit_allowed(q.shape[2], k.shape[2], window, causal, key_padding_mask, q.device)
    results = []
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    leaves_eager = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref = explicit_attention(*leaves64, allowed, scale, keep, dropout_p)
    eager = explicit_attention(*leaves_eager, allowed, scale, keep, dropout_p)
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double())
    eager_grads = torch.autograd.grad(eager, leaves_eager, grad_out)
    results.append(compare("out", out, ref, eager))
    for name, g, rg, eg in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads):
        results.append(compare(name, g, rg, eg, factor=GRAD_FACTOR))
    bad = [str(r) for r in results if not r.ok]
    assert not bad, "; ".join(bad)
    return out, grads


CASES = [
    # b, hq, hkv, nq, nk, d, causal, window
    (2, 2, 2, 64, 64, 32, True, None),
    (1, 2, 2, 113, 203, 40, False, None),
    (1, 2, 1, 113, 203, 72, True, None),
    (1, 4, 2, 96, 80, 64, False, (17, 5)),
    (1, 4, 1, 1, 203, 16, False, None),
    (1, 2, 2, 113, 1, 16, False, None),
    (2, 3, 3, 1, 1, 24, True, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_h{}x{}_n{}x{}_d{}_causal{}_w{}".format(*c))
def test_matches_reference(case, device, poisoned_empty):
    """fp16, the kernel's dtype (fp32 and fp64 take the reference path, tested below)."""
    b, hq, hkv, nq, nk, d, causal, window = case
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, torch.float16, device)
    check_against_reference(q, k, v, causal=causal, window=window)


def test_float32_takes_the_reference_path(device):
    q, k, v = make_qkv(1, 4, 2, 37, 51, 24, torch.float32, device, seed=5)
    with dlkernels.backend("triton"), pytest.warns(UserWarning, match="float32 inputs"):
        check_against_reference(q, k, v, window=(5, 9))


def test_single_key(device, poisoned_empty):
    q, k, v = make_qkv(2, 4, 2, 33, 1, 16, torch.float32, device, seed=13)
    grad_out = make_input(q.shape, q.dtype, device, seed=99)
    with dlkernels.backend("triton"):
        out = attention(q, k, v)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.testing.assert_close(out, v.detach().repeat_interleave(2, dim=1).expand_as(out), rtol=0, atol=1e-6)
    torch.testing.assert_close(dv, grad_out.view(2, 2, 2, 33, 16).sum((2, 3)).unsqueeze(2), rtol=1e-5, atol=1e-5)
    # Mathematically zero: the flash formula leaves rounding of dO . v (|dO . v| <~ 20 here).
    assert dq.abs().max() < 2e-5 and dk.abs().max() < 2e-5


def test_bfloat16(device, poisoned_empty):
    # On CPU the interpreter runs bf16 through fp32 copies (it cannot do bf16 arithmetic); on a GPU, bf16 dots.
    q, k, v = make_qkv(2, 4, 2, 75, 90, 40, torch.bfloat16, device, seed=17)
    kpm = torch.zeros(2, 90, dtype=torch.bool, device=device)
    kpm[1, 60:] = True
    for deterministic in (False, True):
        check_against_reference(q, k, v, window=(20, 3), key_padding_mask=kpm, deterministic=deterministic)


def _random_windows(count, seed=1234):
    rng = random.Random(seed)
    sides = lambda: rng.choice([None, 0, 1, rng.randrange(2, 40), rng.randrange(40, 200), 500])  # noqa: E731
    return [((sides(), sides()), rng.random() < 0.3) for _ in range(count)]


# With the interpreter's 32 x 32 blocks, sides of 1, 30, 31, 33, 62, 63 put a row's first or last key one off a
# block edge: they catch off-by-one block-skipping bounds and masked/unmasked phase bounds.
EDGE_WINDOWS = [((0, 0), False), ((1, 1), False), ((0, 1), False), ((1, 0), False), ((33, 31), False),
                ((31, 33), False), ((30, 31), False), ((31, 30), False), ((62, 63), False), ((63, 62), False),
                ((500, 500), False), ((8, None), True), ((None, 1), True)]


@pytest.mark.parametrize("window,causal", _random_windows(10, seed=2) + EDGE_WINDOWS)
def test_random_windows(window, causal, device, poisoned_empty):
    q, k, v = make_qkv(1, 2, 1, 70, 90, 16, torch.float16, device, seed=7)
    check_against_reference(q, k, v, causal=causal, window=window)


def test_scale_and_deterministic_backward(device, poisoned_empty):
    q, k, v = make_qkv(1, 4, 2, 50, 70, 48, torch.float16, device, seed=3)
    _, grads = check_against_reference(q, k, v, window=(9, 3), scale=0.3, deterministic=True)
    grad_out = make_input(q.shape, q.dtype, device, seed=99)
    for _ in range(2):
        with dlkernels.backend("triton"):
            out = attention(q, k, v, window=(9, 3), scale=0.3, deterministic=True)
            again = torch.autograd.grad(out, (q, k, v), grad_out)
        for g, g2 in zip(grads, again):
            assert torch.equal(g, g2), "deterministic backward is not bitwise reproducible"


def test_padding_and_rows_without_keys(device, poisoned_empty):
    b, nk = 3, 60
    kpm = torch.zeros(b, nk, dtype=torch.bool, device=device)
    kpm[0, 40:] = True  # trailing padding
    kpm[1] = True  # every key masked: all rows of batch 1 have no key
    kpm[2, ::3] = True
    # window (0, 2) + 50 queries over 60 keys: with batch 2's pattern every row keeps a key; batch 0 rows >= 40 none.
    q, k, v = make_qkv(b, 2, 2, 50, nk, 32, torch.float16, device, seed=5)
    for deterministic in (False, True):
        out, (dq, dk, dv) = check_against_reference(
            q, k, v, window=(0, 2), key_padding_mask=kpm, deterministic=deterministic
        )
        assert torch.all(out[1] == 0) and torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0)
        assert torch.all(out[0, :, 40:] == 0) and torch.all(dq[0, :, 40:] == 0)
        assert torch.all(dk[0, :, 40:] == 0) and torch.all(dv[0, :, 40:] == 0)


def test_no_nan_for_rows_outside_every_window(device, poisoned_empty):
    # 80 queries over 20 keys with a window of (2, 2): queries 22.. see no key at all.
    q, k, v = make_qkv(1, 2, 2, 80, 20, 16, torch.float16, device, seed=11)
    out, grads = check_against_reference(q, k, v, window=(2, 2))
    assert torch.all(out[:, :, 22:] == 0) and torch.all(grads[0][:, :, 22:] == 0)


def test_strided_inputs(device, poisoned_empty):
    b, n, h, d = 2, 45, 4, 40
    # (B, N, 3, H, D) packed projections viewed as (B, H, N, D): strided, last stride 1.
    packed = make_input((b, n, 3, h, d), torch.float16, device, seed=21).requires_grad_(True)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    grad_out = make_input((b, h, n, d), torch.float16, device, seed=99)
    with dlkernels.backend("triton"):
        out = attention(q, k, v, causal=True)
        (dpacked,) = torch.autograd.grad(out, packed, grad_out)
    leaves = [t.detach().contiguous().requires_grad_(True) for t in (q, k, v)]
    with dlkernels.backend("triton"):
        out_c = attention(*leaves, causal=True)
        grads_c = torch.autograd.grad(out_c, leaves, grad_out)
    assert torch.equal(out, out_c)
    for i, g in enumerate(grads_c):
        assert torch.equal(dpacked[:, :, i].transpose(1, 2), g)
    # A last dim that is not contiguous still works (the kernel takes every stride).
    qt = q.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True)
    kt, vt = (t.detach().requires_grad_(True) for t in (k, v))
    check_against_reference(qt, kt, vt, causal=True)


def test_keys_outside_window_blocks_are_never_read(device, poisoned_empty):
    """Keys more than a block beyond every window are NaN: block skipping (forward and backward) never touches them."""
    from dlkernels.kernels.attention import block_configs

    d, left, right = 16, 4, 6
    configs = [c for kind in ("fwd", "dkdv", "dq") for c in block_configs(16, torch.device(device), kind)]
    far = 2 * max(max(c["BLOCK_M"], c["BLOCK_N"]) for c in configs) + left + right
    n = far + 8 + 40
    rows = n - 8 - far  # queries 0 .. rows-1 are far from keys n-8 .. n-1
    q, k, v = make_qkv(1, 2, 2, rows, n, d, torch.float16, device, seed=31)
    k_poison, v_poison = (t.detach().clone() for t in (k, v))
    k_poison[:, :, n - 8:] = float("nan")
    v_poison[:, :, n - 8:] = float("nan")
    k_poison.requires_grad_(True)
    v_poison.requires_grad_(True)
    grad_out = make_input(q.shape, q.dtype, device, seed=99)
    results = []
    for keys, values in ((k_poison, v_poison), (k, v)):
        with dlkernels.backend("triton"):
            out = attention(q, keys, values, window=(left, right), deterministic=True)
            results.append((out, *torch.autograd.grad(out, (q, keys, values), grad_out)))
    for poisoned, clean in zip(*results):
        assert not poisoned.isnan().any()
        assert torch.equal(poisoned, clean)


# ---------------------------------------------------------------------------------------------------------------
# Property tests (hypothesis; the ci profile runs a small fixed budget, `pytest -m fuzz` the long one)

side = st.one_of(st.none(), st.integers(0, 3), st.integers(4, 80))


@st.composite
def attention_problems(draw):
    hkv = draw(st.integers(1, 2))
    return dict(
        b=draw(st.integers(1, 2)), hq=hkv * draw(st.integers(1, 2)), hkv=hkv,
        nq=draw(st.integers(0, 70)), nk=draw(st.integers(0, 70)),
        dk=draw(st.sampled_from([16, 24, 40])), dv=draw(st.sampled_from([None, 16, 32])),
        window=draw(st.one_of(st.none(), st.tuples(side, side))), causal=draw(st.booleans()),
        padding=draw(st.one_of(st.none(), st.floats(0.0, 1.0))), seed=draw(st.integers(0, 2**16)),
        layout=draw(st.sampled_from(["contiguous", "bnhd", "strided-d", "expanded-padding"])),
    )


def _with_layout(t, layout):
    """The same values as ``t`` (B, H, N, D) in another memory layout, as a differentiable view of a new leaf."""
    if layout == "bnhd":  # (B, N, H, D) storage, as projections are laid out
        return t.detach().transpose(1, 2).contiguous().requires_grad_(True).transpose(1, 2)
    if layout == "strided-d":  # every other element of a twice-wider last dim
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t.detach()
        return wide.requires_grad_(True)[..., ::2]
    return t


def _padding(b, nk, fraction, seed, device, layout="contiguous"):
    if fraction is None:
        return None
    if layout == "expanded-padding":  # one row shared by the batch: stride 0 along B
        return (torch.rand(1, nk, generator=torch.Generator().manual_seed(seed)) < fraction).to(device).expand(b, nk)
    return (torch.rand(b, nk, generator=torch.Generator().manual_seed(seed)) < fraction).to(device)


@pytest.mark.fuzz
@given(problem=attention_problems())
def test_property_matches_reference(problem):
    """fp16 kernel (forward and gradients) against float64 over odd lengths (0 included), windows, causal, GQA,
    Dv != Dk, random key padding and memory layouts (transposed, strided last dim, stride-0 padding mask) (CPU,
    interpreter: hypothesis and function-scoped fixtures do not mix)."""
    p, device = problem, "cpu"
    q, k, v = make_qkv(p["b"], p["hq"], p["hkv"], p["nq"], p["nk"], p["dk"], torch.float16, device, seed=p["seed"])
    if p["dv"] is not None:
        v = make_input((p["b"], p["hkv"], p["nk"], p["dv"]), torch.float16, device, seed=p["seed"] + 7,
                       requires_grad=True)
    q, k, v = (_with_layout(t, p["layout"]) for t in (q, k, v))
    kpm = _padding(p["b"], p["nk"], p["padding"], p["seed"], device, p["layout"])
    check_against_reference(q, k, v, causal=p["causal"], window=p["window"], key_padding_mask=kpm)


@pytest.mark.fuzz
@given(problem=attention_problems(), placements=st.lists(
    st.tuples(st.sampled_from(["q", "k"]), st.integers(0, 69), st.sampled_from([float("nan"), float("inf"),
                                                                                  -float("inf")])),
    min_size=1, max_size=3))
def test_property_non_finite_inputs(problem, placements):
    """Non-finite query rows and keys: the kernel's output is NaN exactly where torch's math path (float64) is,
    and matches it elsewhere."""
    p, device = problem, "cpu"
    q, k, v = (t.detach() for t in make_qkv(p["b"], p["hq"], p["hkv"], p["nq"], p["nk"], p["dk"], torch.float16,
                                            device, seed=p["seed"]))
    for tensor_name, row, value in placements:
        t = q if tensor_name == "q" else k
        if t.shape[2]:
            t[:, :, row % t.shape[2], row % t.shape[3]] = value
    kpm = _padding(p["b"], p["nk"], p["padding"], p["seed"], device)
    with dlkernels.backend("triton"):
        out = attention(q, k, v, causal=p["causal"], window=p["window"], key_padding_mask=kpm)
    allowed = explicit_allowed(p["nq"], p["nk"], p["window"], p["causal"], kpm, device)
    ref = explicit_attention(q.double(), k.double(), v.double(), allowed, 1.0 / math.sqrt(p["dk"]))
    assert torch.equal(out.isnan(), ref.isnan())
    eager = explicit_attention(q, k, v, allowed, 1.0 / math.sqrt(p["dk"]))
    finite = ~ref.isnan()
    result = compare("out", out[finite], ref[finite], eager[finite])
    assert result.ok, str(result)


# ---------------------------------------------------------------------------------------------------------------
# Dropout


def _seed_tensor(value):
    return torch.tensor(value, dtype=torch.int64)


def test_dropout_matches_reference_with_the_kernel_mask(device, poisoned_empty):
    from dlkernels.kernels.attention import dropout_keep_mask

    p, seed = 0.3, 123456789012345
    q, k, v = make_qkv(2, 2, 1, 45, 70, 32, torch.float16, device, seed=41)
    keep = dropout_keep_mask(seed, 2, 2, 45, 70, p, device)
    scale = 1.0 / math.sqrt(32)
    for deterministic in (False, True):
        def run():
            out, _ = torch.ops.dlkernels.attention_forward(
                q, k, v, None, _seed_tensor(seed), scale, 10, 5, p, deterministic
            )
            return out

        check_against_reference(q, k, v, window=(10, 5), keep=keep, dropout_p=p, run=run)


def test_dropout_kept_fraction(device):
    from dlkernels.kernels.attention import dropout_keep_mask

    for p in (0.1, 0.5):
        keep = dropout_keep_mask(2024, 2, 3, 64, 96, p, device)
        n = keep.numel()
        kept = int(keep.sum())
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(kept - n * (1 - p)) < 5 * sigma, f"kept {kept} of {n} at p={p}"
        # Different seeds give (almost surely) different masks; rows are not copies of each other.
        assert not torch.equal(keep, dropout_keep_mask(2025, 2, 3, 64, 96, p, device))
        assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_dropout_reproducible_for_a_generator_state(impl, device):
    q, k, v = make_qkv(1, 2, 2, 33, 40, 16, torch.float16, device, seed=51)
    with dlkernels.backend(impl):
        torch.manual_seed(0)
        a = attention(q, k, v, dropout_p=0.4)
        torch.manual_seed(0)
        b = attention(q, k, v, dropout_p=0.4)
        c = attention(q, k, v, dropout_p=0.4)
        plain = attention(q, k, v)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, plain)


# ---------------------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, reference path, errors


def test_opcheck(device):
    q, k, v = make_qkv(1, 4, 2, 20, 24, 16, torch.float32, device, seed=61)
    kpm = torch.zeros(1, 24, dtype=torch.bool, device=device)
    kpm[0, 3] = True
    with dlkernels.backend("triton"):
        torch.library.opcheck(
            torch.ops.dlkernels.attention_forward, (q, k, v, kpm, _seed_tensor(7), 0.25, 3, -1, 0.2, False)
        )
        out, lse = torch.ops.dlkernels.attention_forward(q, k, v, None, None, 0.25, -1, 0, 0.0, True)
        grad_out = make_input(out.shape, out.dtype, device, seed=62)
        torch.library.opcheck(
            torch.ops.dlkernels.attention_backward,
            (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse, None, None, 0.25, -1, 0, 0.0, True),
        )


def test_compile_fullgraph_no_recompile_on_length_change(device):
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def step(q, k, v):
        out = attention(q, k, v, window=(8, 0))
        return out.float().square().sum()

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    with dlkernels.backend("triton"):
        for n in (24, 40, 57):
            q, k, v = make_qkv(1, 2, 1, n, n, 16, torch.float16, device, seed=n)
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 2)
            loss = compiled(q, k, v)
            grads = torch.autograd.grad(loss, (q, k, v))
            loss_eager = step(q, k, v)
            grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
            assert torch.equal(loss, loss_eager)
            for g, ge in zip(grads, grads_eager):
                assert torch.equal(g, ge)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    torch._dynamo.reset()


def test_reference_path_matches_kernel_definition(device):
    q, k, v = make_qkv(2, 4, 2, 37, 51, 24, torch.float32, device, seed=71)
    kpm = torch.zeros(2, 51, dtype=torch.bool, device=device)
    kpm[1, 30:] = True
    with dlkernels.backend("reference"):
        check_against_reference(q, k, v, window=(5, 9), key_padding_mask=kpm,
                                run=lambda: attention(q, k, v, window=(5, 9), key_padding_mask=kpm))


# ---------------------------------------------------------------------------------------------------------------
# Bad and edge input: every case on both backends, with the class it must give (an error naming the argument, or
# the result torch's F.scaled_dot_product_attention gives).


def _sdpa64(q, k, v, **kwargs):
    group = q.shape[1] // k.shape[1] if k.shape[1] else 1
    k, v = (t.double().repeat_interleave(group, 1) for t in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k, v, **kwargs)


def _strided_padding_case():
    """A (2, 10) padding mask with strides (0, 2): a view of an expanded wider mask."""
    kpm = (torch.arange(20) % 3 == 0).view(1, 20).expand(2, 20)[:, ::2]
    assert kpm.stride() == (0, 2)
    out = attention(_q(), _kv(), _kv(), key_padding_mask=kpm)
    return out, _sdpa64(_q(), _kv(), _kv(), attn_mask=~kpm.reshape(2, 1, 1, 10))


def _q(shape=(2, 4, 7, 16), seed=0):
    return make_input(shape, torch.float16, seed=seed)


def _kv(shape=(2, 2, 10, 16), seed=1):
    return make_input(shape, torch.float16, seed=seed)


# (id, call -> result, expected): expected is (exception class, text the message must name) or "torch" (the result
# must match torch's SDPA in float64 within the fp16 error rule).
BAD_INPUTS = [
    ("q-3d", lambda: attention(_q()[0], _kv(), _kv()), (ValueError, "q must be 4-D")),
    ("k-dtype", lambda: attention(_q(), _kv().float(), _kv()), (TypeError, "dtype")),
    ("int-dtype", lambda: attention(_q().int(), _kv().int(), _kv().int()), (TypeError, "q must be float")),
    ("complex", lambda: attention(_q().cfloat(), _kv().cfloat(), _kv().cfloat()), (TypeError, "q must be float")),
    ("q-not-tensor", lambda: attention(_q().numpy(), _kv(), _kv()), (TypeError, "q must be a tensor")),
    ("v-length", lambda: attention(_q(), _kv(), _kv()[:, :, :5]), (ValueError, "k and v")),
    ("k-head-dim", lambda: attention(_q(), _kv()[..., :8], _kv()), (ValueError, "k head dim")),
    ("heads", lambda: attention(_q()[:, :3], _kv(), _kv()), (ValueError, "multiple of k/v heads")),
    ("batch", lambda: attention(_q(), _kv()[:1], _kv()[:1]), (ValueError, "batch")),
    ("device", lambda: attention(_q(), _kv().to("meta"), _kv()), (RuntimeError, "one device")),
    ("window-negative", lambda: attention(_q(), _kv(), _kv(), window=(-1, 3)), (ValueError, "window left")),
    ("window-arity", lambda: attention(_q(), _kv(), _kv(), window=(3,)), (ValueError, "window")),
    ("window-float", lambda: attention(_q(), _kv(), _kv(), window=(2.5, 3)), (ValueError, "window left")),
    ("dropout-1", lambda: attention(_q(), _kv(), _kv(), dropout_p=1.0), (ValueError, "dropout_p")),
    ("dropout-negative", lambda: attention(_q(), _kv(), _kv(), dropout_p=-0.1), (ValueError, "dropout_p")),
    ("kpm-shape", lambda: attention(_q(), _kv(), _kv(), key_padding_mask=torch.zeros(2, 9, dtype=torch.bool)),
     (ValueError, "key_padding_mask")),
    ("kpm-float", lambda: attention(_q(), _kv(), _kv(), key_padding_mask=torch.zeros(2, 10)),
     (TypeError, "key_padding_mask")),
    ("kpm-list", lambda: attention(_q(), _kv(), _kv(), key_padding_mask=[[False] * 10] * 2),
     (TypeError, "key_padding_mask")),
    ("scale-nan", lambda: attention(_q(), _kv(), _kv(), scale=float("nan")), (ValueError, "scale")),
    ("scale-1d", lambda: attention(_q(), _kv(), _kv(), scale=torch.ones(2)), (ValueError, "scale")),
    ("causal-str", lambda: attention(_q(), _kv(), _kv(), causal="yes"), (TypeError, "causal")),
    ("empty-nq", lambda: (attention(_q((2, 4, 0, 16)), _kv(), _kv()), _sdpa64(_q((2, 4, 0, 16)), _kv(), _kv())),
     "torch"),
    ("empty-nk", lambda: (attention(_q(), _kv((2, 2, 0, 16)), _kv((2, 2, 0, 16))),
                          _sdpa64(_q(), _kv((2, 2, 0, 16)), _kv((2, 2, 0, 16)))), "torch"),
    ("empty-d", lambda: (attention(_q((2, 4, 7, 0)), _kv((2, 2, 10, 0)), _kv((2, 2, 10, 0))),
                         _sdpa64(_q((2, 4, 7, 0)), _kv((2, 2, 10, 0)), _kv((2, 2, 10, 0)))), "torch"),
    ("empty-dk", lambda: (attention(_q((2, 4, 7, 0)), _kv((2, 2, 10, 0)), _kv()),
                          _sdpa64(_q((2, 4, 7, 0)), _kv((2, 2, 10, 0)), _kv(), scale=1.0)), "torch"),
    ("empty-batch", lambda: (attention(_q((0, 4, 7, 16)), _kv((0, 2, 10, 16)), _kv((0, 2, 10, 16))),
                             _sdpa64(_q((0, 4, 7, 16)), _kv((0, 2, 10, 16)), _kv((0, 2, 10, 16)))), "torch"),
    ("dv-differs", lambda: (attention(_q(), _kv(), _kv((2, 2, 10, 40))), _sdpa64(_q(), _kv(), _kv((2, 2, 10, 40)))),
     "torch"),
    ("scale-0d-tensor", lambda: (attention(_q(), _kv(), _kv(), scale=torch.tensor(0.7)),
                                 _sdpa64(_q(), _kv(), _kv(), scale=0.7)), "torch"),
    ("kpm-strided", lambda: _strided_padding_case(), "torch"),
    ("qkv-strided", lambda: (attention(_q((2, 7, 4, 16)).transpose(1, 2), _kv((2, 10, 2, 16)).transpose(1, 2),
                                       _kv((2, 16, 2, 10), seed=2).permute(0, 2, 3, 1)),
                             _sdpa64(_q((2, 7, 4, 16)).transpose(1, 2), _kv((2, 10, 2, 16)).transpose(1, 2),
                                     _kv((2, 16, 2, 10), seed=2).permute(0, 2, 3, 1))), "torch"),
]


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("call,expected", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_and_edge_inputs(call, expected, impl):
    with dlkernels.backend(impl):
        if expected == "torch":
            out, ref = call()
            eager = ref.half()  # the fp16 error bar: torch's result rounded to the dtype
            result = compare("out", out, ref, eager)
            assert result.ok, str(result)
        else:
            error, text = expected
            with pytest.raises(error, match=text):
                call()


def test_empty_inputs_have_empty_gradients(device):
    for shapes in [((2, 2, 0, 16), (2, 1, 5, 16), (2, 1, 5, 16)), ((2, 2, 4, 16), (2, 1, 0, 16), (2, 1, 0, 24))]:
        q, k, v = (make_input(s, torch.float16, device, seed=i, requires_grad=True) for i, s in enumerate(shapes))
        with dlkernels.backend("triton"):
            out = attention(q, k, v)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out), allow_unused=True)
        assert out.shape == (*q.shape[:3], v.shape[3]) and not out.any()
        for g, t in zip(grads, (q, k, v)):
            assert g.shape == t.shape and not g.any()


def test_value_head_dim_differs(device, poisoned_empty):
    """Dv != Dk (torch's SDPA allows it) runs on the kernel: forward and gradients against float64."""
    q, k, _ = make_qkv(1, 4, 2, 45, 37, 24, torch.float16, device, seed=91)
    v = make_input((1, 2, 37, 40), torch.float16, device, seed=92, requires_grad=True)
    check_against_reference(q, k, v, window=(9, 4))


def test_nan_and_inf_follow_torch(device):
    """A non-finite query row, or a non-finite key a row attends, makes that row NaN exactly where torch's math
    path does; other rows stay finite and correct. A row whose attended scores are all -inf is NaN (torch's
    softmax), unlike a row with no key at all (0)."""
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 40, 50, 16, torch.float16, device, seed=93))
    q[0, 0, 3] = float("nan")
    q[0, 1, 5] = float("inf")
    k[0, 0, 20] = float("nan")
    k[0, 1, 30] = float("-inf")
    q[0, 0, 10] = 0.0
    q[0, 0, 10, 0] = 1.0
    k[0, 0, 8:13, 0] = -float("inf")  # row 10 attends keys 8..12 only: all its scores -inf
    window = (2, 2)
    with dlkernels.backend("triton"):
        out = attention(q, k, v, window=window)
    allowed = explicit_allowed(40, 50, window, False, None, device)
    ref = explicit_attention(q.double(), k.double(), v.double(), allowed, 0.25)
    assert torch.equal(out.isnan(), ref.isnan()), (out.isnan().any(-1), ref.isnan().any(-1))
    assert out.isnan()[0, 0, 10].all() and out.isnan()[0, 0, 3].all() and out.isnan()[0, 0, 18:23].all()
    finite = ~ref.isnan()
    torch.testing.assert_close(out.double()[finite], ref[finite], rtol=0, atol=4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape,causal,window",
    [
        ((2, 8, 8, 1000, 1000, 64), True, None),
        ((2, 8, 2, 777, 1500, 128), False, None),
        ((1, 4, 4, 2048, 2048, 80), False, (256, 256)),
        ((1, 4, 1, 513, 513, 256), True, (100, None)),
        ((1, 4, 4, 300, 300, 40), False, (0, 0)),
    ],
)
def test_gpu_matches_reference(shape, causal, window, dtype, poisoned_empty):
    q, k, v = make_qkv(*shape, dtype, "cuda", seed=81)
    kpm = torch.zeros(shape[0], shape[4], dtype=torch.bool, device="cuda")
    kpm[-1, shape[4] // 2:] = True
    for deterministic in (False, True):
        check_against_reference(q, k, v, causal=causal, window=window, key_padding_mask=kpm,
                                deterministic=deterministic)
