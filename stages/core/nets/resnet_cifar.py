"""CIFAR ResNets (He et al. 2016, section 4.2): 3x3 stem, 3 stages of BasicBlocks, widths 16/32/64."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn

from exitflow.stages.core.nets.multi_exit import ExitBackbone, MultiExitNet, resnet_exits
from exitflow.stages.core.nets.registry import register_net
from exitflow.stages.core.nets.spec import NetSpec

NUM_STAGES = 3
MIN_IMG_SIZE = 4  # two stride-2 stages: smaller images leave nothing to downsample


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual; a 1x1 conv-BN shortcut where the shape changes."""

    def __init__(self, in_chans: int, out_chans: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chans != out_chans:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chans, out_chans, 1, stride, bias=False), nn.BatchNorm2d(out_chans)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@dataclass(frozen=True)
class CifarResNetConfig:
    """One CIFAR ResNet variant (depth = 6 * blocks_per_stage + 2)."""

    blocks_per_stage: int  # BasicBlocks in each of the 3 stages
    width: int = 16  # channels of the first stage; the others use 2x and 4x


class CifarResNet(ExitBackbone):
    """3x3 conv stem -> 3 stages of BasicBlocks (stride 1, 2, 2) -> global avg pool -> linear."""

    def __init__(self, cfg: CifarResNetConfig, in_chans: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, cfg.width, 3, 1, 1, bias=False), nn.BatchNorm2d(cfg.width), nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        chans = cfg.width
        for stage in range(NUM_STAGES):
            out_chans = cfg.width * 2**stage
            for i in range(cfg.blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(chans, out_chans, stride))
                chans = out_chans
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(chans, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def forward_head(self, h: Tensor) -> Tensor:
        return self.head(h)


def _create_resnet_cifar(spec: NetSpec, cfg: CifarResNetConfig) -> MultiExitNet:
    """Apply the spec's overrides (`width`; `depth` = total blocks, a multiple of 3) and build."""
    if spec.img_size < MIN_IMG_SIZE:
        raise ValueError(f"net spec field `img_size`: {spec.backbone} downsamples 4x and needs img_size >= "
                         f"{MIN_IMG_SIZE}, got {spec.img_size}")
    if spec.depth is not None and spec.depth % NUM_STAGES:
        raise ValueError(f"net spec field `depth`: {spec.backbone} takes a total block count divisible by "
                         f"{NUM_STAGES}, got {spec.depth}")
    overrides = {"width": spec.width, "blocks_per_stage": None if spec.depth is None else spec.depth // NUM_STAGES}
    # None overrides drop out so the variant's own values win
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    backbone = CifarResNet(cfg, spec.in_chans, spec.num_classes)
    return MultiExitNet(spec, backbone, resnet_exits(backbone.num_blocks))


_VARIANTS = {
    "resnet20": CifarResNetConfig(blocks_per_stage=3),
    "resnet32": CifarResNetConfig(blocks_per_stage=5),
    "resnet56": CifarResNetConfig(blocks_per_stage=9),
}


@register_net
def resnet20(spec: NetSpec) -> MultiExitNet:
    """CIFAR ResNet-20: 9 blocks; ICs after blocks 2, 4, 6, 8 by default."""
    return _create_resnet_cifar(spec, _VARIANTS["resnet20"])


@register_net
def resnet32(spec: NetSpec) -> MultiExitNet:
    """CIFAR ResNet-32: 15 blocks; ICs after blocks 5, 7, ..., 13 by default."""
    return _create_resnet_cifar(spec, _VARIANTS["resnet32"])


@register_net
def resnet56(spec: NetSpec) -> MultiExitNet:
    """CIFAR ResNet-56: 27 blocks; ICs after blocks 5, 7, ..., 25 by default."""
    return _create_resnet_cifar(spec, _VARIANTS["resnet56"])
