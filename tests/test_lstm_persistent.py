"""The persistent LSTM CUDA kernels of dlkernels._C (csrc/lstm/, LSTM_CONTRACT.md) on a GPU: forward and backward
through time against a float64 PyTorch loop of the same math, with the tolerance rule of dlkernels.testing (at most
2x the error of the same loop run by eager PyTorch in the kernel's dtype); what lstm_persistent_supported accepts and
refuses; argument errors; a long sequence that would hang on a wrong grid barrier (run in a subprocess with a
timeout). All tests are marked gpu (skipped without CUDA)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dlkernels.testing import assert_close, make_input

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HIDDEN = [256, 512, 1024]
BATCH = [1, 8, 64]
STEPS = 9


@pytest.fixture(scope="module")
def C():
    from dlkernels import _C

    return _C


def lstm_loop(x_proj, w_hh, h0, c0, lengths, dtype):
    """The contract's recurrence, step by step in `dtype` (float64: the reference; the kernel's dtype: eager
    PyTorch's error). Returns y, h_n, c_n, the post-activation gates and c after each step."""
    steps, batch = x_proj.shape[:2]
    x_proj, w_hh, h, c = (t.to(dtype) for t in (x_proj, w_hh, h0, c0))
    ys, gates, cs = [], [], []
    for t in range(steps):
        pre = x_proj[t] + h @ w_hh.t()
        i, f, g, o = pre.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        valid = (t < lengths).unsqueeze(1)
        h = torch.where(valid, h_new, h)
        c = torch.where(valid, c_new, c)
        ys.append(torch.where(valid, h_new, torch.zeros_like(h_new)))
        gates.append(torch.where(valid, torch.cat([i, f, g, o], dim=1), torch.zeros_like(pre)))
        cs.append(c)
    return torch.stack(ys), h, c, torch.stack(gates), torch.stack(cs)


def make_case(steps, batch, hidden, dtype, with_lengths, seed=0):
    scale = hidden ** -0.5  # torch.nn.LSTM's init range: keeps the gates out of saturation
    x_proj = make_input((steps, batch, 4 * hidden), dtype, "cuda", seed=seed)
    w_hh = make_input((4 * hidden, hidden), dtype, "cuda", seed=seed + 1, std=scale)
    h0 = make_input((batch, hidden), dtype, "cuda", seed=seed + 2, std=0.5)
    c0 = make_input((batch, hidden), torch.float32, "cuda", seed=seed + 3, std=0.5)
    if with_lengths:
        gen = torch.Generator().manual_seed(seed + 4)
        lengths = torch.randint(0, steps + 1, (batch,), generator=gen, dtype=torch.int32)
        lengths[0] = steps  # the longest row runs every step; the others stop anywhere, 0 included
        if batch > 2:
            lengths[1] = 0
        lengths = lengths.cuda()
    else:
        lengths = torch.empty(0, dtype=torch.int32, device="cuda")
    return x_proj, w_hh, h0, c0, lengths


def full_lengths(lengths, steps, batch):
    return lengths.long() if lengths.numel() else torch.full((batch,), steps, device="cuda")


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("batch", BATCH)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_match_float64(C, dtype, hidden, batch, with_lengths):
    check_against_float64(C, STEPS, batch, hidden, dtype, with_lengths)


@pytest.mark.parametrize("steps, batch, hidden", [(1, 70, 256), (5, 70, 384)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_partial_batch_chunks_single_step_and_odd_k_tiles(C, dtype, steps, batch, hidden):
    """B = 70: several 32-row chunks and a partial last one; T = 1: the backward's only barrier is before grad_h0;
    H = 384: K tiles of 384 (forward) and 768 (backward) columns."""
    check_against_float64(C, steps, batch, hidden, dtype, True)


def check_against_float64(C, steps, batch, hidden, dtype, with_lengths):
    assert C.lstm_persistent_supported(hidden, batch, dtype, torch.cuda.current_device())
    x_proj, w_hh, h0, c0, lengths = make_case(steps, batch, hidden, dtype, with_lengths)
    y, h_n, c_n, gates, c_all = C.lstm_persistent_forward(x_proj, w_hh, h0, c0, lengths, True)
    assert y.dtype == h_n.dtype == dtype and c_n.dtype == gates.dtype == c_all.dtype == torch.float32
    assert gates.shape == (steps, batch, 4 * hidden) and c_all.shape == (steps, batch, hidden)

    steps_of = full_lengths(lengths, steps, batch)
    leaves64 = [t.double().requires_grad_() for t in (x_proj, h0, c0)]
    leaves = [t.detach().clone().to(dtype).requires_grad_() for t in (x_proj, h0, c0)]
    ref = lstm_loop(leaves64[0], w_hh.double(), leaves64[1], leaves64[2], steps_of, torch.float64)
    eager = lstm_loop(leaves[0], w_hh, leaves[1], leaves[2], steps_of, dtype)
    for name, actual, r, e in zip(["y", "h_n", "c_n", "gates", "c_all"], (y, h_n, c_n, gates, c_all), ref, eager):
        assert_close(actual, r, e, terms=hidden, name=name)

    grad_y = make_input((steps, batch, hidden), torch.float32, "cuda", seed=10)
    grad_h_n = make_input((batch, hidden), torch.float32, "cuda", seed=11)
    grad_c_n = make_input((batch, hidden), torch.float32, "cuda", seed=12)
    grad_gates, grad_h0, grad_c0 = C.lstm_persistent_backward(
        grad_y, grad_h_n, grad_c_n, w_hh, gates, c_all, c0, lengths
    )
    assert grad_gates.dtype == grad_h0.dtype == grad_c0.dtype == torch.float32
    seeds = (grad_y, grad_h_n, grad_c_n)
    ref_grads = torch.autograd.grad(ref[:3], leaves64, [g.double() for g in seeds])
    eager_grads = torch.autograd.grad(eager[:3], leaves, [g.to(dtype) for g in seeds])
    for name, actual, r, e in zip(["grad_gates", "grad_h0", "grad_c0"], (grad_gates, grad_h0, grad_c0), ref_grads,
                                  eager_grads):
        assert_close(actual, r, e, terms=4 * hidden, name=name)
    if with_lengths:  # steps past a row's length: y = 0, no gradient into the gates
        invalid = torch.arange(steps, device="cuda").unsqueeze(1) >= steps_of.unsqueeze(0)
        assert not y[invalid].any() and not grad_gates[invalid].any()


def test_inference_returns_empty_saved_tensors(C):
    x_proj, w_hh, h0, c0, lengths = make_case(STEPS, 8, 256, torch.bfloat16, True)
    y, h_n, c_n, gates, c_all = C.lstm_persistent_forward(x_proj, w_hh, h0, c0, lengths, False)
    assert gates.numel() == 0 and c_all.numel() == 0
    y_t, h_n_t, c_n_t, _, _ = C.lstm_persistent_forward(x_proj, w_hh, h0, c0, lengths, True)
    assert torch.equal(y, y_t) and torch.equal(h_n, h_n_t) and torch.equal(c_n, c_n_t)


def test_misaligned_h0_and_zero_steps(C):
    x_proj, w_hh, h0, c0, lengths = make_case(STEPS, 8, 256, torch.float16, False)
    storage = torch.empty(h0.numel() + 1, dtype=h0.dtype, device="cuda")
    h0_odd = storage[1:].view_as(h0).copy_(h0)  # contiguous, 2 bytes past a 16-byte boundary
    expected = C.lstm_persistent_forward(x_proj, w_hh, h0, c0, lengths, False)
    got = C.lstm_persistent_forward(x_proj, w_hh, h0_odd, c0, lengths, False)
    assert all(torch.equal(a, b) for a, b in zip(expected[:3], got[:3]))
    y, h_n, c_n, _, _ = C.lstm_persistent_forward(x_proj[:0], w_hh, h0, c0, lengths, False)
    assert y.shape == (0, 8, 256) and torch.equal(h_n, h0) and torch.equal(c_n, c0)


def test_supported_accepts_and_refuses(C):
    device = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for dtype in DTYPES:
        for hidden in (256, 512, 768):
            assert C.lstm_persistent_supported(hidden, 64, dtype, device)
        if sms >= 128:  # 1024 / 8 units per CTA
            assert C.lstm_persistent_supported(1024, 256, dtype, device)
        assert not C.lstm_persistent_supported(100, 8, dtype, device)  # not a multiple of 128
        assert not C.lstm_persistent_supported(4096, 8, dtype, device)  # 512 CTAs: cannot be co-resident
    assert not C.lstm_persistent_supported(256, 8, torch.float64, device)
    x_proj, w_hh, h0, c0, lengths = make_case(2, 2, 4096, torch.bfloat16, False)
    with pytest.raises(RuntimeError, match="unsupported shape"):
        C.lstm_persistent_forward(x_proj, w_hh, h0, c0, lengths, False)


def test_bad_arguments_name_the_argument(C):
    x_proj, w_hh, h0, c0, lengths = make_case(3, 4, 256, torch.bfloat16, True)
    with pytest.raises(RuntimeError, match="w_hh"):
        C.lstm_persistent_forward(x_proj, w_hh[:, :128].contiguous(), h0, c0, lengths, False)
    with pytest.raises(TypeError, match="c0"):
        C.lstm_persistent_forward(x_proj, w_hh, h0, c0.bfloat16(), lengths, False)
    with pytest.raises(TypeError, match="lengths"):
        C.lstm_persistent_forward(x_proj, w_hh, h0, c0, lengths.long(), False)
    with pytest.raises(RuntimeError, match="h0"):
        C.lstm_persistent_forward(x_proj, w_hh, h0.t().contiguous().t(), c0, lengths, False)
    with pytest.raises(RuntimeError, match="lengths"):
        C.lstm_persistent_forward(x_proj, w_hh, h0, c0, lengths.cpu(), False)
    _, _, _, gates, c_all = C.lstm_persistent_forward(x_proj, w_hh, h0, c0, lengths, True)
    grad = torch.zeros(3, 4, 256, device="cuda")
    with pytest.raises(RuntimeError, match="gates"):
        C.lstm_persistent_backward(grad, grad[0], grad[0], w_hh, gates[:, :, :256], c_all, c0, lengths)
    with pytest.raises(TypeError, match="grad_y"):
        C.lstm_persistent_backward(grad.double(), grad[0], grad[0], w_hh, gates, c_all, c0, lengths)


_LONG_RUN = textwrap.dedent(
    """
    import torch
    from dlkernels import _C
    from tests.test_lstm_persistent import make_case
    steps, batch, hidden = 4096, 8, 512
    x_proj, w_hh, h0, c0, lengths = make_case(steps, batch, hidden, torch.bfloat16, True)
    y, h_n, c_n, gates, c_all = _C.lstm_persistent_forward(x_proj, w_hh, h0, c0, lengths, True)
    grad_gates, grad_h0, grad_c0 = _C.lstm_persistent_backward(
        torch.ones(steps, batch, hidden, device="cuda"), torch.ones_like(c0), torch.ones_like(c0), w_hh, gates,
        c_all, c0, lengths)
    torch.cuda.synchronize()
    # The kernels are deterministic: the first 32 steps equal a 32-step run bit for bit, and h_n is y at each
    # row's last step.
    y32 = _C.lstm_persistent_forward(x_proj[:32].contiguous(), w_hh, h0, c0, lengths.clamp(max=32), False)[0]
    assert torch.equal(y[:32], y32), "the first 32 steps differ from a 32-step run"
    last = (lengths.long() - 1).clamp(min=0)
    rows = torch.arange(batch, device="cuda")
    h_last = torch.where((lengths > 0).unsqueeze(1), y[last, rows], h0)
    assert torch.equal(h_n, h_last), "h_n is not y at each row's last step"
    for t in (y, c_n, grad_gates, grad_h0, grad_c0):
        assert torch.isfinite(t.float()).all()
    print("ok")
    """
)


def test_long_sequence_finishes():
    """4096 grid barriers forward and 4097 backward; a barrier that lost an arrival would hang: the subprocess is
    killed after the timeout and the test fails."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _LONG_RUN], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
