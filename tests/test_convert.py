"""dlkernels.convert and dlkernels.optim.from_torch on whole models.

Every converted model is run through Triton's interpreter (the kernels on CPU tensors) and held to
dlkernels.testing's rule against the same stock model in float64, with the stock model in the same dtype as the bar:
outputs and every parameter gradient. Also: the same state_dict keys, the very same Parameter and buffer objects,
a report entry for every module, and an optimizer made before convert that keeps training the model.
"""
from __future__ import annotations

import copy
import importlib.util
import logging

import pytest
import torch
from torch import nn

import dlkernels
from dlkernels import models
from dlkernels.testing import assert_close, make_input

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def small_cnn() -> nn.Module:
    """Both fusions: Conv2d -> ReLU -> MaxPool2d and BatchNorm -> ReLU (after a conv whose pool cannot fuse)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 5),
    )


class Tagger(nn.Module):
    """Embedding -> LSTM -> TransformerEncoder -> BatchNorm1d -> Linear: every sequence drop-in at once."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True, bidirectional=True)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False)
        self.cell = nn.LSTMCell(16, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        x, _ = self.lstm(self.embed(tokens))
        x = self.encoder(x)
        h, _ = self.cell(x[:, -1])
        return self.head(self.norm(h))


def _batch(model_name: str, dtype, device="cpu"):
    if model_name == "speech_encoder":
        return make_input((2, 21, 12), dtype, device, seed=1)
    if model_name in ("tagger", "bilstm_tagger", "lstm_lm"):
        return torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0)).to(device)
    shape = {"small_cnn": (4, 3, 8, 8), "lenet5": (3, 1, 32, 32), "vgg11_bn": (2, 3, 32, 32),
             "resnet18": (2, 3, 32, 32), "vgg11": (2, 3, 32, 32)}[model_name]
    return make_input(shape, dtype, device, seed=1)


BUILDERS = {
    "small_cnn": small_cnn,
    "tagger": Tagger,
    "lenet5": lambda: models.lenet5(stock=True),
    "vgg11": lambda: models.vgg11(stock=True, base_width=4, classifier_width=16, num_classes=5),
    "vgg11_bn": lambda: models.vgg11(batch_norm=True, stock=True, base_width=4, classifier_width=16, num_classes=5),
    "resnet18": lambda: models.resnet18(stock=True, base_width=4, num_classes=5),
    "bilstm_tagger": lambda: models.bilstm_tagger(11, 4, embedding_dim=8, hidden_size=8, stock=True),
    "lstm_lm": lambda: models.lstm_lm(11, embedding_dim=8, hidden_size=8, stock=True),
    "speech_encoder": lambda: models.speech_encoder(12, 16, 2, 1, 32, window=(2, 1), dropout=0.0, num_classes=3,
                                                    stock=True),
}


def _run(model, x, dtype):
    """Output and parameter gradients of one training-mode forward/backward on a fixed upstream gradient."""
    model.zero_grad()
    y = model(x if not x.is_floating_point() else x.to(dtype))
    y = y[0] if isinstance(y, tuple) else y  # lstm_lm: (scores, state)
    g = make_input(y.shape, y.dtype, y.device, seed=7)
    y.backward(g)
    return y, {n: p.grad for n, p in model.named_parameters()}


def check_convert(name: str, dtype: torch.dtype, device="cpu"):
    torch.manual_seed(0)
    model = BUILDERS[name]().to(device, dtype)
    if name in ("vgg11", "vgg11_bn"):  # the classifier's dropout makes runs incomparable
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    keys = list(model.state_dict())
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    converted = dlkernels.convert(model)
    assert converted is model
    assert list(converted.state_dict()) == keys
    for n, t in [*converted.named_parameters(), *converted.named_buffers()]:
        assert t is tensors[n], f"{n} was copied, not shared"
    report = dlkernels.convert.report(converted)
    names = {e.name for e in report}
    assert set(n for n, _ in converted.named_modules()) <= names, "the report misses modules"
    assert report.replaced, "nothing was replaced"
    x = _batch(name, dtype, device)
    y, grads = _run(converted, x, dtype)
    y_eager, grads_eager = _run(eager, x, dtype)
    y_ref, grads_ref = _run(ref, x.double() if x.is_floating_point() else x, torch.float64)
    # Every output and gradient of a whole model sums products along the chain of its layers: count one term per
    # parameter (dlkernels.testing's accumulation floor, sqrt(terms) fp32 ulps, for fp32-accumulating kernels
    # against CPU eager PyTorch, which accumulates float32 reductions in double).
    terms = sum(p.numel() for p in converted.parameters())
    assert_close(y, y_ref, y_eager, terms=terms, name=f"{name} output")
    for n in grads:
        assert_close(grads[n], grads_ref[n], grads_eager[n], terms=terms, name=f"{name} grad of {n}")
    for n, b in converted.named_buffers():  # running statistics
        if b.is_floating_point():
            assert_close(b, dict(ref.named_buffers())[n], dict(eager.named_buffers())[n], terms=terms, name=n)
    return converted


@pytest.fixture(autouse=True)
def _fp32_without_tf32():
    """fp32 convolutions take the exact path (the fp32 conv kernel would use TF32, whose error is not fp32's).
    Through cudnn.flags, keeping the other flags: direct assignment is refused once torch's test utilities load."""
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        yield


@pytest.mark.parametrize("name", ["small_cnn", "tagger"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_convert_matches_the_stock_model(name, dtype):
    check_convert(name, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["lenet5", "vgg11_bn", "resnet18", "bilstm_tagger", "speech_encoder", "tagger"])
def test_convert_matches_the_stock_model_gpu(name, device):
    """On the GPU, bf16: the real kernels (conv, batch norm, attention, LSTM) in whole models."""
    check_convert(name, torch.bfloat16, device)


@pytest.mark.parametrize("name,dtype", [("lenet5", torch.float16), ("vgg11_bn", torch.float16),
                                        ("resnet18", torch.float32), ("bilstm_tagger", torch.float32),
                                        ("lstm_lm", torch.float16), ("speech_encoder", torch.float16)])
def test_convert_matches_the_stock_model_zoo(name, dtype):
    """The stock twins of dlkernels.models (VGG-16 and ResNet-34 are the same classes as VGG-11 and ResNet-18).
    fp16 runs the conv and attention kernels. ResNet in fp32 (batch norm kernels, reference convs): at test sizes its last
    batch norms see 2 values per channel, where fp16 gradients are mostly rounding noise, eager's too."""
    check_convert(name, dtype)


def test_report_names_what_was_fused_replaced_and_left_alone(caplog):
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(),
        nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), nn.MaxPool2d(2, ceil_mode=True),
        nn.MultiheadAttention(8, 2, add_bias_kv=True),
        nn.Linear(3, 3),
    )
    with caplog.at_level(logging.INFO, logger="dlkernels.convert"):
        dlkernels.convert(model)
    report = {e.name: e for e in dlkernels.convert.report(model)}
    assert report["0"].action == "left alone" and "groups=2" in report["0"].detail
    assert report["1"].action == "left alone"
    assert report["2"].action == "fused" and report["3"].action == "fused"
    assert isinstance(model[2], dlkernels.nn.BatchNorm2d) and model[2].activation == "relu"
    assert isinstance(model[3], nn.Identity)
    assert report["4"].action == "replaced" and isinstance(model[4], dlkernels.nn.Conv2d)
    assert report["5"].action == "left alone" and "ceil_mode" in report["5"].detail
    assert report["6"].action == "left alone" and "add_bias_kv" in report["6"].detail
    assert report["7"].action == "left alone" and report["7"].detail
    assert "left alone" in caplog.text
    left = {e.name for e in dlkernels.convert.report(model).left_alone}
    assert {"0", "1", "5", "6", "7"} <= left


def test_include_exclude_and_copy():
    base = small_cnn()
    copied = dlkernels.convert(base, inplace=False, exclude=["BatchNorm2d"])
    assert type(base[0]) is nn.Conv2d, "inplace=False changed the original"
    assert type(copied[4]) is nn.BatchNorm2d and isinstance(copied[0], dlkernels.nn.Conv2d)
    only_bn = dlkernels.convert(small_cnn(), include=[nn.BatchNorm2d])
    assert type(only_bn[0]) is nn.Conv2d and isinstance(only_bn[4], dlkernels.nn.BatchNorm2d)
    by_name = dlkernels.convert(small_cnn(), exclude="3")
    assert type(by_name[3]) is nn.Conv2d and type(by_name[4]) is dlkernels.nn.BatchNorm2d
    with pytest.raises(TypeError, match="include/exclude"):
        dlkernels.convert(small_cnn(), include=[3])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dlkernels.convert("model")
    with pytest.raises(ValueError, match="not converted"):
        dlkernels.convert.report(nn.Linear(2, 2))


def test_a_module_itself_is_converted():
    bn = nn.BatchNorm1d(3)
    new = dlkernels.convert(bn)
    assert type(new) is dlkernels.nn.BatchNorm1d and new.weight is bn.weight and new.running_mean is bn.running_mean


def test_an_optimizer_made_before_convert_keeps_training():
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dlkernels.convert(model)
    x = make_input((8, 3, 8, 8), seed=3)
    target = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("torch_cls,kwargs", [
    (torch.optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    (torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.99))),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
])
def test_from_torch_keeps_groups_and_state(torch_cls, kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    twin = copy.deepcopy(model)
    groups = lambda m: [{"params": m[0].parameters()}, {"params": m[1].parameters(), "lr": 0.003}]  # noqa: E731
    opt, twin_opt = torch_cls(groups(model), **kwargs), torch_cls(groups(twin), **kwargs)
    xs = [make_input((5, 4), seed=s) for s in range(4)]

    def step(m, o, x):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()

    step(model, opt, xs[0])
    step(twin, twin_opt, xs[0])
    fused = dlkernels.optim.from_torch(opt)
    assert isinstance(fused, dlkernels.optim._fused.FusedOptimizer)
    assert fused.defaults == opt.defaults
    assert [g.keys() for g in fused.param_groups] == [g.keys() for g in opt.param_groups]
    for g, h in zip(fused.param_groups, opt.param_groups):
        assert all(p is q for p, q in zip(g["params"], h["params"]))
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}
    for x in xs[1:]:
        step(model, fused, x)
        step(twin, twin_opt, x)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert dlkernels.optim.from_torch(fused) is fused
    with pytest.raises(TypeError, match="RMSprop"):
        dlkernels.optim.from_torch(torch.optim.RMSprop(model.parameters()))


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed (optional test dependency)")
@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "alexnet"])
def test_convert_torchvision(name):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=5).half()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    keys = list(model.state_dict())
    dlkernels.convert(model)
    assert list(model.state_dict()) == keys
    x = make_input((1, 3, 64, 64), torch.float16, seed=1)
    y, grads = _run(model, x, torch.float16)
    y_eager, grads_eager = _run(eager, x, torch.float16)
    y_ref, grads_ref = _run(ref, x.double(), torch.float64)
    terms = sum(p.numel() for p in model.parameters())
    assert_close(y, y_ref, y_eager, terms=terms, name=f"{name} output")
    for n in grads:
        assert_close(grads[n], grads_ref[n], grads_eager[n], terms=terms, name=f"{name} grad of {n}")
