"""torch.distributed: SyncBatchNorm, DistributedDataParallel and FSDP2 with dlkernels modules and optimizers.

Two CPU processes on gloo (torch.multiprocessing spawn, file rendezvous). One spawn runs every scenario (process
start-up dominates the cost); each rank saves what it computed and the tests here compare it with one process
running the whole batch, through dlkernels.testing's rule (float64 reference, eager PyTorch's error as the bar).
A scenario that hangs or crashes fails the tests within the timeout instead of hanging the suite.
"""
from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dlkernels
from dlkernels.testing import assert_close, make_input

WORLD = 2
TIMEOUT_S = 240

# SyncBatchNorm: the full batch and how it is split over the ranks (unequal, and one rank empty).
BN_SHAPE = (7, 3, 4, 2)
BN_SPLITS = {"unequal": [5, 2], "empty": [4, 0]}


def _bn_data(step: int):
    x = make_input(BN_SHAPE, seed=10 + step, mean=2.0, std=1.5)
    g = make_input(BN_SHAPE, seed=20 + step)
    return x, g


def _bn_params(module: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        module.weight.copy_(torch.rand(BN_SHAPE[1], generator=gen) + 0.5)
        module.bias.copy_(torch.randn(BN_SHAPE[1], generator=gen))


def _split(t: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _scenario_sync_bn(rank: int, split: str, relu: bool, dtype: torch.dtype = torch.float32) -> dict:
    sizes = BN_SPLITS[split]
    bn = dlkernels.nn.SyncBatchNorm(BN_SHAPE[1], activation="relu" if relu else None)
    _bn_params(bn)
    bn.to(dtype)
    out = {}
    for step in range(2):
        x, g = _bn_data(step)
        x = _split(x, sizes, rank).to(dtype).requires_grad_()
        y = bn(x)
        y.backward(_split(g, sizes, rank).to(dtype))
        out[f"y{step}"], out[f"dx{step}"] = y.detach(), x.grad
    out.update(dw=bn.weight.grad, db=bn.bias.grad, running_mean=bn.running_mean, running_var=bn.running_var,
               num_batches_tracked=bn.num_batches_tracked)
    return out


# DistributedDataParallel: a converted model (every drop-in this installation has, SyncBatchNorm included) and a
# fused optimizer; each rank gets half of the batch.
DDP_BATCH = 4


class TwoBranchNet(torch.nn.Module):
    """An image branch (conv, batch norm, ReLU, pool) and a token branch (LSTM, Transformer layer)."""

    def __init__(self):
        super().__init__()
        self.image = torch.nn.Sequential(
            torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 2, 3))
        self.embed = torch.nn.Embedding(10, 8)
        self.lstm = torch.nn.LSTM(8, 8, batch_first=True, bidirectional=True)
        self.layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.cell = torch.nn.LSTMCell(16, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, images, tokens):
        seq, _ = self.lstm(self.embed(tokens))
        h, _ = self.cell(self.layer(seq)[:, -1])
        return self.image(images), self.head(h)


def _ddp_data():
    images = make_input((DDP_BATCH, 2, 4, 4), seed=30)
    tokens = torch.randint(0, 10, (DDP_BATCH, 5), generator=torch.Generator().manual_seed(31))
    labels = torch.randint(0, 3, (DDP_BATCH,), generator=torch.Generator().manual_seed(32))
    return images, tokens, labels


def _ddp_model(convert: bool) -> torch.nn.Module:
    torch.manual_seed(5)
    model = TwoBranchNet()
    if convert:
        model = dlkernels.nn.SyncBatchNorm.convert_sync_batchnorm(dlkernels.convert(model))
    return model


def _ddp_loss(model, images, tokens, labels):
    a, b = model(images, tokens)
    return torch.nn.functional.cross_entropy(a, labels) + torch.nn.functional.cross_entropy(b, labels)


def _scenario_ddp(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = _ddp_model(convert=True)
    assert isinstance(model.image[1], dlkernels.nn.SyncBatchNorm)
    assert isinstance(model.cell, dlkernels.nn.LSTMCell) and isinstance(model.lstm, dlkernels.nn.LSTM)
    ddp = DistributedDataParallel(model)
    # Every fused optimizer, each on a part of the model.
    opts = [dlkernels.optim.SGD(model.image.parameters(), lr=0.01, momentum=0.9),
            dlkernels.optim.AdamW([*model.embed.parameters(), *model.lstm.parameters()], lr=0.01),
            dlkernels.optim.Adam(model.layer.parameters(), lr=0.01),
            dlkernels.optim.SWATS([*model.cell.parameters(), *model.head.parameters()], lr=0.01)]
    half = DDP_BATCH // WORLD
    out = {}
    for step in range(2):
        images, tokens, labels = (t[rank * half:(rank + 1) * half] for t in _ddp_data())
        for opt in opts:
            opt.zero_grad()
        _ddp_loss(ddp, images, tokens, labels).backward()
        if step == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        for opt in opts:
            opt.step()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


# FSDP2: fully_shard parameters (DTensors) stepped on their local shards by the fused optimizers. Sizes that split
# unevenly over 2 ranks, and a 1-element bias whose shard on rank 1 is empty.
def _fsdp_model() -> torch.nn.Module:
    torch.manual_seed(6)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))


def _fsdp_data():
    return make_input((8, 6), seed=40), make_input((8, 1), seed=41)


FSDP_OPTIMIZERS = {"Adam": dict(lr=0.05, weight_decay=0.1), "SGD": dict(lr=0.05, momentum=0.9)}


def _scenario_fsdp(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    out = {}
    for name, kwargs in FSDP_OPTIMIZERS.items():
        model = _fsdp_model()
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        opt = getattr(dlkernels.optim, name)(model.parameters(), **kwargs)
        x, y = (t[rank * 4:(rank + 1) * 4] for t in _fsdp_data())
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        out[name] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        out[f"{name}_state_is_dtensor"] = all(
            type(s["exp_avg" if name == "Adam" else "momentum_buffer"]).__name__ == "DTensor"
            for s in opt.state.values())
    model = _fsdp_model()
    fully_shard(model)
    swats = dlkernels.optim.SWATS(model.parameters())
    model(_fsdp_data()[0]).sum().backward()
    try:
        swats.step()
        out["swats_error"] = None
    except NotImplementedError as exc:
        out["swats_error"] = str(exc)
    return out


SCENARIOS = {
    "sync_bn_unequal": lambda rank: _scenario_sync_bn(rank, "unequal", relu=False),
    "sync_bn_unequal_relu": lambda rank: _scenario_sync_bn(rank, "unequal", relu=True),
    "sync_bn_empty_rank": lambda rank: _scenario_sync_bn(rank, "empty", relu=False),
    "sync_bn_unequal_relu_bf16": lambda rank: _scenario_sync_bn(rank, "unequal", relu=True, dtype=torch.bfloat16),
    "ddp": _scenario_ddp,
    "fsdp2": _scenario_fsdp,
}


def _worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    try:
        for name, scenario in SCENARIOS.items():
            try:
                result = scenario(rank)
            except Exception:  # recorded, and the other scenarios still run
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs every scenario on 2 gloo ranks once; {scenario: [rank 0 result, rank 1 result]}."""
    out_dir = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        _worker, args=(str(out_dir / "store"), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S)
    try:
        while not context.join(timeout=5):
            if datetime.datetime.now() > deadline:
                raise TimeoutError(f"the {WORLD} ranks did not finish within {TIMEOUT_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    loaded = {}
    for name in SCENARIOS:
        loaded[name] = [torch.load(out_dir / f"{name}.rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return loaded


def _ranks(results, name):
    ranks = results[name]
    for rank, r in enumerate(ranks):
        assert "error" not in r, f"rank {rank} failed:\n{r['error']}"
    return ranks


@pytest.mark.parametrize("name", ["sync_bn_unequal", "sync_bn_unequal_relu", "sync_bn_empty_rank",
                                  "sync_bn_unequal_relu_bf16"])
def test_sync_batch_norm_equals_batch_norm_of_the_whole_batch(results, name):
    ranks = _ranks(results, name)
    relu = "relu" in name
    sizes = BN_SPLITS["empty" if "empty" in name else "unequal"]
    n = sum(sizes)
    models = {}
    for key, dtype in (("eager", torch.bfloat16 if name.endswith("bf16") else torch.float32), ("ref", torch.float64)):
        models[key] = torch.nn.BatchNorm2d(BN_SHAPE[1]).to(dtype)
        _bn_params(models[key])
    for step in range(2):
        x, g = _bn_data(step)
        outs = {}
        for key, m in models.items():
            xin = x[:n].to(next(m.parameters()).dtype).requires_grad_()
            y = m(xin)
            y = torch.relu(y) if relu else y
            y.backward(g[:n].to(y.dtype))
            outs[key] = (y, xin.grad)
        terms = n * BN_SHAPE[2] * BN_SHAPE[3]
        ours_y = torch.cat([r[f"y{step}"] for r in ranks])
        ours_dx = torch.cat([r[f"dx{step}"] for r in ranks])
        assert_close(ours_y, outs["ref"][0], outs["eager"][0], terms=terms, name=f"step {step} output")
        assert_close(ours_dx, outs["ref"][1], outs["eager"][1], terms=terms, name=f"step {step} grad_input")
    for what, param in (("dw", "weight"), ("db", "bias")):  # local grads: DDP's sum over ranks is the full grad
        total = sum(r[what] for r in ranks)
        ref, eager = getattr(models["ref"], param).grad, getattr(models["eager"], param).grad
        assert_close(total, ref, eager, terms=terms, name=f"grad_{param}")
    for rank_result in ranks:  # identical on every rank
        for buf in ("running_mean", "running_var"):
            assert_close(rank_result[buf], getattr(models["ref"], buf), getattr(models["eager"], buf), terms=terms,
                         name=buf)
        assert int(rank_result["num_batches_tracked"]) == 2
    if "empty" in name:
        assert ranks[1]["y0"].shape == (0, *BN_SHAPE[1:]) and ranks[1]["dx0"].shape == (0, *BN_SHAPE[1:])


def test_converted_model_under_ddp_gets_the_gradients_of_the_whole_batch(results):
    ranks = _ranks(results, "ddp")
    images, tokens, labels = _ddp_data()
    single = _ddp_model(convert=True)
    eager, ref = _ddp_model(convert=False), _ddp_model(convert=False).double()
    grads = {}
    for key, model, imgs in (("eager", eager, images), ("ref", ref, images.double())):
        _ddp_loss(model, imgs, tokens, labels).backward()
        grads[key] = {n: p.grad for n, p in model.named_parameters()}
    terms = sum(p.numel() for p in single.parameters())
    for n in grads["ref"]:
        for rank, r in enumerate(ranks):
            assert_close(r["grads"][n], grads["ref"][n], grads["eager"][n], terms=terms, name=f"rank {rank} grad {n}")
    for n, p in ranks[0]["params"].items():  # DDP keeps the ranks' parameters identical
        assert torch.equal(p, ranks[1]["params"][n]), n


def test_fused_optimizers_step_fsdp2_shards_as_the_unsharded_run(results):
    ranks = _ranks(results, "fsdp2")
    x, y = _fsdp_data()
    for name, kwargs in FSDP_OPTIMIZERS.items():
        trained = {}
        for key, dtype in (("eager", torch.float32), ("ref", torch.float64)):
            model = _fsdp_model().to(dtype)
            opt = getattr(torch.optim, name)(model.parameters(), **kwargs)
            for _ in range(3):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
                opt.step()
            trained[key] = dict(model.named_parameters())
        for rank, r in enumerate(ranks):
            assert r[f"{name}_state_is_dtensor"], "optimizer state should stay sharded (DTensor) as torch's"
            for n, p in r[name].items():
                assert_close(p, trained["ref"][n], trained["eager"][n], terms=64, name=f"{name} rank {rank} {n}")
    assert "SWATS cannot step DTensor (FSDP2 fully_shard) parameters" in ranks[0]["swats_error"]
