"""LeNet-5, VGG-11/16 (with or without batch norm) and ResNet-18/34 on ``dlkernels.nn``.

VGG and ResNet have torchvision's module tree and parameter names (``features.0.weight``, ``layer1.0.bn1.weight``,
...), so ``state_dict``s move both ways between these and ``torchvision.models``. Where torchvision has
``Conv2d, ReLU, MaxPool2d`` in a row, the conv's slot holds one fused ``dlkernels.nn.Conv2d`` and the ReLU and pool
slots ``nn.Identity`` (no state, so the indices and keys stay torchvision's); ``BatchNorm2d, ReLU`` likewise
becomes one batch norm with ``activation="relu"``. ``base_width`` (64 in torchvision) scales every channel count
and ``classifier_width`` (4096) VGG's hidden layers, for small test and demo models; the defaults are torchvision's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import nn as dlnn

_VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _conv_relu_pool(stock: bool, cin: int, cout: int, kernel: int, *, stride=1, padding=0, relu=True,
                    pool: Optional[tuple] = None, bias=True) -> list[nn.Module]:
    """torchvision's slots [Conv2d, ReLU?, pool?]; fused: [dlkernels Conv2d(activation, pool), Identity...]."""
    if stock:
        mods: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, padding, bias=bias)]
        mods += [nn.ReLU(inplace=True)] if relu else []
        if pool is not None:
            mods.append((nn.MaxPool2d if pool[0] == "max" else nn.AvgPool2d)(pool[1], pool[2]))
        return mods
    conv = dlnn.Conv2d(cin, cout, kernel, stride, padding, bias=bias, activation="relu" if relu else None,
                       pool=pool)
    return [conv] + [nn.Identity() for _ in range(int(relu) + int(pool is not None))]


def _batch_norm(stock: bool, channels: int, relu: bool) -> list[nn.Module]:
    """[BatchNorm2d, ReLU?]; fused: [dlkernels BatchNorm2d(activation="relu"), Identity]."""
    if stock:
        return [nn.BatchNorm2d(channels)] + ([nn.ReLU(inplace=True)] if relu else [])
    if relu:
        return [dlnn.BatchNorm2d(channels, activation="relu"), nn.Identity()]
    return [dlnn.BatchNorm2d(channels)]


class LeNet5(nn.Module):
    """LeNet-5 for 32x32 single-channel images, with ReLU and max pooling (the modern variant).

    ``features``: conv 1->6 5x5, ReLU, max 2x2, conv 6->16 5x5, ReLU, max 2x2 (each a single fused conv);
    ``classifier``: 400 -> 120 -> 84 -> ``num_classes`` with ReLU between.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, *, stock: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_relu_pool(stock, in_channels, 6, 5, pool=("max", 2, 2)),
            *_conv_relu_pool(stock, 6, 16, 5, pool=("max", 2, 2)),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def lenet5(num_classes: int = 10, in_channels: int = 1, *, stock: bool = False) -> LeNet5:
    """LeNet-5 (see ``LeNet5``) for (N, in_channels, 32, 32) input."""
    return LeNet5(num_classes, in_channels, stock=stock)


class VGG(nn.Module):
    """torchvision's VGG: ``features`` (convs and pools), ``avgpool`` (adaptive 7x7), ``classifier``."""

    def __init__(self, config: list, batch_norm: bool, num_classes: int, dropout: float, base_width: int,
                 classifier_width: int, stock: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, item in enumerate(config):
            if item == "M":
                continue  # made with the conv before it
            cout = item * base_width // 64
            pool = ("max", 2, 2) if i + 1 < len(config) and config[i + 1] == "M" else None
            if batch_norm:  # the pool follows the batch norm: only BatchNorm + ReLU fuse
                layers += _conv_relu_pool(stock, cin, cout, 3, padding=1, relu=False)
                layers += _batch_norm(stock, cout, relu=True)
                layers += [nn.MaxPool2d(2, 2)] if pool else []
            else:
                layers += _conv_relu_pool(stock, cin, cout, 3, padding=1, pool=pool)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(cin * 7 * 7, classifier_width), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(classifier_width, classifier_width), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(classifier_width, num_classes),
        )
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg11(batch_norm: bool = False, num_classes: int = 1000, *, dropout: float = 0.5, base_width: int = 64,
          classifier_width: int = 4096, stock: bool = False) -> VGG:
    """VGG-11 (``batch_norm=True``: VGG-11-BN), torchvision's ``vgg11``/``vgg11_bn`` names and initialization."""
    return VGG(_VGG_CONFIGS["vgg11"], batch_norm, num_classes, dropout, base_width, classifier_width, stock)


def vgg16(batch_norm: bool = False, num_classes: int = 1000, *, dropout: float = 0.5, base_width: int = 64,
          classifier_width: int = 4096, stock: bool = False) -> VGG:
    """VGG-16 (``batch_norm=True``: VGG-16-BN), torchvision's ``vgg16``/``vgg16_bn`` names and initialization."""
    return VGG(_VGG_CONFIGS["vgg16"], batch_norm, num_classes, dropout, base_width, classifier_width, stock)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block; ``bn1`` carries the fused ReLU (``relu`` stays for the one after the sum)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 *, stock: bool = False) -> None:
        super().__init__()
        self.conv1 = (nn.Conv2d if stock else dlnn.Conv2d)(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes) if stock else dlnn.BatchNorm2d(planes, activation="relu")
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = (nn.Conv2d if stock else dlnn.Conv2d)(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes) if stock else dlnn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.fused_relu = not stock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        if not self.fused_relu:
            out = self.relu(out)
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with basic blocks (ResNet-18/34): same module tree, names and initialization."""

    def __init__(self, layers: list[int], num_classes: int, base_width: int, stock: bool) -> None:
        super().__init__()
        conv = nn.Conv2d if stock else dlnn.Conv2d
        self.stock = stock
        self.inplanes = base_width
        self.conv1 = conv(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes) if stock else dlnn.BatchNorm2d(self.inplanes, activation="relu")
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [base_width * 2**i for i in range(4)]
        self.layer1 = self._make_layer(widths[0], layers[0], 1)
        self.layer2 = self._make_layer(widths[1], layers[1], 2)
        self.layer3 = self._make_layer(widths[2], layers[2], 2)
        self.layer4 = self._make_layer(widths[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            conv = nn.Conv2d if self.stock else dlnn.Conv2d
            bn = nn.BatchNorm2d if self.stock else dlnn.BatchNorm2d
            downsample = nn.Sequential(conv(self.inplanes, planes, 1, stride, bias=False), bn(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, stock=self.stock)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, stock=self.stock) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        if self.stock:
            x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, *, base_width: int = 64, stock: bool = False) -> ResNet:
    """ResNet-18 with torchvision's ``resnet18`` names and initialization."""
    return ResNet([2, 2, 2, 2], num_classes, base_width, stock)


def resnet34(num_classes: int = 1000, *, base_width: int = 64, stock: bool = False) -> ResNet:
    """ResNet-34 with torchvision's ``resnet34`` names and initialization."""
    return ResNet([3, 4, 6, 3], num_classes, base_width, stock)
