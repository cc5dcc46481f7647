"""Permutation symmetries of the project's multi-exit nets, and weight matching (Git Re-Basin).

Hidden units can be reordered without changing what a net computes, provided every tensor that
reads or writes them is reordered alike. A `PermutationSpec` names those unit groups and, for
every entry of the state dict, which group indexes each of its dimensions. Weight matching
(Ainsworth, Hayase & Srinivasa 2022, "Git Re-Basin", their weight-matching algorithm) then picks,
group by group, the permutation of model B's units that maximises the inner product of B's weights
with A's, solving each as a linear assignment problem with the other groups held fixed.

Permutations map new index -> old index: `permuted[i] = original[perm[i]]` along each axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from exitflow.stages.core.nets.gpf import StateHead
from exitflow.stages.core.nets.heads import MLPHead, PoolLinearHead, SDNHead, TokenHead
from exitflow.stages.core.nets.msdnet import MSDLayer, MSDNet, MSDNetClassifier, Transition
from exitflow.stages.core.nets.ztw import CascadeHead

Segment = tuple[str, int]  # (group, inner): the group's units in order, `inner` consecutive entries each
Axis = tuple[Segment, ...] | None  # None: the dimension is not permuted
State = dict[str, Tensor]


@dataclass
class PermutationSpec:
    """Unit groups (their sizes), and the groups indexing every permuted state-dict entry."""

    sizes: dict[str, int] = field(default_factory=dict)
    # units of these groups move only within consecutive blocks of this size: attention heads keep
    # their place, the units inside each head permute
    blocks: dict[str, int] = field(default_factory=dict)
    axes: dict[str, tuple[Axis, ...]] = field(default_factory=dict)
    matched: set[str] = field(default_factory=set)  # the entries weight matching compares (learned parameters)

    def occurrences(self) -> dict[str, list[tuple[str, int, int, int]]]:
        """group -> (key, dim, offset along dim, inner) of every segment the group indexes."""
        out: dict[str, list[tuple[str, int, int, int]]] = {g: [] for g in self.sizes}
        for key, axes in self.axes.items():
            for dim, axis in enumerate(axes):
                offset = 0
                for group, inner in axis or ():
                    out[group].append((key, dim, offset, inner))
                    offset += self.sizes[group] * inner
        return out


def _one(group: str, inner: int = 1) -> Axis:
    return ((group, inner),)


class _Builder:
    """Records the spec of one net, checking every shape against the net's own state dict."""

    def __init__(self, net: nn.Module) -> None:
        self.state = net.state_dict()
        self.params = {n for n, _ in net.named_parameters()}
        self.spec = PermutationSpec()
        self.fixed: set[str] = set()

    def group(self, name: str, size: int, block: int | None = None) -> str:
        assert name not in self.spec.sizes, name
        self.spec.sizes[name] = size
        if block is not None and block < size:
            self.spec.blocks[name] = block
        return name

    def tensor(self, key: str, *axes: Axis) -> None:
        shape = self.state[key].shape
        if len(axes) != len(shape):
            raise ValueError(f"permutation spec: {key} has shape {tuple(shape)}, spec gives {len(axes)} dims")
        for dim, axis in enumerate(axes):
            if axis is not None and sum(self.spec.sizes[g] * inner for g, inner in axis) != shape[dim]:
                raise ValueError(f"permutation spec: {key} dim {dim} has {shape[dim]} entries, spec {axis}")
        self.spec.axes[key] = tuple(axes)
        if key in self.params:
            self.spec.matched.add(key)

    def norm(self, prefix: str, group: str | Axis) -> None:
        """BatchNorm or LayerNorm: affine parameters and running statistics follow the channels
        (one group's, or a concatenation's segments)."""
        axis = _one(group) if isinstance(group, str) else group
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            if f"{prefix}.{suffix}" in self.state:
                self.tensor(f"{prefix}.{suffix}", axis)
        if f"{prefix}.num_batches_tracked" in self.state:
            self.fixed.add(f"{prefix}.num_batches_tracked")

    def layer(self, prefix: str, out: Axis, inp: Axis) -> None:
        """Linear or conv: weight (out, in, *kernel), optional bias (out,)."""
        weight = self.state[f"{prefix}.weight"]
        self.tensor(f"{prefix}.weight", out, inp, *([None] * (weight.ndim - 2)))
        if f"{prefix}.bias" in self.state:
            self.tensor(f"{prefix}.bias", out)

    def done(self, backbone: str) -> PermutationSpec:
        missing = sorted(set(self.state) - set(self.spec.axes) - self.fixed)
        if missing:
            raise ValueError(f"mode connectivity: no permutation rule for {missing[:5]} of backbone {backbone!r}")
        return self.spec


def _width(b: _Builder, axis: Axis) -> int:
    return sum(b.spec.sizes[g] * inner for g, inner in axis or ())


def _head(b: _Builder, prefix: str, head: nn.Module, stream: Axis, backbone: str) -> None:
    """An IC reading `stream` (one group's units, or a concatenation's segments): its input
    features permute with the backbone's units."""
    if isinstance(head, CascadeHead):  # ZTW: the previous IC's logits (classes) pass a norm and a map no permutation touches
        b.fixed.update(f"{prefix}.{key}" for key in ("norm.weight", "norm.bias", "cascade.weight"))
        _head(b, f"{prefix}.head", head.head, stream, backbone)
    elif isinstance(head, StateHead):  # GPF: a head whose outputs are a hidden state, read by the aggregator alone
        _head(b, f"{prefix}.head", head.head, stream, backbone)
    elif isinstance(head, SDNHead):
        b.fixed.add(f"{prefix}.mix")
        # flatten of pooled (C, h, w) maps: each channel owns h * w consecutive inputs
        cells = head.fc.in_features // _width(b, stream)
        b.layer(f"{prefix}.fc", None, tuple((g, inner * cells) for g, inner in stream or ()))
    elif isinstance(head, (PoolLinearHead, TokenHead)):
        if isinstance(head.norm, nn.LayerNorm):
            b.norm(f"{prefix}.norm", stream)
        b.layer(f"{prefix}.fc", None, stream)
    elif isinstance(head, MLPHead):
        current = stream
        linears = [i for i, m in enumerate(head.mlp) if isinstance(m, nn.Linear)]
        for i, m in enumerate(head.mlp):
            if isinstance(m, nn.LayerNorm):
                b.norm(f"{prefix}.mlp.{i}", current)
            elif isinstance(m, nn.Linear):
                out = None if i == linears[-1] else b.group(f"{prefix}.mlp.{i}", m.out_features)
                b.layer(f"{prefix}.mlp.{i}", None if out is None else _one(out), current)
                current = _one(out) if out else current
    elif isinstance(head, MSDNetClassifier):
        _msdnet_classifier(b, prefix, stream)
    else:
        raise ValueError(f"mode connectivity: no permutation rule for IC head {type(head).__name__} of {backbone!r}")


def _resnet(b: _Builder, net: nn.Module) -> list[str]:
    """CIFAR and torchvision ResNets: a residual stream per run of blocks with identity shortcuts
    (a projection shortcut starts a new one); each block's inner convs have their own groups."""
    bb = net.backbone
    stream = b.group("stream0", bb.stem[0].out_channels)
    b.layer("backbone.stem.0", _one(stream), None)
    b.norm("backbone.stem.1", stream)
    streams = []
    for i, block in enumerate(bb.blocks):
        p = f"backbone.blocks.{i}"
        name = "shortcut" if hasattr(block, "shortcut") else "downsample"
        short = getattr(block, name)
        convs = [c for c in ("conv1", "conv2", "conv3") if hasattr(block, c)]
        out = stream
        if isinstance(short, nn.Sequential):  # projection: a new stream, read from the old one
            out = b.group(f"stream{i + 1}", short[0].out_channels)
            b.layer(f"{p}.{name}.0", _one(out), _one(stream))
            b.norm(f"{p}.{name}.1", out)
        elif short is not None and not isinstance(short, nn.Identity):
            raise ValueError(f"mode connectivity: unknown shortcut {type(short).__name__} in {net.spec.backbone!r}")
        current = stream
        for j, c in enumerate(convs):
            conv = getattr(block, c)
            g = out if j == len(convs) - 1 else b.group(f"{p}.{c}", conv.out_channels)
            b.layer(f"{p}.{c}", _one(g), _one(current))
            b.norm(f"{p}.bn{j + 1}", g)
            current = g
        stream = out
        streams.append(stream)
    b.layer("backbone.head.2", None, _one(stream))
    return streams


def _vit(b: _Builder, net: nn.Module) -> list[str]:
    """timm ViT: one residual stream; per block, attention units within each head (q and k alike,
    v with the projection's input) and the MLP's hidden units."""
    vit = net.backbone.vit
    p = "backbone.vit"
    stream = b.group("stream", vit.embed_dim)
    for name in ("cls_token", "pos_embed"):
        if f"{p}.{name}" in b.state:
            b.tensor(f"{p}.{name}", None, None, _one(stream))
    b.layer(f"{p}.patch_embed.proj", _one(stream), None)
    for i, block in enumerate(vit.blocks):
        q = f"{p}.blocks.{i}"
        attn = block.attn
        if not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, block.ls1, block.ls2)):
            raise ValueError(f"mode connectivity: {net.spec.backbone!r} uses qk-norm or layer scale, which have no permutation rule")
        dim, head_dim = attn.qkv.in_features, attn.head_dim
        qk = b.group(f"{q}.qk", dim, head_dim)
        v = b.group(f"{q}.v", dim, head_dim)
        b.norm(f"{q}.norm1", stream)
        b.layer(f"{q}.attn.qkv", ((qk, 1), (qk, 1), (v, 1)), _one(stream))
        b.layer(f"{q}.attn.proj", _one(stream), _one(v))
        b.norm(f"{q}.norm2", stream)
        hidden = b.group(f"{q}.mlp", block.mlp.fc1.out_features)
        b.layer(f"{q}.mlp.fc1", _one(hidden), _one(stream))
        b.layer(f"{q}.mlp.fc2", _one(stream), _one(hidden))
    b.norm(f"{p}.norm", stream)
    b.layer(f"{p}.head", None, _one(stream))
    return [stream] * len(vit.blocks)


def _conv_bn(b: _Builder, prefix: str, inp: Axis) -> Axis:
    """A conv-BN-ReLU (`conv_bn_relu`: conv at .0, BN at .1) reading `inp`: its outputs are a new group."""
    out = b.group(prefix, b.state[f"{prefix}.0.weight"].shape[0])
    b.layer(f"{prefix}.0", _one(out), inp)
    b.norm(f"{prefix}.1", out)
    return _one(out)


def _msdnet_classifier(b: _Builder, prefix: str, stream: Axis) -> None:
    """MSDNet's classifier: two conv-BN-ReLU, pooling, the linear layer (its classes are not permuted)."""
    inner = _conv_bn(b, f"{prefix}.convs.0", stream)
    inner = _conv_bn(b, f"{prefix}.convs.1", inner)
    b.layer(f"{prefix}.fc", None, inner)


def _msdnet(b: _Builder, net: nn.Module) -> list[Axis]:
    """MSDNet: every conv's outputs are a group; a scale's state is the concatenation of the groups
    dense connectivity appended to it (its segments, in order), until a transition maps it to a new
    group. The first layer's conv for each scale (strided from the finer one) makes its first group."""
    bb = net.backbone
    scales: list[Axis] = []
    for s in range(len(bb.stem.layers)):
        scales.append(_conv_bn(b, f"backbone.stem.layers.{s}", scales[-1] if scales else None))
    streams: list[Axis] = []
    for i, block in enumerate(bb.blocks):
        for k, part in enumerate(block):
            p = f"backbone.blocks.{i}.{k}"
            if isinstance(part, Transition):
                scales = [_conv_bn(b, f"{p}.convs.{j}", axis) for j, axis in enumerate(scales)]
                continue
            if not isinstance(part, MSDLayer):
                raise ValueError(f"mode connectivity: no permutation rule for {type(part).__name__} in {net.spec.backbone!r}")
            dropped = part.in_scales - part.out_scales
            new = []
            for j, update in enumerate(part.updates):
                s = j + dropped
                grown = list(scales[s] or ())
                sources = ([("from_finer", scales[s - 1])] if update.from_finer is not None else []) + [("from_self", scales[s])]
                for name, inp in sources:
                    q = f"{p}.updates.{j}.{name}"
                    if isinstance(getattr(update, name).reduce, nn.Sequential):  # the 1x1 bottleneck
                        inp = _conv_bn(b, f"{q}.reduce", inp)
                    grown += list(_conv_bn(b, f"{q}.conv", inp) or ())
                new.append(tuple(grown))
            scales = new
        streams.append(scales[-1])
    _msdnet_classifier(b, "backbone.head", scales[-1])
    return streams


def permutation_spec(net: nn.Module) -> PermutationSpec:
    """The spec of a MultiExitNet: its backbone's unit groups and its ICs' inputs; other backbones are refused."""
    from exitflow.stages.core.nets.resnet_cifar import CifarResNet
    from exitflow.stages.core.nets.resnet_tv import TVResNet
    from exitflow.stages.core.nets.vit import ViT

    backbone = net.spec.backbone
    b = _Builder(net)
    streams: list[Axis]
    if isinstance(net.backbone, (CifarResNet, TVResNet)):
        streams = [_one(g) for g in _resnet(b, net)]
    elif isinstance(net.backbone, ViT):
        streams = [_one(g) for g in _vit(b, net)]
    elif isinstance(net.backbone, MSDNet):
        streams = _msdnet(b, net)
    else:
        inner = getattr(net.backbone, "model", None)
        what = type(net.backbone).__name__ + (f" over {type(inner).__name__}" if isinstance(inner, nn.Module) else "")
        raise ValueError(f"mode connectivity: backbone {backbone!r} ({what}) has no permutation spec: weight matching "
                         "needs to know which units of each weight the next layers read (a per-family rule), and this "
                         "model exposes only its intermediate outputs; exitflow has those rules for its CIFAR and "
                         "torchvision ResNets, its vit_* nets and MSDNet (rank, mutual information and landscapes need none)")
    for k, block in enumerate(net.ic_blocks):
        _head(b, f"ics.{k}", net.ics[k], streams[block - 1], backbone)
    # GPF's aggregator reads the ICs' states, ZTW's ensemble weighs their outputs, JEI-DNN's gates read their
    # softmax: no unit of the backbone in any of them
    for name, module in net.own_modules().items():
        b.fixed.update(f"{name}.{key}" for key in module.state_dict())
    return b.done(backbone)


def _permute_dim(t: Tensor, dim: int, axis: tuple[Segment, ...], sizes: dict[str, int], perms: dict[str, Tensor]) -> Tensor:
    pieces, offset = [], 0
    for group, inner in axis:
        n = sizes[group]
        seg = t.narrow(dim, offset, n * inner)
        shape = seg.shape
        units = seg.reshape(*shape[:dim], n, inner, *shape[dim + 1 :])
        pieces.append(units.index_select(dim, perms[group].to(t.device)).reshape(shape))
        offset += n * inner
    return torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]


def permute_tensor(spec: PermutationSpec, key: str, t: Tensor, perms: dict[str, Tensor], skip: int | None = None) -> Tensor:
    """`t` (state entry `key`) with every permuted dimension reordered, but `skip`."""
    for dim, axis in enumerate(spec.axes.get(key, ())):
        if axis is not None and dim != skip:
            t = _permute_dim(t, dim, axis, spec.sizes, perms)
    return t


def permute_state(spec: PermutationSpec, state: State, perms: dict[str, Tensor]) -> State:
    """The state dict of the same function with its units reordered by `perms`."""
    return {k: permute_tensor(spec, k, v, perms) for k, v in state.items()}


def identity_perms(spec: PermutationSpec) -> dict[str, Tensor]:
    return {g: torch.arange(n) for g, n in spec.sizes.items()}


def random_perms(spec: PermutationSpec, generator: torch.Generator) -> dict[str, Tensor]:
    """Random permutations that respect each group's blocks."""
    out = {}
    for g, n in spec.sizes.items():
        block = spec.blocks.get(g, n)
        out[g] = torch.cat([torch.randperm(block, generator=generator) + s for s in range(0, n, block)])
    return out


def _assign(cost: Tensor, block: int) -> Tensor:
    """The permutation maximising sum_i cost[i, perm[i]], within diagonal blocks of `block` units."""
    from scipy.optimize import linear_sum_assignment

    perm = torch.empty(cost.shape[0], dtype=torch.long)
    for s in range(0, cost.shape[0], block):
        _, cols = linear_sum_assignment(cost[s : s + block, s : s + block].numpy(), maximize=True)
        perm[s : s + block] = torch.as_tensor(cols, dtype=torch.long) + s
    return perm


def weight_matching(spec: PermutationSpec, a: State, b: State, seed: int = 0, max_iterations: int = 100) -> tuple[dict[str, Tensor], int]:
    """Permutations aligning B's units to A's, and the number of passes made.

    Each pass visits every group in a random order (seeded) and replaces its permutation by the
    linear assignment maximising sum over the group's tensors of <A, perm(B)>, the other groups held
    at their current permutations. It stops after a pass in which no group improved, or after
    `max_iterations` passes.
    """
    occ = spec.occurrences()
    perms = identity_perms(spec)
    a64 = {k: a[k].detach().double().cpu() for k in spec.matched}
    b64 = {k: b[k].detach().double().cpu() for k in spec.matched}
    generator = torch.Generator().manual_seed(seed)
    groups = sorted(spec.sizes)
    passes = 0
    for passes in range(1, max_iterations + 1):
        improved = False
        for i in torch.randperm(len(groups), generator=generator).tolist():
            g = groups[i]
            n = spec.sizes[g]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for key, dim, offset, inner in occ[g]:
                if key not in spec.matched:
                    continue
                wa = a64[key].narrow(dim, offset, n * inner).movedim(dim, 0).reshape(n, -1)
                wb = permute_tensor(spec, key, b64[key], perms, skip=dim)
                wb = wb.narrow(dim, offset, n * inner).movedim(dim, 0).reshape(n, -1)
                cost += wa @ wb.T
            new = _assign(cost, spec.blocks.get(g, n))
            rows = torch.arange(n)
            # strict improvement beyond rounding: ties keep the current permutation, so passes end
            gain = cost[rows, new].sum() - cost[rows, perms[g]].sum()
            if gain > 1e-12 * max(cost.abs().max().item(), 1.0):
                perms[g] = new
                improved = True
        if not improved:
            break
    return perms, passes
