"""``python -m dlkernels train MODEL``: trains one of ``dlkernels.models`` and shows it learning.

- ``lenet5`` (and the other image models, at demo widths): scikit-learn's bundled handwritten digits (1797 8x8
  images, no download), scaled to 32x32, 80/20 stratified split; the test accuracy is printed every epoch.
- ``bilstm_tagger``: tag every token with the token at the mirrored position (a reverse task: it needs both
  directions); ``lstm_lm``: a copy task (random tokens, a separator, the same tokens again; the accuracy is that of
  the copied half); ``speech_encoder``: random speech-like features (noisy per-class spectral prototypes held over
  segments of frames), one class per frame after subsampling. All seeded.

Writes ``<out>/<model>-results.json`` and the loss curve ``<out>/<model>-loss.png`` next to it. On a GPU it also
times a training step of the dlkernels model against the same model built from ``torch.nn`` alone (``stock=True``).

Backend: ``--backend auto`` (default) runs the kernels on a GPU. On a CPU, ``auto`` runs the dlkernels modules on
their reference path (eager PyTorch): the kernels themselves need a GPU, or Triton's interpreter
(``TRITON_INTERPRET=1``), which is far too slow for a demo. So the CPU demo shows the model layer and the
training loop, not kernel speed.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend, models, optim

MODELS = ("lenet5", "vgg11", "vgg16", "resnet18", "resnet34", "bilstm_tagger", "lstm_lm", "speech_encoder")


@dataclass
class Task:
    """A model, its data and how to score it. ``loss_and_hits(model, batch) -> (loss, hits, count)``."""

    model: Callable[[bool], nn.Module]  # stock -> model
    train: list
    test: list
    loss_and_hits: Callable
    epochs: int
    lr: float


def _batches(tensors: tuple, batch_size: int, generator: Optional[torch.Generator]) -> list:
    n = tensors[0].shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [tuple(t[order[i:i + batch_size]] for t in tensors) for i in range(0, n, batch_size)]


def _classify(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), int((logits.argmax(-1) == y).sum()), y.numel()


def _digits(seed: int, channels: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).repeat(1, channels, 1, 1)
    y = torch.tensor(digits.target)
    tr, te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed, stratify=y.numpy())
    return (x[tr], y[tr]), (x[te], y[te])


def _image_task(name: str, seed: int, batch_size: int) -> Task:
    builders = {
        "lenet5": (lambda stock: models.lenet5(stock=stock), 1, 8, 2e-3),
        "vgg11": (lambda stock: models.vgg11(batch_norm=True, num_classes=10, base_width=16, classifier_width=128,
                                             dropout=0.2, stock=stock), 3, 6, 1e-3),
        "vgg16": (lambda stock: models.vgg16(batch_norm=True, num_classes=10, base_width=16, classifier_width=128,
                                             dropout=0.2, stock=stock), 3, 6, 1e-3),
        "resnet18": (lambda stock: models.resnet18(num_classes=10, base_width=16, stock=stock), 3, 6, 2e-3),
        "resnet34": (lambda stock: models.resnet34(num_classes=10, base_width=16, stock=stock), 3, 6, 2e-3),
    }
    build, channels, epochs, lr = builders[name]
    train, test = _digits(seed, channels)
    gen = torch.Generator().manual_seed(seed)
    return Task(build, [train, gen], [test, None], _classify, epochs, lr)


def _sequence_task(name: str, seed: int, n_train: int = 1024, n_test: int = 256) -> Task:
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    if name == "bilstm_tagger":
        vocab, length = 16, 12
        tokens = torch.randint(1, vocab, (n, length), generator=gen)
        tags = tokens.flip(1)  # reverse task: the tag of position t is the token at T-1-t

        def score(model, batch):
            x, y = batch
            logits = model(x)
            return (F.cross_entropy(logits.flatten(0, 1), y.flatten()), int((logits.argmax(-1) == y).sum()),
                    y.numel())

        data = (tokens, tags)
        build = lambda stock: models.bilstm_tagger(vocab, vocab, 32, 64, stock=stock)  # noqa: E731
        epochs, lr = 12, 1e-2
    elif name == "lstm_lm":
        vocab, half = 12, 8  # tokens 1..vocab-1, 0 is the separator
        body = torch.randint(1, vocab, (n, half), generator=gen)
        sequences = torch.cat([body, torch.zeros(n, 1, dtype=body.dtype), body], 1)

        def score(model, batch):
            (seq,) = batch
            logits, _ = model(seq[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
            copied = logits[:, half:].argmax(-1) == seq[:, half + 1:]  # predictions of the copied half
            return loss, int(copied.sum()), copied.numel()

        data = (sequences,)
        build = lambda stock: models.lstm_lm(vocab, 32, 128, stock=stock)  # noqa: E731
        epochs, lr = 15, 1e-2
    else:  # speech_encoder
        classes, features, frames = 6, 20, 64
        subsampled = ((frames - 1) // 2 - 1) // 2
        prototypes = torch.randn(classes, features, generator=gen) * 1.5
        labels = torch.randint(0, classes, (n, subsampled // 3 + 1), generator=gen).repeat_interleave(3, 1)
        labels = labels[:, :subsampled]
        frame_labels = labels.repeat_interleave(4, 1)
        frame_labels = torch.cat([frame_labels, frame_labels[:, -1:].expand(n, frames - frame_labels.shape[1])], 1)
        feats = prototypes[frame_labels] + torch.randn(n, frames, features, generator=gen)

        def score(model, batch):
            x, y = batch
            logits = model(x)
            return (F.cross_entropy(logits.flatten(0, 1), y.flatten()), int((logits.argmax(-1) == y).sum()),
                    y.numel())

        data = (feats, labels)
        build = lambda stock: models.speech_encoder(features, 32, 2, 2, 64, window=(8, 2), dropout=0.0,  # noqa: E731
                                                    num_classes=classes, stock=stock)
        epochs, lr = 8, 3e-3
    train = tuple(t[:n_train] for t in data)
    test = tuple(t[n_train:] for t in data)
    return Task(build, [train, gen], [test, None], score, epochs, lr)


def make_task(name: str, seed: int = 0, batch_size: int = 64) -> Task:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if name in ("bilstm_tagger", "lstm_lm", "speech_encoder"):
        return _sequence_task(name, seed)
    return _image_task(name, seed, batch_size)


def _to(batch, device):
    return tuple(t.to(device) for t in batch)


def evaluate(model: nn.Module, task: Task, batch_size: int, device) -> tuple[float, float]:
    """(mean loss, accuracy) on the test split."""
    model.eval()
    loss_sum, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for batch in _batches(task.test[0], batch_size, None):
            loss, h, c = task.loss_and_hits(model, _to(batch, device))
            loss_sum += float(loss) * c
            hits, count = hits + h, count + c
    model.train()
    return loss_sum / count, hits / count


def step_time_ms(model: nn.Module, task: Task, batch_size: int, device, steps: int = 30) -> float:
    """Median wall time of one training step (forward, backward, optimizer) on ``device`` (CUDA events)."""
    opt = optim.Adam(model.parameters(), lr=task.lr) if not _is_stock(model) else \
        torch.optim.Adam(model.parameters(), lr=task.lr)
    batch = _to(_batches(task.train[0], batch_size, None)[0], device)
    times = []
    for i in range(steps + 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.zero_grad(set_to_none=True)
        task.loss_and_hits(model, batch)[0].backward()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        if i >= 5:  # warm-up: kernel compilation, autotuning, allocator
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _is_stock(model: nn.Module) -> bool:
    return not any(type(m).__module__.startswith("dlkernels.nn") for m in model.modules())


def train(
    name: str,
    *,
    epochs: Optional[int] = None,
    batch_size: int = 64,
    lr: Optional[float] = None,
    seed: int = 0,
    device: Optional[str] = None,
    backend: str = "auto",
    out_dir: str | Path = "train-results",
    progress: bool = True,
) -> dict:
    """Trains ``name`` (one of ``MODELS``) and returns the results written to ``<out_dir>/<name>-results.json``."""
    from tqdm.auto import tqdm

    task = make_task(name, seed, batch_size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    epochs = task.epochs if epochs is None else epochs
    lr = task.lr if lr is None else lr
    torch.manual_seed(seed)
    model = task.model(False).to(device)
    opt = optim.Adam(model.parameters(), lr=lr)
    history = {"step_loss": [], "epochs": []}
    started = time.perf_counter()
    with _backend.backend(backend):
        for epoch in range(1, epochs + 1):
            batches = _batches(task.train[0], batch_size, task.train[1])
            bar = tqdm(batches, desc=f"{name} epoch {epoch}/{epochs}", unit="batch", disable=not progress,
                       leave=False)
            loss_sum, hits, count = 0.0, 0, 0
            for batch in bar:
                opt.zero_grad(set_to_none=True)
                loss, h, c = task.loss_and_hits(model, _to(batch, device))
                loss.backward()
                opt.step()
                loss = loss.item()
                history["step_loss"].append(loss)
                loss_sum, hits, count = loss_sum + loss * c, hits + h, count + c
                bar.set_postfix(loss=f"{loss:.4f}")
            test_loss, test_acc = evaluate(model, task, batch_size, device)
            row = {"epoch": epoch, "train_loss": loss_sum / count, "train_accuracy": hits / count,
                   "test_loss": test_loss, "test_accuracy": test_acc}
            history["epochs"].append(row)
            print(f"{name} epoch {epoch:3d}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
                  f" | test loss {test_loss:.4f} acc {test_acc:.4f}", flush=True)
        results = {
            "model": name, "device": str(device), "backend": backend,
            "kernels": "triton/cuda" if device.type == "cuda" or _backend.interpreter_active() and
            backend != "reference" else "reference (eager PyTorch: no GPU)",
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
            "train_seconds": time.perf_counter() - started,
            "test_accuracy": history["epochs"][-1]["test_accuracy"], "history": history,
        }
        if device.type == "cuda":
            torch.manual_seed(seed)
            stock = task.model(True).to(device)
            ours_ms = step_time_ms(model, task, batch_size, device)
            stock_ms = step_time_ms(stock, task, batch_size, device)
            results.update(step_ms_dlkernels=ours_ms, step_ms_stock=stock_ms, speedup=stock_ms / ours_ms)
            print(f"training step (batch {batch_size}): dlkernels {ours_ms:.3f} ms, stock PyTorch {stock_ms:.3f} ms "
                  f"({stock_ms / ours_ms:.2f}x)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results["loss_curve"] = str(_plot(history, name, out / f"{name}-loss.png"))
    (out / f"{name}-results.json").write_text(json.dumps(results, indent=1))
    print(f"{name}: test accuracy {results['test_accuracy']:.4f} after {epochs} epochs "
          f"({results['train_seconds']:.1f} s); wrote {out / f'{name}-results.json'} and {results['loss_curve']}")
    return results


def _plot(history: dict, name: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = history["step_loss"]
    per_epoch = len(steps) / max(len(history["epochs"]), 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(steps) + 1), steps, alpha=0.4, label="training loss (per step)")
    xs = [row["epoch"] * per_epoch for row in history["epochs"]]
    ax.plot(xs, [row["test_loss"] for row in history["epochs"]], "o-", label="test loss (per epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    if min(steps) > 0 and max(steps) / min(steps) > 20:
        ax.set_yscale("log")
    acc = history["epochs"][-1]["test_accuracy"]
    ax.set_title(f"dlkernels {name}: test accuracy {acc:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_arguments(parser) -> None:
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--epochs", type=int, help="default: enough for the task (lenet5: 8)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, help="Adam learning rate (default: the task's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backend", default="auto", choices=_backend.BACKENDS)
    parser.add_argument("--out", default="train-results", help="folder for the results JSON and loss curve PNG")


def main(args) -> int:
    results = train(args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    device=args.device, backend=args.backend, out_dir=args.out)
    return 0 if math.isfinite(results["history"]["epochs"][-1]["test_loss"]) else 1
