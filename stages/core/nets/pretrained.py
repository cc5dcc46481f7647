"""Pretrained backbones from the local torchvision and timm caches: `net.init: torchvision:NAME` or
`timm:NAME` (the paper's ImageNet-pretrained runs, Fig. 11 and 27).

Nothing downloads: the weights file must already be where the library itself caches it
(torchvision: `torch.hub.get_dir()/checkpoints/`, i.e. `$TORCH_HOME/hub/checkpoints/`; timm: the
Hugging Face hub cache, `$HF_HUB_CACHE`, or torch hub's folder for weights timm fetches by URL). The
library's state dict is renamed to exitflow's backbone names: ResNets in torchvision's layout (`conv1`,
`bn1`, `layer1.0...`, `fc`: torchvision's own and timm's ResNets) onto the `resnet18/34/50` backbones,
and timm's ViTs onto the `vit_*` backbones. The ImageNet classifier (`fc`, `head`) is left out: the
backbone's classifier starts fresh (`stages.core.nets.start`), as does every IC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

from exitflow.stages.core.allowed import pretrained_source
from exitflow.stages.core.tensor_file import load_tensors

RESNET_LAYERS = 4  # layer1..layer4


@dataclass(frozen=True)
class Pretrained:
    """Weights a library publishes, named as the library names them."""

    library: str  # torchvision | timm
    name: str  # torchvision: resnet50, resnet50.IMAGENET1K_V2 or ResNet50_Weights.IMAGENET1K_V2; timm: a pretrained tag

    @classmethod
    def parse(cls, source: str) -> Pretrained | None:
        """`torchvision:NAME` / `timm:NAME` -> Pretrained; anything else (a file, runs:/...) -> None."""
        parsed = pretrained_source(source)
        return None if parsed is None else cls(*parsed)

    def __str__(self) -> str:
        return f"{self.library}:{self.name}"

    def canonical(self) -> str:
        """The weights' full name (torchvision: the enum member, so `resnet18` and its DEFAULT agree)."""
        if self.library == "torchvision":
            return f"torchvision:{_torchvision_weights(self.name)}"
        return str(self)

    def cached_file(self) -> Path:
        """The weights file in the local cache; FileNotFoundError saying where it was looked for."""
        if self.library == "torchvision":
            weights = _torchvision_weights(self.name)
            path = _hub_checkpoint(weights.url)
            fetch = f"python -c \"import torchvision; torchvision.models.get_weight('{weights}').get_state_dict()\""
        else:
            path, fetch = _timm_cached(self.name)
        if not path.is_file():
            raise FileNotFoundError(
                f"{self}: not in the local cache (looked for {path}); exitflow downloads nothing: on a machine "
                f"with a network run {fetch} and copy the file to that place, or give net.init a state-dict file")
        return path

    def read(self) -> dict[str, Tensor]:
        """The library's state dict, from the cache (tensors only: nothing in it runs)."""
        path = self.cached_file()
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in (".pth", ".pt", ".bin"):
            state = load_tensors(path)
            for wrapper in ("state_dict", "model"):  # checkpoints that wrap their weights
                if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                    state = state[wrapper]
        else:
            raise ValueError(f"{self}: {path.name}: exitflow reads .safetensors, .pth and .bin weights, not {path.suffix}")
        return dict(state)

    def backbone_state(self) -> dict[str, Tensor]:
        """The weights under exitflow's backbone names (`backbone.*`), the ImageNet classifier left out."""
        return to_backbone_names(self.read(), str(self))

    def timm_model_state(self) -> dict[str, Tensor]:
        """The weights under a `timm:NAME` backbone's names: the library's own layout, which the timm model
        of the same architecture inside the net (`backbone.model`) takes as it is, its classifier left out."""
        heads = tuple(f"{c}." for c in self._classifiers())
        return {f"{TIMM_MODEL}{k}": v for k, v in self.read().items() if not k.startswith(heads)}

    def _classifiers(self) -> tuple[str, ...]:
        if self.library == "torchvision":
            return TORCHVISION_CLASSIFIERS
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(self.name)
        named = cfg.classifier if cfg is not None else None
        return (named,) if isinstance(named, str) else tuple(named or ())


@dataclass(frozen=True)
class PretrainedStart:
    """Reads the cached weights when called (on the Train worker: on a cluster, from that node's cache)."""

    source: str
    onto_timm: bool = False  # the study's backbone is `timm:NAME`: the library's names, under backbone.model.

    def __call__(self) -> dict[str, Tensor]:
        pretrained = Pretrained.parse(self.source)
        assert pretrained is not None, self.source
        return pretrained.timm_model_state() if self.onto_timm else pretrained.backbone_state()


TIMM_MODEL = "backbone.model."  # where a `timm:NAME` backbone holds the timm model (stages/core/nets/timm_backbone.py)
TORCHVISION_CLASSIFIERS = ("fc", "classifier", "heads")  # the ImageNet heads of torchvision's classifiers


def to_backbone_names(state: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    """A torchvision-layout ResNet's or a timm ViT's state dict under exitflow's backbone names."""
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return _resnet(state)
    if "patch_embed.proj.weight" in state and "cls_token" in state:
        return {f"backbone.vit.{k}": v for k, v in state.items() if not k.startswith("head.")}
    raise ValueError(f"{what}: neither a ResNet in torchvision's layout nor a timm ViT (first keys: {list(state)[:3]}); "
                     "exitflow's pretrained starts are resnet18/34/50 and the vit_* backbones")


def _resnet(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """conv1/bn1 -> stem.0/stem.1, layerL.j -> blocks.(blocks of earlier layers + j); fc dropped."""
    blocks = [1 + max((int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))), default=-1)
              for i in range(1, RESNET_LAYERS + 1)]
    offsets = [sum(blocks[:i]) for i in range(RESNET_LAYERS)]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "fc":
            continue
        if head == "conv1":
            name = f"stem.0.{rest}"
        elif head == "bn1":
            name = f"stem.1.{rest}"
        elif m := re.fullmatch(r"layer(\d)", head):
            j, _, inner = rest.partition(".")
            name = f"blocks.{offsets[int(m.group(1)) - 1] + int(j)}.{inner}"
        else:
            name = key  # unknown to the layout: the backbone check names it
        out[f"backbone.{name}"] = value
    return out


def _torchvision_weights(name: str) -> object:
    """The torchvision weights enum member: `ResNet50_Weights.IMAGENET1K_V2`, `resnet50.IMAGENET1K_V2`
    or `resnet50` (its DEFAULT)."""
    from torchvision.models import get_model_weights, get_weight

    try:
        if "_Weights." in name:
            return get_weight(name)
        model, _, tag = name.partition(".")
        weights = get_model_weights(model)
    except (ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"torchvision:{name}: torchvision has no such weights ({e})") from None
    if not tag:
        return weights.DEFAULT
    try:
        return weights[tag]
    except KeyError:
        raise ValueError(f"torchvision:{name}: {model}'s weights are {[w.name for w in weights]}") from None


def _hub_checkpoint(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _timm_cached(name: str) -> tuple[Path, str]:
    """Where timm's weights `name` sit in the local cache (the HF hub's, else torch hub's for a URL)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(f"timm:{name}: timm has no pretrained weights by that name (e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k)")
    fetch = f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
    readable_url = cfg.url and not cfg.url.endswith(".npz")  # timm converts .npz (JAX) weights itself; exitflow does not
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo = cfg.hf_hub_id
        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]):
            found = try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE)
            if isinstance(found, str):
                return Path(found), fetch
        if not readable_url:
            folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
            return folder / "snapshots" / "<revision>" / "model.safetensors", fetch
    if not readable_url:
        raise ValueError(f"timm:{name}: its weights come only as {cfg.url}, which exitflow does not read")
    return _hub_checkpoint(cfg.url), fetch
