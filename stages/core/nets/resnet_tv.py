"""ResNet-18/34/50 from torchvision (fresh weights), cut into stem -> residual blocks -> head."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from exitflow.stages.core.nets.multi_exit import ExitBackbone, MultiExitNet, resnet_exits
from exitflow.stages.core.nets.registry import register_net
from exitflow.stages.core.nets.spec import NetSpec

STEM_WIDTH = 64  # torchvision's stem output channels
SMALL_INPUT_MAX = 64  # small_input=None picks the small stem at or below this image side
STRIDE_STANDARD = 32  # 7x7/2 conv + max-pool + three stride-2 stages
STRIDE_SMALL = 8  # 3x3/1 conv, no max-pool + three stride-2 stages


def _conv_init(conv: nn.Conv2d) -> nn.Conv2d:
    """torchvision's ResNet conv init, for the stem convs swapped in after construction."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


@dataclass(frozen=True)
class TVResNetConfig:
    """One torchvision ResNet variant."""

    factory: str  # torchvision.models builder, called with weights=None (imported when a net is built)


class TVResNet(ExitBackbone):
    """torchvision ResNet: stem (conv1, bn1, relu, maxpool) -> the blocks of layer1..4 -> avgpool + fc.

    `small_input` swaps the stem for a 3x3 stride-1 conv without max-pool (CIFAR-style), so
    32 px images keep a 4x4 map at the last stage instead of 1x1.
    """

    def __init__(self, cfg: TVResNetConfig, in_chans: int, num_classes: int, small_input: bool) -> None:
        super().__init__()
        import torchvision.models  # here, not at import: building a net of another family must not pay for it

        net = getattr(torchvision.models, cfg.factory)(weights=None, num_classes=num_classes)
        if small_input:
            net.conv1 = _conv_init(nn.Conv2d(in_chans, STEM_WIDTH, 3, 1, 1, bias=False))
            net.maxpool = nn.Identity()
        elif in_chans != 3:
            net.conv1 = _conv_init(nn.Conv2d(in_chans, STEM_WIDTH, 7, 2, 3, bias=False))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.blocks = nn.ModuleList([*net.layer1, *net.layer2, *net.layer3, *net.layer4])
        self.head = nn.Sequential(net.avgpool, nn.Flatten(1), net.fc)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def forward_head(self, h: Tensor) -> Tensor:
        return self.head(h)


def _create_resnet_tv(spec: NetSpec, cfg: TVResNetConfig) -> MultiExitNet:
    """Resolve the stem (spec.small_input, None -> img_size <= 64), check the image fits it, build."""
    for field in ("width", "depth"):
        if getattr(spec, field) is not None:
            raise ValueError(f"net spec field `{field}`: {spec.backbone} has fixed {field}; leave it None")
    small_input = spec.img_size <= SMALL_INPUT_MAX if spec.small_input is None else spec.small_input
    stride = STRIDE_SMALL if small_input else STRIDE_STANDARD
    if spec.img_size < stride:
        raise ValueError(f"net spec field `img_size`: {spec.backbone} with small_input={small_input} downsamples "
                         f"{stride}x and needs img_size >= {stride}, got {spec.img_size}"
                         + ("" if small_input else "; set small_input=True for small images"))
    backbone = TVResNet(cfg, spec.in_chans, spec.num_classes, small_input)
    return MultiExitNet(spec, backbone, resnet_exits(backbone.num_blocks))


_VARIANTS = {
    "resnet18": TVResNetConfig(factory="resnet18"),
    "resnet34": TVResNetConfig(factory="resnet34"),
    "resnet50": TVResNetConfig(factory="resnet50"),
}


@register_net
def resnet18(spec: NetSpec) -> MultiExitNet:
    """ResNet-18: 8 blocks; ICs after blocks 2, 4, 6 by default."""
    return _create_resnet_tv(spec, _VARIANTS["resnet18"])


@register_net
def resnet34(spec: NetSpec) -> MultiExitNet:
    """ResNet-34: 16 blocks; ICs after blocks 5, 7, ..., 15 by default."""
    return _create_resnet_tv(spec, _VARIANTS["resnet34"])


@register_net
def resnet50(spec: NetSpec) -> MultiExitNet:
    """ResNet-50: 16 bottleneck blocks; ICs after blocks 5, 7, ..., 15 by default."""
    return _create_resnet_tv(spec, _VARIANTS["resnet50"])
