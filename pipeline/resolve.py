"""Spec sections -> the core's frozen configs (DataSpec with its content identity, NetChoice, StartWeights):
what the stages receive inside each node's typed config. A phase's section builds the core's
PhaseConfig itself (`pipeline.spec_sections.PhaseSection.phase_config`: its fields are the core's).

Also the up-front checks: a bad dataset or a net that cannot be built fails here, before
Ray starts or anything is written to the tracking store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from exitflow.stages.core.data import DataError, DataSpec, DatasetInfo, check_dataset, dataset_info
from exitflow.stages.core.data.identity import DataIdentity, identify, unread_identity
from exitflow.stages.core.nets import NetChoice, NetSpec, create_net
from exitflow.stages.core.nets.pretrained import Pretrained
from exitflow.stages.core.allowed import MAX_PARAMETERS, RUN_PREFIX, TIMM_PREFIX
from exitflow.stages.core.nets.start import StartWeights, backbone_weights, start_reader
from exitflow.stages.core.log_lines import brief
from exitflow.stages.core.tensor_file import UnreadableTensors
from exitflow.stages.core.user_backbone import is_user_backbone

from exitflow.pipeline.spec import SpecError, StudySpec, axis_label, variants


# Each data set's identity, per (name, root), for this process: the driver's pre-flight computes it
# again before every plan and run (cheap: kept file hashes), every node's config then reads it here.
_IDENTITIES: dict[tuple[str, str | None], DataIdentity] = {}


def data_spec(spec: StudySpec) -> DataSpec:
    """The study's DataSpec with its content identity, which the cache keys hold instead of its root."""
    data = _data_section(spec)
    return dataclasses.replace(data, identity=_identity_or_unread(data))


def _data_section(spec: StudySpec) -> DataSpec:
    return DataSpec.from_dict(spec.data.model_dump(mode="json"))


def data_identity(data: DataSpec, refresh: bool = False) -> DataIdentity:
    """The digest of `data`'s files, computed once per process (`refresh`: again, as the pre-flight
    does); a DataError when they cannot be read."""
    where = (data.name, data.root)
    if refresh or where not in _IDENTITIES:
        _IDENTITIES[where] = identify(data)
    return _IDENTITIES[where]


def _identity_or_unread(data: DataSpec) -> str:
    try:
        return data_identity(data).digest
    except (DataError, OSError):  # no data here (a graph built without the pre-flight): its path stands in
        return unread_identity(data)


def net_choice(spec: StudySpec) -> NetChoice:
    return NetChoice(**spec.net.model_dump(mode="json", exclude={"init"}))


def start_weights(spec: StudySpec) -> StartWeights | None:
    """The starting point of the phases that train from scratch: a file's content hash, or a run id."""
    source = spec.net.init
    if source is None:
        return None
    if source.startswith(RUN_PREFIX):
        return StartWeights(identity=source, source=source)
    pretrained = Pretrained.parse(source)
    if pretrained is not None:  # the cached file's content, under the weights' full name
        try:
            path, name = pretrained.cached_file(), pretrained.canonical()
        except (ValueError, FileNotFoundError) as e:
            raise SpecError(f"net.init: {e}") from None
        return StartWeights(identity=f"{name}@{file_sha256(path)}", source=source)
    path = Path(source)
    if not path.is_file():
        raise SpecError(f"net.init: {source}: {'a folder, not a state-dict file' if path.is_dir() else 'no such file'}")
    return StartWeights(identity=file_sha256(path), source=source)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def check_start(spec: StudySpec, ns: NetSpec, read_run: Callable[[str], dict[str, Any]] | None = None) -> None:
    """The starting weights load into the study's net (every backbone key, each its shape): a
    SpecError naming net.init otherwise. A run's weights are read with `read_run` (needs the store)."""
    start = start_weights(spec)
    if start is None:
        return
    if start.source.startswith(RUN_PREFIX) and read_run is None:
        return
    try:
        state = start_reader(start.source, lambda run_id: functools.partial(read_run, run_id), ns.backbone.startswith(TIMM_PREFIX))()
        backbone_weights(create_net(ns), state)
    except SpecError:
        raise
    except UnreadableTensors as e:
        raise SpecError(f"net.init: {start.source}: not a state dict torch can read safely: {e}") from None
    except Exception as e:  # noqa: BLE001 - MLflow and the libraries' caches raise many types; each is a bad start
        raise SpecError(f"net.init: {start.source}: {brief(e)}") from None


def check_starts(spec: StudySpec, read_run: Callable[[str], dict[str, Any]] | None = None, runs_only: bool = False) -> None:
    """`check_start` for every variant of the study (each `compare` combination), naming the variant;
    `runs_only`: only the variants that start from a run (`runs:/ID`, read with `read_run`)."""
    for assignment, variant in variants(spec):
        init = variant.net.init
        if init is None or (runs_only and not init.startswith(RUN_PREFIX)):
            continue
        with _naming(assignment):
            check_start(variant, sized_net(net_choice(variant), dataset_info(_data_section(variant))), read_run)


def sized_net(choice: NetChoice, info: DatasetInfo) -> NetSpec:
    return choice.sized(info.num_classes, info.in_chans, info.img_size)


def preflight(spec: StudySpec) -> tuple[DatasetInfo, NetSpec]:
    """Check the data and build the net once on CPU, for every variant of the study (each `compare`
    combination: each data set checked once, each net built once); raise SpecError naming the variant
    (`compare net.backbone=x: `), the field and the reason. Returns the first variant's."""
    infos: dict[str, DatasetInfo] = {}
    nets: set[str] = set()  # repr of each NetSpec built, and of each (NetSpec, net.init) loaded
    first: tuple[DatasetInfo, NetSpec] | None = None
    for assignment, variant in variants(spec):
        with _naming(assignment):
            checked = _preflight_variant(variant, infos, nets)
        first = first or checked
    assert first is not None  # variants() gives at least the spec itself
    return first


@contextlib.contextmanager
def _naming(assignment: tuple[tuple[str, Any], ...]) -> Iterator[None]:
    """A SpecError raised inside names the variant it was raised for (nothing for a study without axes)."""
    try:
        yield
    except SpecError as e:
        if not assignment:
            raise
        raise SpecError(f"compare {axis_label(assignment)}: {e}") from None


def _preflight_variant(spec: StudySpec, infos: dict[str, DatasetInfo], nets: set[str]) -> tuple[DatasetInfo, NetSpec]:
    """`preflight` of one study; `infos` and `nets` hold what earlier variants checked already."""
    data = _data_section(spec)
    where = json.dumps(spec.data.model_dump(mode="json"), sort_keys=True)
    if where not in infos:
        try:
            infos[where] = check_dataset(data)
            data_identity(data, refresh=True)  # after the check: a download it allowed is there now
        except (ValueError, OSError) as e:  # OSError: an unreadable file or folder
            raise SpecError(f"data: {e}") from None
    info = infos[where]
    try:
        ns = sized_net(net_choice(spec), info)
    except (ValueError, KeyError, TypeError) as e:
        raise SpecError(f"net: {e}") from None
    if repr(ns) not in nets:
        if not _build_net(ns):
            nets.add(NO_GRADIENT_EQUILIBRIUM + repr(ns))
        nets.add(repr(ns))
    if NO_GRADIENT_EQUILIBRIUM + repr(ns) in nets:
        _refuse_gradient_equilibrium(ns, spec)
    if spec.analyses.connectivity.enabled and repr(("connectivity", ns)) not in nets:
        _check_connectivity(ns)
        nets.add(repr(("connectivity", ns)))
    if repr((ns, spec.net.init)) not in nets:
        check_start(spec, ns)  # a file: now; a run's weights once the tracking store is open (check_starts)
        nets.add(repr((ns, spec.net.init)))
    for phase in ("P1", "P2", "P3"):
        try:  # the core's own checks of the phase's fields (the spec's are generated from them)
            getattr(spec.phases, phase).phase_config()
        except (ValueError, TypeError) as e:
            raise SpecError(f"phases.{phase}: {e}") from None
    return info, ns


NO_GRADIENT_EQUILIBRIUM = "no gradient equilibrium: "  # marks, in a preflight's `nets`, a net built that has none
MANY_CLASSES = 1_000  # ImageNet's: a classifier for more is counted before it is built


def _build_net(ns: NetSpec) -> bool:
    """Build the net on CPU, once its size is known to fit. A net the spec sizes (`net.width`,
    `net.depth`, `net.head_hidden`) or a data set of many classes sizes is counted first on torch's
    meta device, which allocates nothing (a width of thousands would take the machine's memory); a
    family's own sizes are known to fit, and the meta build costs as much as the CPU one. Returns whether
    the net can rescale gradients between its blocks (gradient equilibrium)."""
    count = 0
    # a builder of the user's, or a timm model: its sizes are unknown until counted
    users = is_user_backbone(ns.backbone) or ns.backbone.startswith(TIMM_PREFIX)
    if ns.width or ns.depth or ns.head_hidden or ns.num_classes > MANY_CLASSES or users:
        try:
            with torch.device("meta"):
                count = sum(p.numel() for p in create_net(ns).parameters())
        except (ValueError, KeyError, TypeError) as e:
            if not users:  # the user's code may do what the meta device cannot: the CPU build below decides
                raise SpecError(f"net: {e}") from None
        except Exception:  # noqa: BLE001 - an op the meta device lacks: the CPU build below decides
            count = 0
    if count > MAX_PARAMETERS:
        raise SpecError(f"net: {ns.backbone} with these settings has {count:,} parameters; at most {MAX_PARAMETERS:,} "
                        "(net.width, net.depth, net.head_hidden size it)")
    try:
        net = create_net(ns)
    except (ValueError, KeyError, TypeError) as e:
        raise SpecError(f"net: {e}") from None
    return bool(getattr(net.backbone, "supports_gradient_equilibrium", True))


def _check_connectivity(ns: NetSpec) -> None:
    """Mode connectivity matches units by the net's permutation spec: a backbone without one is refused now."""
    from exitflow.stages.core.analysis.permutation import permutation_spec

    try:
        permutation_spec(create_net(ns))
    except ValueError as e:
        raise SpecError(f"analyses.connectivity: {e}") from None


def _refuse_gradient_equilibrium(ns: NetSpec, spec: StudySpec) -> None:
    """A backbone that exposes no hidden state between its blocks cannot rescale the gradients there."""
    for phase in ("P2", "P3"):
        if getattr(spec.phases, phase).loss_weighting == "gradient_equilibrium":
            raise SpecError(f"phases.{phase}.loss_weighting: gradient_equilibrium rescales gradients between blocks, "
                            f"which {ns.backbone} does not expose (it runs through forward_intermediates)")


def check_storage(path: str) -> None:
    """Fail with SpecError, creating nothing, when a local Ray storage folder cannot be made."""
    if "://" in path:
        return  # s3://, gs://...: checked by Ray when it writes
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise SpecError(f"tracking.storage_path: {p} is not a folder")
        return
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SpecError(f"tracking.storage_path: cannot create {p}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError(f"tracking.storage_path: cannot create {p}: {parent} is not writable")
