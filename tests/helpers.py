"""Small builders shared by the Ray-backed tests (tiny digits studies that train in seconds)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.spec import StudySpec, load_spec

TINY = [
    "net.width=8",
    "resources.num_workers=1",
    "resources.torch_threads=1",
    "evaluation.thresholds=20",
]


def tiny_spec(storage: str | Path, *sets: str, epochs: int = 2) -> StudySpec:
    """A digits study with every phase `epochs` long (patience never stops it first)."""
    phase = [f"phases.{p}.{k}={v}" for p in ("P1", "P2", "P3") for k, v in (("max_epochs", epochs), ("patience", epochs + 1))]
    return load_spec(None, [*TINY, *phase, f"tracking.storage_path={storage}", *sets])


def phase_job(max_epochs: int = 3, fault: str | None = None, phase: str = "P1", lr: float = 3e-3) -> Any:
    """A digits phase (resnet20, width 8) for the train and tune stages; patience never stops it first."""
    from stages.core.data import DataSpec, dataset_info
    from stages.core.faults import parse_plan
    from stages.core.loop import PhaseConfig
    from stages.core.nets import NetChoice
    from stages.train import PhaseJob

    data = DataSpec(name="digits")
    info = dataset_info(data)
    net = NetChoice(backbone="resnet20", exit_every=2, exit_start=2, width=8).sized(info.num_classes, info.in_chans, info.img_size)
    train = PhaseConfig(optimizer="adam", lr=lr, batch_size=64, max_epochs=max_epochs, patience=max_epochs + 1,
                        schedule="cosine", selection="final" if phase == "P1" else "mean")
    return PhaseJob(phase=phase, seed=0, data=data, net=net, train=train, fault_plan=parse_plan(fault or ""), label="test")


def runs(client: Any, experiment: str, **tags: str) -> list[Any]:
    """Runs of an experiment whose tags match (keys without the 'exitflow.' prefix)."""
    exp = client.get_experiment_by_name(experiment)
    clauses = [f"tags.`exitflow.{k}` = '{v}'" for k, v in tags.items()]
    return client.search_runs([exp.experiment_id], filter_string=" and ".join(clauses), max_results=1000)


@dataclass(frozen=True)
class Store:
    """The suite's tracking store: the HTTP URI every process logs to, and where artifacts lie on disk."""

    uri: str
    artifacts: Path

    def artifact_file(self, artifact_uri: str, path: str) -> Path:
        """The file behind `path` of a run whose artifact URI is `artifact_uri` (mlflow-artifacts:/...)."""
        return self.artifacts / artifact_uri.removeprefix("mlflow-artifacts:/") / path
