"""LSTM against nn.LSTM (cuDNN) at the same dtype and a Python nn.LSTMCell loop: whole layers including the input
projection, inference (eval, no grad) and training (fwd+bwd: gradients of the input and every weight).

Providers: ``dlkernels`` (the ``auto`` backend: the engine table's choice), ``dlkernels per-step`` (backend
``triton``), ``dlkernels persistent`` (backend ``cuda``, where ``dlkernels._C`` has the persistent kernel and takes the
shape), ``torch (cuDNN)``, and ``nn.LSTMCell loop`` (one layer, one direction).
FLOPs counted: the gate GEMMs, 2 * B * 4H * (I + H) per step, layer and direction (I = H, then 2H after a
bidirectional layer); fwd+bwd 3x that.

``python bench/bench_lstm.py`` runs it alone; ``python bench/bench_lstm.py --per-step RESULTS.json`` prints µs per step
of every provider and plots µs/step against T and against B (PNG next to the JSON).
"""
import itertools
import sys

import torch

import dlkernels
import runner
from dlkernels.testing import compare, make_input

OP = "lstm"

STEPS = (128, 256, 1024)
BATCHES = (1, 8, 16, 64, 256)
HIDDENS = (256, 512, 768, 1024)
DTYPES = (torch.float32, torch.bfloat16)
# (T, B, H, layers, bidirectional, dtype, modes): the anchors of /work/shared/anchors first.
QUICK = [
    (256, 8, 512, 1, False, torch.bfloat16, ("eval", "fwd+bwd")),
    (256, 64, 512, 1, False, torch.float32, ("eval", "fwd+bwd")),
    (128, 256, 1024, 1, False, torch.bfloat16, ("eval",)),
    (256, 16, 256, 2, True, torch.bfloat16, ("fwd+bwd",)),
]


def _persistent_takes(hidden: int, batch: int, dtype) -> bool:
    from dlkernels.ops.lstm import persistent_available

    return persistent_available(hidden, batch, torch.empty(0, device="cuda", dtype=dtype))


def _cell_loop(cell: torch.nn.LSTMCell, x: torch.Tensor) -> torch.Tensor:
    h = c = x.new_zeros(x.shape[1], cell.hidden_size)
    outs = []
    for t in range(x.shape[0]):
        h, c = cell(x[t], (h, c))
        outs.append(h)
    return torch.stack(outs)


def _case(steps, batch, hidden, layers, bidirectional, dtype, mode) -> runner.Case:
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(hidden, hidden, num_layers=layers, bidirectional=bidirectional).to("cuda", dtype)
    ours = dlkernels.nn.LSTM(hidden, hidden, num_layers=layers, bidirectional=bidirectional).to("cuda", dtype)
    ours.load_state_dict(theirs.state_dict())
    training = mode == "fwd+bwd"
    out = hidden * (2 if bidirectional else 1)
    nbytes = steps * batch * hidden * torch.finfo(dtype).bits // 8
    sets = [(make_input((steps, batch, hidden), dtype, "cuda", seed=i, requires_grad=training),
             make_input((steps, batch, out), dtype, "cuda", seed=100 + i))
            for i in range(runner.rotation_count(2 * nbytes))]

    def runner_for(module, backend=None, forward=lambda m, x: m(x)[0]):
        params = list(module.parameters())

        def run(x, gy):
            with dlkernels.backend(backend or "auto"):
                if not training:
                    with torch.no_grad():
                        return forward(module, x)
                y = forward(module, x)
                return torch.autograd.grad(y, [x, *params], gy)

        return runner.rotating(run, sets)

    providers = {"dlkernels": runner_for(ours), "dlkernels per-step": runner_for(ours, "triton")}
    if _persistent_takes(hidden, batch, dtype):
        providers["dlkernels persistent"] = runner_for(ours, "cuda")
    providers["torch (cuDNN)"] = runner_for(theirs)
    if layers == 1 and not bidirectional:
        cell = torch.nn.LSTMCell(hidden, hidden).to("cuda", dtype)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(theirs, f"{name}_l0"))
        providers["nn.LSTMCell loop"] = runner_for(cell, forward=_cell_loop)
    for module in (ours, theirs):
        module.train(training)
    directions = 2 if bidirectional else 1
    inputs = [hidden] + [directions * hidden] * (layers - 1)  # each layer's input size
    flops = sum(2 * batch * 4 * hidden * (size + hidden) for size in inputs) * steps * directions
    flops *= 3 if training else 1
    kind = "bi" if bidirectional else "uni"
    name = f"T{steps} B{batch} H{hidden} L{layers} {kind} {str(dtype).replace('torch.', '')}"
    return runner.Case(OP, name, mode, providers, flops=flops,
                       params=dict(T=steps, B=batch, H=hidden, layers=layers, bidirectional=bidirectional,
                                   dtype=str(dtype)))


def cases(quick: bool) -> list:
    if quick:
        grid = [(t, b, h, l, bi, d, m) for t, b, h, l, bi, d, modes in QUICK for m in modes]
    else:
        # Every T, B, H, dtype and mode for one layer, one direction; two layers and bidirectional at T=256.
        grid = list(itertools.product(STEPS, BATCHES, HIDDENS, (1,), (False,), DTYPES, ("eval", "fwd+bwd")))
        grid += list(itertools.product((256,), BATCHES, (512, 1024), (1, 2), (True,), DTYPES, ("eval", "fwd+bwd")))
        grid += list(itertools.product((256,), BATCHES, (512, 1024), (2,), (False,), DTYPES, ("eval", "fwd+bwd")))
    return [_case(*args) for args in grid]


def checks() -> list:
    """Small-shape correctness of the per-step Triton engine against eager PyTorch, both measured against float64."""
    results = []
    for dtype, bidirectional, proj in ((torch.float32, True, 0), (torch.float16, False, 3), (torch.bfloat16, False, 0)):
        torch.manual_seed(0)
        ref = torch.nn.LSTM(5, 6, num_layers=2, bidirectional=bidirectional, proj_size=proj).double()
        eager = torch.nn.LSTM(5, 6, num_layers=2, bidirectional=bidirectional, proj_size=proj).to(dtype)
        ours = dlkernels.nn.LSTM(5, 6, num_layers=2, bidirectional=bidirectional, proj_size=proj).to(dtype)
        eager.load_state_dict(ref.state_dict())
        ours.load_state_dict(ref.state_dict())
        x = make_input((5, 3, 5), torch.float64, seed=1)
        outs = {}
        for name, module, dt in (("ours", ours, dtype), ("eager", eager, dtype), ("ref", ref, torch.float64)):
            xi = x.to(dt).requires_grad_()
            with dlkernels.backend("triton" if name == "ours" else "reference"):
                y, (h, c) = module(xi)
                gy = make_input(y.shape, dt, seed=2)
                outs[name] = (y, h, c, *torch.autograd.grad(y, [xi, *module.parameters()], gy))
        label = f"lstm 2 layers{' bi' if bidirectional else ''}{f' proj {proj}' if proj else ''}"
        names = ("output", "h_n", "c_n", "grad_input") + tuple(f"grad {n}" for n, _ in ours.named_parameters())
        for i, what in enumerate(names):
            terms = 15 if what.startswith("grad weight") or what.startswith("grad bias") else 11
            results.append(compare(f"{label} {what}", outs["ours"][i], outs["ref"][i], outs["eager"][i], terms=terms))
    return results


def launch_workload() -> None:
    """The benchmark's Triton launches (every B and H, fp32 and bf16, inference and fwd+bwd, uni- and bidirectional,
    packed lengths too) on CPU tensors, for bench/resource_usage.py, which records them without running them. Launch
    configurations depend on B, H and dtype, not on T or the layer count, so two steps of one layer suffice."""
    for batch, hidden, dtype in itertools.product(BATCHES, HIDDENS, DTYPES):
        name = f"B{batch} H{hidden} {str(dtype).replace('torch.', '')}"
        lstm = dlkernels.nn.LSTM(hidden, hidden, bidirectional=True).to(dtype)
        x = torch.empty(2, batch, hidden, dtype=dtype, requires_grad=True)
        with dlkernels.backend("triton"):
            with runner.workload_case(f"{name} bi fwd+bwd"):
                y, (h, c) = lstm(x)
                torch.autograd.grad((y, h, c), [x, *lstm.parameters()],
                                    (torch.empty_like(y), torch.empty_like(h), torch.empty_like(c)))
            with runner.workload_case(f"{name} packed eval"), torch.no_grad():
                lengths = torch.full((batch,), 2)
                lengths[batch // 2:] = 1
                lstm(torch.nn.utils.rnn.pack_padded_sequence(x.detach(), lengths))
            with runner.workload_case(f"{name} LSTMCell fwd+bwd"):
                cell = dlkernels.nn.LSTMCell(hidden, hidden).to(dtype)
                h, c = cell(x[0])
                torch.autograd.grad((h, c), [x, *cell.parameters()], (torch.empty_like(h), torch.empty_like(c)))


def per_step_report(path: str) -> None:
    """µs per step of every provider from a results JSON, and plots of µs/step against T and against B."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in json.loads(Path(path).read_text())["rows"] if "ms" in r]
    print("| case | mode | provider | µs/step |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['mode']} | {r['provider']} | {1000 * r['ms'] / r['T']:.2f} |")
    fig, axes = plt.subplots(2, 2, figsize=(10, 8), squeeze=False)
    for col, mode in enumerate(("eval", "fwd+bwd")):
        for row, (axis, fixed) in enumerate((("T", "B"), ("B", "T"))):
            ax = axes[row][col]
            for provider in sorted({r["provider"] for r in rows}):
                series = {}
                for r in rows:
                    if r["mode"] == mode and r["provider"] == provider and r["layers"] == 1 and not r["bidirectional"]:
                        key = (r[fixed], r["H"], r["dtype"])
                        series.setdefault(key, []).append((r[axis], 1000 * r["ms"] / r["T"]))
                for key, pts in sorted(series.items())[:4]:
                    ax.plot(*zip(*sorted(pts)), marker="o", label=f"{provider} {fixed}={key[0]} H={key[1]} {key[2]}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"lstm {mode}: µs/step against {axis}")
            ax.set_xlabel(axis)
            ax.set_ylabel("µs per step (median)")
            ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(Path(path).with_name(Path(path).stem + "-per-step.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--per-step"]:
        per_step_report(sys.argv[2])
        sys.exit(0)
    sys.exit(runner.main_for(sys.modules[__name__]))
