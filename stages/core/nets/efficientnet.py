"""EfficientNet-B0 and EfficientNetV2-S from torchvision (fresh weights), cut into stem -> MBConv blocks -> head."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from exitflow.stages.core.nets.multi_exit import ExitBackbone, MultiExitNet, exits_every
from exitflow.stages.core.nets.registry import register_net
from exitflow.stages.core.nets.spec import NetSpec

SMALL_INPUT_MAX = 64  # small_input=None picks the stride-1 stem at or below this image side
STRIDE_STANDARD = 32  # stride-2 stem + four stride-2 stages
STRIDE_SMALL = 16  # stride-1 stem + four stride-2 stages


@dataclass(frozen=True)
class EfficientNetConfig:
    """One torchvision EfficientNet variant."""

    factory: str  # torchvision.models builder, called with weights=None (imported when a net is built)


class TVEfficientNet(ExitBackbone):
    """torchvision EfficientNet: features[0] (stem conv) -> every (Fused)MBConv block of the stages ->
    features[-1] (1x1 conv) + avgpool + classifier as the head.

    `small_input` makes the stem conv stride 1 (total stride 16), the usual CIFAR adaptation.
    """

    classifier = "head.3.1"  # torchvision's classifier is Sequential(Dropout, Linear)

    def __init__(self, cfg: EfficientNetConfig, in_chans: int, num_classes: int, small_input: bool) -> None:
        super().__init__()
        import torchvision.models  # here, not at import: building a net of another family must not pay for it

        net = getattr(torchvision.models, cfg.factory)(weights=None, num_classes=num_classes)
        stem_conv = net.features[0][0]
        if small_input or in_chans != 3:
            conv = nn.Conv2d(in_chans, stem_conv.out_channels, 3, 1 if small_input else 2, 1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out")  # torchvision's EfficientNet conv init
            net.features[0][0] = conv
        self.stem = net.features[0]
        self.blocks = nn.ModuleList([block for stage in net.features[1:-1] for block in stage])
        self.head = nn.Sequential(net.features[-1], net.avgpool, nn.Flatten(1), net.classifier)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def forward_head(self, h: Tensor) -> Tensor:
        return self.head(h)


def _create_efficientnet(spec: NetSpec, cfg: EfficientNetConfig) -> MultiExitNet:
    """Resolve the stem (spec.small_input, None -> img_size <= 64), check the image fits it, build.

    Default ICs: after every other block from the 2nd.
    """
    for field in ("width", "depth"):
        if getattr(spec, field) is not None:
            raise ValueError(f"net spec field `{field}`: {spec.backbone} has fixed {field}; leave it None")
    small_input = spec.img_size <= SMALL_INPUT_MAX if spec.small_input is None else spec.small_input
    stride = STRIDE_SMALL if small_input else STRIDE_STANDARD
    if spec.img_size < stride:
        raise ValueError(f"net spec field `img_size`: {spec.backbone} with small_input={small_input} downsamples "
                         f"{stride}x and needs img_size >= {stride}, got {spec.img_size}")
    backbone = TVEfficientNet(cfg, spec.in_chans, spec.num_classes, small_input)
    return MultiExitNet(spec, backbone, exits_every(backbone.num_blocks, 2, 2))


_VARIANTS = {
    "efficientnet_b0": EfficientNetConfig(factory="efficientnet_b0"),
    "efficientnet_v2_s": EfficientNetConfig(factory="efficientnet_v2_s"),
}


@register_net
def efficientnet_b0(spec: NetSpec) -> MultiExitNet:
    """EfficientNet-B0: 16 MBConv blocks; ICs after blocks 2, 4, ..., 14 by default."""
    return _create_efficientnet(spec, _VARIANTS["efficientnet_b0"])


@register_net
def efficientnet_v2_s(spec: NetSpec) -> MultiExitNet:
    """EfficientNetV2-S: 40 (Fused)MBConv blocks; ICs after blocks 2, 4, ..., 38 by default."""
    return _create_efficientnet(spec, _VARIANTS["efficientnet_v2_s"])
