"""Internal-classifier (IC) heads: SDN pooling head for conv features, linear and MLP heads for pooled
conv features or tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from exitflow.stages.core.allowed import HEAD_KINDS

SDN_POOL_SIZE = 4  # SDN heads pool conv features down to at most this many cells per side


class SDNHead(nn.Module):
    """SDN internal classifier (Kaya et al. 2019): learned mix of max and avg pooling, then one linear layer.

    alpha = sigmoid(mix) keeps the mix a convex combination; mix starts at 0 (alpha = 0.5, SDN's
    initial value). Features are pooled to at most `pool_size` x `pool_size` cells, so the
    linear layer stays small on early, high-resolution feature maps.
    """

    def __init__(
        self, channels: int, spatial: tuple[int, int], num_classes: int, pool_size: int = SDN_POOL_SIZE
    ) -> None:
        super().__init__()
        out = (min(pool_size, spatial[0]), min(pool_size, spatial[1]))
        self.max_pool = nn.AdaptiveMaxPool2d(out)
        self.avg_pool = nn.AdaptiveAvgPool2d(out)
        self.mix = nn.Parameter(torch.zeros(()))
        self.fc = nn.Linear(channels * out[0] * out[1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        alpha = torch.sigmoid(self.mix)
        pooled = alpha * self.max_pool(x) + (1 - alpha) * self.avg_pool(x)
        # flatten copies a channels_last tensor into NCHW order, so the layout never changes the result
        return self.fc(torch.flatten(pooled, 1))


class PoolLinearHead(nn.Module):
    """Global average pooling of conv features, optional LayerNorm, one linear layer."""

    def __init__(self, channels: int, num_classes: int, norm: bool = False) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(channels) if norm else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(torch.flatten(self.pool(x), 1)))


class TokenHead(nn.Module):
    """ViT internal classifier: optional LayerNorm, then one linear layer on the CLS token (token 0)."""

    def __init__(self, dim: int, num_classes: int, norm: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x[:, 0]))


class MLPHead(nn.Module):
    """An IC with hidden layers (the paper's Table 2: one or two hidden layers of 1024 or 2048 units):
    globally pooled conv features or the CLS token, optional LayerNorm, then Linear + activation per
    hidden layer (ReLU on conv features, GELU on tokens: each family's own), then the classifier."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int, tokens: bool, norm: bool = False) -> None:
        super().__init__()
        self.tokens = tokens
        self.pool = nn.Identity() if tokens else nn.AdaptiveAvgPool2d(1)
        layers: list[nn.Module] = [nn.LayerNorm(in_features)] if norm else []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU() if tokens else nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        features = x[:, 0] if self.tokens else torch.flatten(self.pool(x), 1)
        return self.mlp(features)


def make_head(kind: str | None, feature_shape: tuple[int, ...], num_classes: int, norm: bool = False,
              hidden: tuple[int, ...] = ()) -> nn.Module:
    """An IC for features of per-sample shape `feature_shape`: (C, H, W) conv maps or (N, D) tokens.

    `kind` None picks the family default: "sdn" for conv maps, "linear" for tokens. `hidden` are the
    widths of an "mlp" head's hidden layers (at least one; no other kind has any).
    """
    if kind is not None and kind not in HEAD_KINDS:
        raise ValueError(f"net spec field `head`: unknown head {kind!r}; known: {list(HEAD_KINDS)}")
    if kind == "mlp":
        if not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"net spec field `head_hidden`: an 'mlp' head needs one or more hidden widths >= 1, got {list(hidden)}")
        if len(feature_shape) not in (2, 3):
            raise ValueError(f"no IC head for features of shape {feature_shape}: expected (C, H, W) or (N, D)")
        tokens = len(feature_shape) == 2
        return MLPHead(feature_shape[1] if tokens else feature_shape[0], tuple(hidden), num_classes, tokens, norm)
    if hidden:
        raise ValueError(f"net spec field `head_hidden`: hidden layers belong to 'mlp' heads only, not to {kind or 'the default'!r} heads")
    if len(feature_shape) == 3:
        channels, height, width = feature_shape
        if kind in (None, "sdn"):
            if norm:
                raise ValueError("net spec field `head_norm`: applies to linear heads only, not to 'sdn' heads")
            return SDNHead(channels, (height, width), num_classes)
        return PoolLinearHead(channels, num_classes, norm)
    if len(feature_shape) == 2:
        if kind == "sdn":
            raise ValueError("net spec field `head`: 'sdn' needs conv feature maps; token features take 'linear'")
        return TokenHead(feature_shape[1], num_classes, norm)
    raise ValueError(f"no IC head for features of shape {feature_shape}: expected (C, H, W) or (N, D)")
