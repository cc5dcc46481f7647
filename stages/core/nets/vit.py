"""Vision Transformers through timm's VisionTransformer (fresh weights), cut into embed -> blocks -> norm + head."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn

from exitflow.stages.core.nets.multi_exit import ExitBackbone, MultiExitNet, exits_every
from exitflow.stages.core.nets.registry import register_net
from exitflow.stages.core.nets.spec import NetSpec

AUTO_PATCHES = (16, 8, 4, 2, 1)  # candidate patch sides for patch_size=None, largest first
AUTO_MIN_GRID = 7  # aim for at least a 7x7 token grid (224 px -> 16 px patches, 32 px -> 4 px)


def auto_patch_size(img_size: int) -> int:
    """The largest patch (<= 16) dividing `img_size` that leaves a grid of >= 7 tokens per side.

    Tiny images relax the grid to img_size // 2 per side (8 px -> 2 px patches, a 4x4 grid).
    """
    min_grid = min(AUTO_MIN_GRID, max(img_size // 2, 1))
    return next(p for p in AUTO_PATCHES if img_size % p == 0 and img_size // p >= min_grid)


@dataclass(frozen=True)
class ViTConfig:
    """One ViT variant (class token, 'token' pooling, no dropout or stochastic depth)."""

    embed_dim: int  # token width (spec.width overrides)
    depth: int  # transformer blocks (spec.depth overrides)
    num_heads: int  # attention heads; must divide embed_dim
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim
    patch_size: int | None = None  # patch side; None -> auto_patch_size(img_size)


class ViT(ExitBackbone):
    """timm VisionTransformer: patch_embed + _pos_embed (stem) -> transformer blocks -> norm + CLS head."""

    classifier = "vit.head"

    def __init__(self, cfg: ViTConfig, patch_size: int, img_size: int, in_chans: int, num_classes: int) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer  # here: timm costs seconds to import

        self.vit = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool="token",
            class_token=True,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
        )

    @property
    def blocks(self) -> nn.Sequential:  # type: ignore[override]
        # a view of timm's own block list: registering it twice would duplicate state_dict keys
        return self.vit.blocks

    def forward_stem(self, x: Tensor) -> Tensor:
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))

    def forward_head(self, h: Tensor) -> Tensor:
        return self.vit.forward_head(self.vit.norm(h))


def _create_vit(spec: NetSpec, cfg: ViTConfig) -> MultiExitNet:
    """Apply the spec's overrides (`width` = embed dim, `depth` = blocks), check the patching, build.

    Default ICs: after every block from the 2nd (the final head follows the last block).
    """
    overrides = {"embed_dim": spec.width, "depth": spec.depth}
    # None overrides drop out so the variant's own values win
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"net spec field `width`: {spec.backbone} has {cfg.num_heads} heads, which must divide "
                         f"the embed dim, got {cfg.embed_dim}")
    patch = auto_patch_size(spec.img_size) if cfg.patch_size is None else cfg.patch_size
    if spec.img_size < patch or spec.img_size % patch:
        raise ValueError(f"net spec field `img_size`: {spec.backbone} cuts {patch}x{patch} patches and needs "
                         f"img_size a multiple of {patch}, got {spec.img_size}")
    backbone = ViT(cfg, patch, spec.img_size, spec.in_chans, spec.num_classes)
    return MultiExitNet(spec, backbone, exits_every(backbone.num_blocks, 1, 2))


_VARIANTS = {
    "vit_tiny": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "vit_small": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ViTConfig(embed_dim=768, depth=12, num_heads=12),  # ViT-B/16: the paper's pretrained ViT (Fig. 11)
    # the paper's CIFAR ViT (appendix D.1): patch 4, dim 256, 7 layers, 8 heads; MLP width 2x (512)
    "vit_cifar": ViTConfig(embed_dim=256, depth=7, num_heads=8, mlp_ratio=2.0, patch_size=4),
}


@register_net
def vit_tiny(spec: NetSpec) -> MultiExitNet:
    """ViT-Tiny (192 wide, 12 blocks, 3 heads); ICs after blocks 2..11 by default."""
    return _create_vit(spec, _VARIANTS["vit_tiny"])


@register_net
def vit_small(spec: NetSpec) -> MultiExitNet:
    """ViT-Small (384 wide, 12 blocks, 6 heads); ICs after blocks 2..11 by default."""
    return _create_vit(spec, _VARIANTS["vit_small"])


@register_net
def vit_base(spec: NetSpec) -> MultiExitNet:
    """ViT-Base/16 (768 wide, 12 blocks, 12 heads); ICs after blocks 2..11 by default. Its ImageNet
    weights come in through `net.init` as a local state-dict file (nothing is downloaded)."""
    return _create_vit(spec, _VARIANTS["vit_base"])


@register_net
def vit_cifar(spec: NetSpec) -> MultiExitNet:
    """The paper's CIFAR ViT (patch 4, 256 wide, 7 blocks, 8 heads); ICs after blocks 2..6 by default."""
    return _create_vit(spec, _VARIANTS["vit_cifar"])
