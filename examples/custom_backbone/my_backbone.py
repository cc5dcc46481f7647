"""A small CNN of my own as an exitflow backbone: study.yaml names it `net.backbone: my_backbone:build`."""

from torch import Tensor, nn

from exitflow.stages.core.nets import ExitBackbone


def conv_block(in_chans: int, out_chans: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False), nn.BatchNorm2d(out_chans),
                         nn.ReLU(inplace=True))


class TinyCNN(ExitBackbone):
    """stem -> 4 blocks (the third halves the resolution) -> pooled linear head. ICs go after blocks."""

    classifier = "head.2"  # the final Linear's path in this module (a pretrained start may leave it out)
    default_exits = (1, 2, 3)  # ICs after blocks 1, 2, 3 unless the spec says otherwise (net.exits, net.exit_every)

    def __init__(self, num_classes: int, in_chans: int, width: int) -> None:
        super().__init__()
        self.stem = conv_block(in_chans, width)
        self.blocks = nn.ModuleList([conv_block(width, width), conv_block(width, width),
                                     conv_block(width, 2 * width, stride=2), conv_block(2 * width, 2 * width)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(2 * width, num_classes))

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def forward_head(self, h: Tensor) -> Tensor:
        return self.head(h)


def build(num_classes: int, in_chans: int, width: int = 32) -> TinyCNN:
    """What exitflow calls: the data set's classes and channels, and `width` when the spec sets net.width."""
    return TinyCNN(num_classes, in_chans, width)
