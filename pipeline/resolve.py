"""Spec sections -> the core's frozen configs (DataSpec, NetSpec, loop.PhaseConfig).

Also the up-front checks: a bad dataset or a net that cannot be built fails here, before
Ray starts or anything is written to the tracking store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stages.core.data import DataSpec, DatasetInfo, check_dataset
from stages.core.loop import PhaseConfig as LoopPhaseConfig
from stages.core.nets import NetSpec, create_net

from pipeline.spec import SpecError, StudySpec



def data_spec(data: dict[str, Any]) -> DataSpec:
    return DataSpec.from_dict(data)


def net_spec(net: dict[str, Any], info: DatasetInfo) -> NetSpec:
    d = dict(net)
    exits = d.pop("exits")
    return NetSpec(
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        img_size=info.img_size,
        exits=tuple(exits) if exits is not None else None,
        **d,
    )


def loop_config(train: dict[str, Any], phase: str, selection: str, lr: float | None = None) -> LoopPhaseConfig:
    """The loop's PhaseConfig for one phase; `lr` picks one value of a searched grid."""
    d = {k: v for k, v in train.items() if k != "lr"}
    value = lr if lr is not None else train["lr"]
    if not isinstance(value, (int, float)):
        value = 1e-3  # a placeholder the search replaces per trial (PhaseJob.with_lr)
    # The loop's own selection, for runs without Ray; on Ray the train stage scores every epoch
    # with stages.train.selection_score (which also knows "auc"). P1 watches its final exit.
    return LoopPhaseConfig(lr=float(value), selection="final" if phase == "P1" or selection == "final" else "mean", **d)


def preflight(spec: StudySpec) -> tuple[DatasetInfo, NetSpec]:
    """Check the data and build the net once on CPU; raise SpecError naming the field."""
    try:
        info = check_dataset(data_spec(spec.data.model_dump(mode="json")))
    except (ValueError, OSError) as e:  # OSError: an unreadable file or folder
        raise SpecError(f"data: {e}") from None
    try:
        ns = net_spec(spec.net.model_dump(mode="json"), info)
        create_net(ns)
    except (ValueError, KeyError) as e:
        raise SpecError(f"net: {e}") from None
    for phase in ("P1", "P2", "P3"):
        try:
            loop_config(getattr(spec.phases, phase).model_dump(mode="json"), phase, spec.search.selection)
        except ValueError as e:
            raise SpecError(f"phases.{phase}: {e}") from None
    return info, ns


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
