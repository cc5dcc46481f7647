"""MSDNet (Huang et al., ICLR 2018, "Multi-Scale Dense Networks for Resource Efficient Image Classification").

A native multi-exit architecture: features are kept at S scales at once (each coarser one at
half the resolution and more channels), every layer densely concatenates new features to each
scale's input (the new features of scale s come from that scale and, strided, from the finer
scale s - 1), and a classifier after every block reads the coarsest scale. Late layers drop the
finest scales they no longer need ("prune"), and transition layers (1x1 convs) halve the
channels at chosen depths.

In exitflow's terms: the stem is MSDNet's first layer (one feature map per scale), each block is
a group of MSDNet layers, the ICs are the classifiers after blocks 1..B-1 and the backbone's head
is the last one. The hidden state passed from block to block is the list of scales, finest
first; an IC reads the coarsest (`ic_input`). The ICs default to MSDNet's own classifier (two
strided 3x3 conv-BN-ReLU, global average pooling, a linear layer); `net.head` picks another kind.

Two configurations, as in the authors' code: `msdnet_cifar` (7 blocks, a 4-layer first block then
2 layers each, 16 base channels, growth 6, 3 scales with channel factors 1-2-4, scales pruned at
the end, transitions at a third and two thirds of the depth) and `msdnet_imagenet` (5 blocks of 4
layers, 32 base channels, growth 16, 4 scales with factors 1-2-4-4, a 7x7/2 conv and max pool
first, scales pruned evenly along the depth with a transition at each drop). `net.width` sets the
base channels and `net.depth` the number of blocks (exits).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from exitflow.stages.core.nets.multi_exit import ExitBackbone, MultiExitNet
from exitflow.stages.core.nets.registry import register_net
from exitflow.stages.core.nets.spec import NetSpec

Scales = list[Tensor]  # one feature map per scale still kept, finest first


@dataclass(frozen=True)
class MSDNetConfig:
    blocks: int  # classifiers: one after every block
    first_block_layers: int  # MSDNet's `base`
    block_layers: int  # layers in every later block (`step`, "even" step mode)
    channels: int  # base channels (`nChannels`); scale s holds channels x scale_factors[s]
    growth: int  # new channels per layer, times the scale's factor
    scale_factors: tuple[int, ...]  # per scale, finest first (`grFactor`)
    bottleneck_factors: tuple[int, ...]  # per scale: the 1x1 bottleneck is at most this x its conv's output (`bnFactor`)
    prune: str  # "min": drop scales only at the very end; "max": evenly along the depth
    reduction: float  # a transition layer keeps this share of the channels
    imagenet_stem: bool  # a 7x7/2 conv and a 3x3/2 max pool before the first scale, else one 3x3 conv
    classifier_width: int | None  # the classifiers' conv width (CIFAR: 128); None: the input's channels (ImageNet)

    @property
    def scales(self) -> int:
        return len(self.scale_factors)

    @property
    def layers(self) -> int:
        return self.first_block_layers + self.block_layers * (self.blocks - 1)


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class NewFeatures(nn.Module):
    """A 3x3 conv-BN-ReLU (stride 1, or 2 from the finer scale) behind an optional 1x1 bottleneck of
    at most `bottleneck` x its output channels."""

    def __init__(self, cin: int, cout: int, stride: int, bottleneck: int | None) -> None:
        super().__init__()
        inner = cin if bottleneck is None else min(cin, bottleneck * cout)
        self.reduce = conv_bn_relu(cin, inner, 1, 1) if bottleneck is not None else nn.Identity()
        self.conv = conv_bn_relu(inner, cout, 3, stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.reduce(x))


class ScaleUpdate(nn.Module):
    """One scale of one layer: its input with new features appended (dense connectivity): from the
    scale itself (3x3) and, when the finer scale is kept as input, from it (3x3, stride 2), half each."""

    def __init__(self, cin_finer: int | None, cin: int, cout: int, bottleneck_finer: int, bottleneck: int) -> None:
        super().__init__()
        self.from_finer = None if cin_finer is None else NewFeatures(cin_finer, cout // 2, 2, bottleneck_finer)
        self.from_self = NewFeatures(cin, cout if cin_finer is None else cout // 2, 1, bottleneck)

    def forward(self, finer: Tensor | None, x: Tensor) -> Tensor:
        parts = [x] if self.from_finer is None else [x, self.from_finer(finer)]
        return torch.cat([*parts, self.from_self(x)], dim=1)


class MSDLayer(nn.Module):
    """One MSDNet layer: `in_scales` coarsest scales in, `out_scales` coarsest scales out (dropping the
    finest when fewer), each with `growth` x its factor new channels."""

    def __init__(self, cfg: MSDNetConfig, channels: int, in_scales: int, out_scales: int) -> None:
        super().__init__()
        self.in_scales, self.out_scales = in_scales, out_scales
        offset = cfg.scales - out_scales  # the finest scale kept in the output
        f, b = cfg.scale_factors, cfg.bottleneck_factors
        updates = []
        for s in range(offset, cfg.scales):
            finer = s - 1 if (s > offset or in_scales > out_scales) else None
            updates.append(ScaleUpdate(None if finer is None else channels * f[finer], channels * f[s], cfg.growth * f[s],
                                       b[finer] if finer is not None else 0, b[s]))
        self.updates = nn.ModuleList(updates)

    def forward(self, x: Scales) -> Scales:
        dropped = self.in_scales - self.out_scales  # 0 or 1: the finest input is read only by the next scale
        out = []
        for j, update in enumerate(self.updates):
            s = j + dropped  # this output scale's index in the input list
            out.append(update(x[s - 1] if update.from_finer is not None else None, x[s]))
        return out


class Transition(nn.Module):
    """1x1 conv-BN-ReLU per scale: the channels go from `channels` to `out` (times each scale's factor)."""

    def __init__(self, cfg: MSDNetConfig, channels: int, out: int, scales: int) -> None:
        super().__init__()
        f = cfg.scale_factors[cfg.scales - scales:]
        self.convs = nn.ModuleList(conv_bn_relu(channels * k, out * k, 1, 1) for k in f)

    def forward(self, x: Scales) -> Scales:
        return [conv(h) for conv, h in zip(self.convs, x)]


class FirstLayer(nn.Module):
    """Input image -> one feature map per scale, each strided from the finer one."""

    def __init__(self, cfg: MSDNetConfig, in_chans: int, channels: int) -> None:
        super().__init__()
        first = channels * cfg.scale_factors[0]
        stem: list[nn.Module] = ([nn.Conv2d(in_chans, first, 7, 2, 3, bias=False), nn.BatchNorm2d(first), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1)] if cfg.imagenet_stem else [*conv_bn_relu(in_chans, first, 3, 1)])
        layers = [nn.Sequential(*stem)]
        for s in range(1, cfg.scales):
            layers.append(conv_bn_relu(channels * cfg.scale_factors[s - 1], channels * cfg.scale_factors[s], 3, 2))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Scales:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class MSDNetClassifier(nn.Module):
    """MSDNet's classifier on the coarsest scale: two 3x3/2 conv-BN-ReLU, global average pooling
    (the authors' 2x2 average pool, which is global at their sizes), a linear layer."""

    def __init__(self, channels: int, num_classes: int, width: int | None) -> None:
        super().__init__()
        inner = channels if width is None else width
        self.convs = nn.Sequential(conv_bn_relu(channels, inner, 3, 2), conv_bn_relu(inner, inner, 3, 2), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(inner, num_classes)
        _init(self)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.convs(h), 1))


def _init(module: nn.Module) -> None:
    """The authors' init: convs N(0, 2 / (k * k * out)), BatchNorm 1 and 0, linear biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def scales_at(cfg: MSDNetConfig, layer: int) -> tuple[int, int]:
    """(input scales, output scales) of layer `layer` (1-based over the whole net)."""
    if cfg.prune == "min":
        return min(cfg.scales, cfg.layers - layer + 2), min(cfg.scales, cfg.layers - layer + 1)
    interval = math.ceil(cfg.layers / cfg.scales)
    return cfg.scales - (max(0, layer - 2) // interval), cfg.scales - ((layer - 1) // interval)


class MSDNet(ExitBackbone):
    """The first layer, B blocks of MSDNet layers (and transitions), the last classifier as the head."""

    classifier = "head.fc"

    def __init__(self, cfg: MSDNetConfig, in_chans: int, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = FirstLayer(cfg, in_chans, cfg.channels)
        blocks, channels, layer = [], cfg.channels, 0
        for b in range(cfg.blocks):
            parts: list[nn.Module] = []
            for _ in range(cfg.first_block_layers if b == 0 else cfg.block_layers):
                layer += 1
                ins, outs = scales_at(cfg, layer)
                parts.append(MSDLayer(cfg, channels, ins, outs))
                channels += cfg.growth
                if self._transition_after(layer, ins, outs):
                    out = math.floor(cfg.reduction * channels)
                    parts.append(Transition(cfg, channels, out, outs))
                    channels = out
            blocks.append(nn.Sequential(*parts))
        self.blocks = nn.ModuleList(blocks)
        self.head = MSDNetClassifier(channels * cfg.scale_factors[-1], num_classes, cfg.classifier_width)
        _init(self)

    def _transition_after(self, layer: int, ins: int, outs: int) -> bool:
        if self.cfg.reduction <= 0:
            return False
        if self.cfg.prune == "max":
            return ins > outs
        return layer in (math.floor(self.cfg.layers / 3), math.floor(2 * self.cfg.layers / 3))

    def forward_stem(self, x: Tensor) -> Scales:  # type: ignore[override]
        return self.stem(x)

    def forward_head(self, h: Scales) -> Tensor:  # type: ignore[override]
        return self.head(h[-1])

    def ic_input(self, h: Scales) -> Tensor:  # type: ignore[override]
        return h[-1]

    def ic_head(self, feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return MSDNetClassifier(feature_shape[0], num_classes, self.cfg.classifier_width)


CIFAR = MSDNetConfig(blocks=7, first_block_layers=4, block_layers=2, channels=16, growth=6, scale_factors=(1, 2, 4),
                     bottleneck_factors=(1, 2, 4), prune="min", reduction=0.5, imagenet_stem=False, classifier_width=128)
IMAGENET = MSDNetConfig(blocks=5, first_block_layers=4, block_layers=4, channels=32, growth=16, scale_factors=(1, 2, 4, 4),
                        bottleneck_factors=(1, 2, 4, 4), prune="max", reduction=0.5, imagenet_stem=True, classifier_width=None)


def _create(spec: NetSpec, cfg: MSDNetConfig) -> MultiExitNet:
    overrides = {"channels": spec.width, "blocks": spec.depth}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.blocks < 2:
        raise ValueError(f"net spec field `depth`: {spec.backbone} needs at least 2 blocks (one IC), got {cfg.blocks}")
    backbone = MSDNet(cfg, spec.in_chans, spec.num_classes)
    return MultiExitNet(spec, backbone, tuple(range(1, cfg.blocks)))


@register_net
def msdnet_cifar(spec: NetSpec) -> MultiExitNet:
    """MSDNet for 32 px images: 7 blocks, an IC after each of the first 6 (the authors' CIFAR configuration)."""
    return _create(spec, CIFAR)


@register_net
def msdnet_imagenet(spec: NetSpec) -> MultiExitNet:
    """MSDNet for 224 px images: 5 blocks of 4 layers, an IC after each of the first 4 (the authors' step-4 ImageNet model)."""
    return _create(spec, IMAGENET)
