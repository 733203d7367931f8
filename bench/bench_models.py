"""Whole training steps (forward, backward, optimizer) of dlkernels.models against the same models in stock PyTorch.

Providers per model: ``torch`` (the ``stock=True`` twin, ``torch.optim.Adam`` with its default foreach update),
``dlkernels`` (the dlkernels model, fused conv/batch-norm/LSTM/attention modules, ``dlkernels.optim.Adam``); with
``--full`` also both under ``torch.compile``, and the stock model run through ``dlkernels.convert`` +
``dlkernels.optim.from_torch`` (what a user with an existing model gets). bf16 parameters and activations (the
models are cast; an autocast variant is open work, see bench/NOTES.md, "Models"), image models in channels_last. Shapes are
those of the issue's targets (H200): VGG-16-BN and ResNet-18 at B64 224², the BiLSTM tagger at T256 B32 H512 2
layers, the speech encoder at B8 with 1500 frames after subsampling, d 256, 6 layers, window (64, 16).

The work of a case is the FLOPs torch's FlopCounterMode counts for one stock step (forward and backward), so the
table's TFLOP/s and the samples/s (batch / time) compare providers on the same work. FlopCounterMode does not count
cuDNN's fused RNN op: the LSTM models' TFLOP/s cover their other layers only (their time ratio is what matters).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import dlkernels
import runner
from dlkernels import models
from dlkernels.testing import compare, make_input

OP = "models"
DTYPE = torch.bfloat16


def _image_batch(batch, size, classes, device, seed):
    x = make_input((batch, 3, size, size), DTYPE, device, seed=seed, memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device, generator=torch.Generator(device).manual_seed(seed))
    return x, y


def _classify(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def _tag(model, batch):
    tokens, tags = batch
    return F.cross_entropy(model(tokens).flatten(0, 1).float(), tags.flatten())


def _frames(model, batch):
    features, labels = batch
    return F.cross_entropy(model(features).flatten(0, 1).float(), labels.flatten())


def specs(quick: bool) -> dict:
    """name -> (builder(stock) -> model, batch maker(device, seed), loss(model, batch), batch size, channels_last)."""
    def tokens(b, t, vocab, tags):
        def make(device, seed):
            gen = torch.Generator(device).manual_seed(seed)
            return (torch.randint(0, vocab, (b, t), device=device, generator=gen),
                    torch.randint(0, tags, (b, t), device=device, generator=gen))
        return make

    def speech(b, frames, features, classes):
        steps = ((frames - 1) // 2 - 1) // 2

        def make(device, seed):
            gen = torch.Generator(device).manual_seed(seed)
            return (make_input((b, frames, features), DTYPE, device, seed=seed),
                    torch.randint(0, classes, (b, steps), device=device, generator=gen))
        return make

    table = {
        "vgg16_bn B64 224": (lambda stock: models.vgg16(batch_norm=True, stock=stock),
                             lambda d, s: _image_batch(64, 224, 1000, d, s), _classify, 64, True),
        "resnet18 B64 224": (lambda stock: models.resnet18(stock=stock),
                             lambda d, s: _image_batch(64, 224, 1000, d, s), _classify, 64, True),
        "bilstm_tagger T256 B32 H512 L2": (
            lambda stock: models.bilstm_tagger(10000, 50, embedding_dim=256, hidden_size=512, num_layers=2,
                                               stock=stock),
            tokens(32, 256, 10000, 50), _tag, 32, False),
        "speech_encoder B8 T1500 d256 L6 w(64,16)": (
            lambda stock: models.speech_encoder(80, 256, 4, 6, 1024, window=(64, 16), dropout=0.0, num_classes=64,
                                                stock=stock),
            speech(8, 6003, 80, 64), _frames, 8, False),
    }
    if not quick:
        table["lenet5 B256 32"] = (lambda stock: models.lenet5(in_channels=3, stock=stock),
                                   lambda d, s: _image_batch(256, 32, 10, d, s), _classify, 256, True)
        table["lstm_lm T256 B32 H512 L2"] = (
            lambda stock: models.lstm_lm(10000, 512, 512, 2, stock=stock),
            tokens(32, 256, 10000, 10000), lambda m, b: F.cross_entropy(m(b[0])[0].flatten(0, 1).float(),
                                                                        b[1].flatten()), 32, False)
    return table


def _prepare(model, channels_last):
    model = model.to("cuda", DTYPE)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _step_fn(model, opt, loss_fn, batches):
    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()
    return runner.rotating(step, [(b,) for b in batches])


def _flops(model, loss_fn, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _lazy(build):
    """Builds a provider on its first call, so only the models being timed are in memory."""
    state = {}

    def call():
        if "fn" not in state:
            state["fn"] = build()
        return state["fn"]()
    return call


def cases(quick: bool) -> list:
    out = []
    for name, (build, make_batch, loss_fn, batch, channels_last) in specs(quick).items():
        batches = [make_batch("cuda", seed) for seed in range(2)]

        def stock(build=build, loss_fn=loss_fn, batches=batches, channels_last=channels_last, compiled=False):
            torch.manual_seed(0)
            model = _prepare(build(True), channels_last)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            return _step_fn(torch.compile(model) if compiled else model, opt, loss_fn, batches)

        def ours(build=build, loss_fn=loss_fn, batches=batches, channels_last=channels_last, compiled=False):
            torch.manual_seed(0)
            model = _prepare(build(False), channels_last)
            opt = dlkernels.optim.Adam(model.parameters(), lr=1e-4)
            return _step_fn(torch.compile(model) if compiled else model, opt, loss_fn, batches)

        def converted(build=build, loss_fn=loss_fn, batches=batches, channels_last=channels_last):
            torch.manual_seed(0)
            model = _prepare(build(True), channels_last)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            dlkernels.convert(model)
            return _step_fn(model, dlkernels.optim.from_torch(opt), loss_fn, batches)

        providers = {"dlkernels": _lazy(ours), "torch": _lazy(stock)}
        if not quick:
            providers["dlkernels.convert(stock)"] = _lazy(converted)
            providers["dlkernels + torch.compile"] = _lazy(lambda f=ours: f(compiled=True))
            providers["torch.compile"] = _lazy(lambda f=stock: f(compiled=True))
        torch.manual_seed(0)
        counted = _prepare(build(True), channels_last)
        flops = _flops(counted, loss_fn, batches[0])
        del counted
        torch.cuda.empty_cache()
        out.append(runner.Case(OP, name, "step", providers, flops=flops,
                               params=dict(model=name.split()[0], batch=batch, dtype=str(DTYPE),
                                           channels_last=channels_last),
                               notes={"dlkernels": f"samples/s = {batch} / time"}))
    return out


def checks() -> list:
    """A converted LeNet-5 (fused conv kernels through the interpreter on CPU) against the stock model: output and
    first-conv weight gradient in fp16, measured against float64."""
    torch.manual_seed(0)
    stock = models.lenet5(stock=True).half()
    eager, ref = copy.deepcopy(stock), copy.deepcopy(stock).double()
    ours = dlkernels.convert(copy.deepcopy(stock))
    x = make_input((2, 1, 32, 32), torch.float16, seed=1)
    outs = {}
    for key, model, xin in (("ours", ours, x), ("eager", eager, x), ("ref", ref, x.double())):
        with dlkernels.backend("triton" if key == "ours" else "reference"):
            y = model(xin)
            y.backward(torch.ones_like(y))
        outs[key] = (y, model.features[0].weight.grad)
    terms = sum(p.numel() for p in stock.parameters())
    return [compare(f"lenet5 converted {what}", outs["ours"][i], outs["ref"][i], outs["eager"][i], terms=terms)
            for i, what in enumerate(("output", "grad conv1 weight"))]


def launch_workload() -> None:
    """Every model's Triton launches on a small forward + backward (bf16, CPU tensors) for bench/resource_usage.py,
    which records them without running them. Widths are the benchmark's where they set kernel shapes (hidden 512,
    d_model 256, head dim 64); batch, length and image size are small."""
    dtype = torch.bfloat16
    runs = {
        "lenet5": (lambda: models.lenet5(in_channels=3), lambda: (torch.zeros(8, 3, 32, 32),)),
        "vgg11_bn": (lambda: models.vgg11(batch_norm=True, num_classes=10, classifier_width=64),
                     lambda: (torch.zeros(2, 3, 32, 32),)),
        "resnet18": (lambda: models.resnet18(num_classes=10), lambda: (torch.zeros(2, 3, 64, 64),)),
        "bilstm_tagger": (lambda: models.bilstm_tagger(100, 5, 256, 512),
                          lambda: (torch.zeros(2, 16, dtype=torch.long),)),
        "speech_encoder": (lambda: models.speech_encoder(80, 256, 4, 2, 1024, window=(64, 16), dropout=0.0),
                           lambda: (torch.zeros(2, 403, 80),)),
    }
    for name, (build, inputs) in runs.items():
        model = build().to(dtype)
        args = [t.to(dtype) if t.is_floating_point() else t for t in inputs()]
        if args[0].dim() == 4:
            model = model.to(memory_format=torch.channels_last)
            args[0] = args[0].contiguous(memory_format=torch.channels_last)
        with dlkernels.backend("triton"), runner.workload_case(f"{name} bf16"):
            y = model(*args)
            y.float().sum().backward()


if __name__ == "__main__":
    import sys

    sys.exit(runner.main_for(sys.modules[__name__]))
