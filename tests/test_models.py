"""dlkernels.models: torchvision's parameter names and shapes, the stock twins, and a few training steps that
reduce the loss, for every model (tiny widths: the Triton kernels run through the interpreter here)."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import dlkernels
from dlkernels import models
from dlkernels.testing import make_input

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

# Parameter counts torchvision documents for its ImageNet models (1000 classes).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "vgg11": 132_863_336,
                      "vgg11_bn": 132_868_840, "vgg16": 138_357_544, "vgg16_bn": 138_365_992}
VGG_CFG = {"vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
           "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]}


def _bn(prefix):
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def torchvision_resnet_keys(blocks):
    """state_dict keys of torchvision.models.resnet.ResNet(BasicBlock, blocks), written from its definition."""
    keys = ["conv1.weight", *_bn("bn1")]
    for layer, count in enumerate(blocks, 1):
        for b in range(count):
            p = f"layer{layer}.{b}"
            keys += [f"{p}.conv1.weight", *_bn(f"{p}.bn1"), f"{p}.conv2.weight", *_bn(f"{p}.bn2")]
            if b == 0 and layer > 1:
                keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1")]
    return keys + ["fc.weight", "fc.bias"]


def torchvision_vgg_keys(cfg, batch_norm):
    """state_dict keys of torchvision.models.vgg.VGG(make_layers(cfg, batch_norm)), from its definition:
    each conv is (Conv2d, [BatchNorm2d], ReLU), each "M" a MaxPool2d, in one nn.Sequential."""
    keys, index = [], 0
    for item in cfg:
        if item == "M":
            index += 1
            continue
        keys += [f"features.{index}.weight", f"features.{index}.bias"]
        if batch_norm:
            keys += _bn(f"features.{index + 1}")
        index += 3 if batch_norm else 2
    return keys + [f"classifier.{i}.{k}" for i in (0, 3, 6) for k in ("weight", "bias")]


IMAGE_MODELS = {
    "resnet18": (lambda **kw: models.resnet18(**kw), torchvision_resnet_keys([2, 2, 2, 2])),
    "resnet34": (lambda **kw: models.resnet34(**kw), torchvision_resnet_keys([3, 4, 6, 3])),
    "vgg11": (lambda **kw: models.vgg11(**kw), torchvision_vgg_keys(VGG_CFG["vgg11"], False)),
    "vgg11_bn": (lambda **kw: models.vgg11(batch_norm=True, **kw), torchvision_vgg_keys(VGG_CFG["vgg11"], True)),
    "vgg16": (lambda **kw: models.vgg16(**kw), torchvision_vgg_keys(VGG_CFG["vgg16"], False)),
    "vgg16_bn": (lambda **kw: models.vgg16(batch_norm=True, **kw), torchvision_vgg_keys(VGG_CFG["vgg16"], True)),
}


@pytest.mark.parametrize("name", list(IMAGE_MODELS))
@pytest.mark.parametrize("stock", [False, True])
def test_image_models_have_torchvisions_names_and_sizes(name, stock):
    build, keys = IMAGE_MODELS[name]
    with torch.device("meta"):
        model = build(stock=stock)
    assert list(model.state_dict()) == keys
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "vgg11"])
def test_fused_and_stock_twins_start_equal(name):
    build, _ = IMAGE_MODELS[name]
    small = dict(base_width=4, num_classes=3) | ({} if name.startswith("resnet") else dict(classifier_width=8))
    torch.manual_seed(0)
    fused = build(**small)
    torch.manual_seed(0)
    stock = build(stock=True, **small)
    assert fused.state_dict().keys() == stock.state_dict().keys()
    for (k, a), b in zip(fused.state_dict().items(), stock.state_dict().values()):
        assert torch.equal(a, b), k
    assert any(isinstance(m, dlkernels.nn.Conv2d) for m in fused.modules())
    assert not any(type(m).__module__.startswith("dlkernels.nn") for m in stock.modules())


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed (optional test dependency)")
@pytest.mark.parametrize("name", ["resnet18", "vgg11", "vgg11_bn"])
def test_torchvision_state_dicts_load_both_ways(name):
    import torchvision

    build, _ = IMAGE_MODELS[name]
    theirs = getattr(torchvision.models, name)(num_classes=7)
    ours = build(num_classes=7)
    ours.load_state_dict(theirs.state_dict())
    again = getattr(torchvision.models, name)(num_classes=7)
    again.load_state_dict(ours.state_dict())
    for (k, a), b in zip(theirs.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    x = make_input((1, 3, 32, 32), seed=0)
    ours.eval()
    theirs.eval()
    with dlkernels.backend("reference"):
        torch.testing.assert_close(ours(x), theirs(x))


def _train(model, batch, loss_fn, steps=5, lr=3e-3):
    opt = dlkernels.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _classify(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _tokens(shape, vocab, seed):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


TRAINING = {
    "lenet5": lambda: (models.lenet5(), (make_input((8, 1, 32, 32), seed=0), _tokens((8,), 10, 1)), _classify),
    "vgg11_bn": lambda: (models.vgg11(batch_norm=True, base_width=4, classifier_width=16, num_classes=4,
                                      dropout=0.0),
                         (make_input((4, 3, 32, 32), seed=0), _tokens((4,), 4, 1)), _classify),
    "vgg16": lambda: (models.vgg16(base_width=4, classifier_width=16, num_classes=4, dropout=0.0),
                      (make_input((4, 3, 32, 32), seed=0), _tokens((4,), 4, 1)), _classify),
    "resnet18": lambda: (models.resnet18(base_width=4, num_classes=4),
                         (make_input((4, 3, 32, 32), seed=0), _tokens((4,), 4, 1)), _classify),
    "bilstm_tagger": lambda: (
        models.bilstm_tagger(12, 5, embedding_dim=8, hidden_size=8),
        (_tokens((3, 7), 12, 0), _tokens((3, 7), 5, 1), torch.tensor([7, 4, 2])),
        lambda m, b: nn.functional.cross_entropy(m(b[0], lengths=b[2]).flatten(0, 1), b[1].flatten())),
    "lstm_lm": lambda: (
        models.lstm_lm(12, embedding_dim=8, hidden_size=8, tie_weights=True), _tokens((3, 8), 12, 0),
        lambda m, b: nn.functional.cross_entropy(m(b[:, :-1])[0].flatten(0, 1), b[:, 1:].flatten())),
    "speech_encoder": lambda: (
        models.speech_encoder(input_dim=12, d_model=16, nhead=2, num_layers=2, dim_feedforward=32, window=(2, 1),
                              dropout=0.0, num_classes=6),
        (make_input((2, 21, 12), seed=0), _tokens((2, 4), 6, 1), torch.tensor([21, 15])),
        lambda m, b: nn.functional.cross_entropy(m(b[0], lengths=b[2]).flatten(0, 1), b[1].flatten())),
}


LEARNING_RATES = {"lenet5": 3e-3, "vgg11_bn": 3e-3, "vgg16": 3e-3, "resnet18": 1e-2, "bilstm_tagger": 3e-2,
                  "lstm_lm": 3e-2, "speech_encoder": 1e-2}


@pytest.mark.parametrize("name", list(TRAINING))
def test_a_few_training_steps_reduce_the_loss(name):
    """On the reference path: the kernels' own numerics are tested per op and, in whole models, in test_convert.py
    (through the interpreter, which is too slow for training loops)."""
    torch.manual_seed(0)
    model, batch, loss_fn = TRAINING[name]()
    with dlkernels.backend("reference"):
        losses = _train(model, batch, loss_fn, steps=8, lr=LEARNING_RATES[name])
    assert losses[-1] < 0.85 * losses[0], losses


def test_speech_encoder_window_matches_the_stock_mask():
    kwargs = dict(input_dim=12, d_model=16, nhead=2, num_layers=2, dim_feedforward=32, window=(2, 1), dropout=0.0)
    torch.manual_seed(0)
    ours = models.speech_encoder(**kwargs)
    stock = models.speech_encoder(stock=True, **kwargs)
    stock.load_state_dict(ours.state_dict())
    x, lengths = make_input((2, 25, 12), seed=0), torch.tensor([25, 17])
    assert ours(x, lengths).shape == (2, 5, 16)
    with dlkernels.backend("reference"):
        torch.testing.assert_close(ours(x, lengths), stock(x, lengths))


def test_bad_arguments():
    with pytest.raises(ValueError, match="tie_weights"):
        models.lstm_lm(10, embedding_dim=4, hidden_size=8, tie_weights=True)
    with pytest.raises(ValueError, match="input_dim"):
        models.speech_encoder(input_dim=5)


def test_train_lenet5_on_digits_reaches_95_percent(tmp_path):
    """The demo (`python -m dlkernels train lenet5`) on the reference path, as it runs on a CPU without the
    interpreter; 6 of its 8 epochs."""
    from dlkernels.train import train

    results = train("lenet5", epochs=6, backend="reference", out_dir=tmp_path, progress=False)
    assert results["test_accuracy"] >= 0.95, results["history"]["epochs"]
    assert (tmp_path / "lenet5-loss.png").stat().st_size > 0
    assert (tmp_path / "lenet5-results.json").exists()



@pytest.mark.gpu
def test_train_lenet5_on_the_gpu_reports_step_times(tmp_path, device):
    from dlkernels.train import train

    results = train("lenet5", epochs=6, device=device, out_dir=tmp_path, progress=False)
    assert results["test_accuracy"] >= 0.95, results["history"]["epochs"]
    assert results["step_ms_dlkernels"] > 0 and results["step_ms_stock"] > 0
