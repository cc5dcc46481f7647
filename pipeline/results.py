"""A study's results from Python, as pandas DataFrames, from its pipeline run id.

    from exitflow.pipeline.results import open_study

    with open_study("PIPELINE_RUN_ID") as study:      # the default store; or tracking_uri="http://..."
        study.budgets()     # criterion, regime, budget, accuracy_mean, accuracy_std, n_seeds
        study.costs()       # regime, seed, node, phase, epochs, train_seconds, wall_seconds, device_hours, ...
        study.curves()      # node, phase, regime, seed, criterion, threshold, flops, accuracy
        study.exits()       # node, phase, regime, seed, exit, flops, accuracy
        study.histories()   # node, phase, regime, seed, epoch, train_loss, val_acc_*, ...
        net = study.model("seed0/mixed/P2")   # a phase's trained MultiExitNet, in eval mode

Every table is read through the artifact store, so its recorded sha256 and declared schema are
checked. A pipeline run lists the run of every node it used, cached ones included
(`nodes.json`), so a study that reused everything reads the same as the run that trained it. The
default local store (sqlite) is served on loopback while the block runs, as `exitflow run` does.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from exitflow.pipeline import tracking, tracking_server
from exitflow.pipeline.artifacts import ArtifactStore
from exitflow.pipeline.stage import PHASE, REPORT, role_of, stages

NODES_FILE = "nodes.json"  # on the pipeline run: node id -> run id, kind, regime, seed, phase, cached


@dataclass
class StudyResults:
    """A finished pipeline run's nodes and their tables (see the module docstring)."""

    run_id: str
    nodes: dict[str, dict[str, Any]]
    store: ArtifactStore

    def budgets(self) -> pd.DataFrame:
        return self._table("budgets")

    def costs(self) -> pd.DataFrame:
        return self._table("costs")

    def curves(self) -> pd.DataFrame:
        return self._table("curve")

    def exits(self) -> pd.DataFrame:
        return self._table("exits")

    def histories(self) -> pd.DataFrame:
        return self._table("history")

    def model(self, node: str) -> Any:
        """The trained multi-exit net of a phase node ("seed0/P1", "seed0/mixed/P2", ...), in eval
        mode on the CPU, from its verified checkpoint: ready for `stages.core.inference`."""
        from exitflow.stages.core.nets import NetSpec, create_net  # torch only when a model is asked for

        phases = sorted(k for k, v in self.nodes.items() if role_of(v["kind"]) == PHASE)
        if node not in phases:
            raise ValueError(f"pipeline run {self.run_id} has no phase node {node!r}; its phases: {phases}")
        state, spec = self.store.load_checkpoint(self.nodes[node]["run_id"])
        net = create_net(NetSpec.from_dict(spec["net"]))
        net.load_state_dict(state)
        return net.eval()

    def _table(self, table: str) -> pd.DataFrame:
        """Table kind `table` of every node whose kind writes it, one row set per node (the report's:
        the study's own), each labelled with its node."""
        kinds = [s.kind for s in stages() if table in s.table_kinds()]  # its writers, as the registry declares them
        frames = []
        for node_id, node in self.nodes.items():
            if node["kind"] not in kinds:
                continue
            df = self.store.load_table(node["run_id"], table).to_pandas()
            if role_of(node["kind"]) != REPORT:  # one row set per node: say whose it is
                labels = {"node": node_id, "phase": node.get("phase"), "regime": node.get("regime"), "seed": node.get("seed"),
                          "variant": node.get("variant") or None}  # the comparison axes' values, when the study has axes
                for i, (name, value) in enumerate((k, v) for k, v in labels.items() if v is not None):
                    df.insert(i, name, value)
            frames.append(df)
        if not frames:
            raise ValueError(f"pipeline run {self.run_id} has no {'/'.join(kinds)} node")
        return pd.concat(frames, ignore_index=True)

def node_record(node: Any, result: Any) -> dict[str, Any]:
    """One entry of a pipeline run's nodes.json."""
    return {"run_id": result.run_id, "kind": node.kind, "phase": node.phase, "regime": node.regime, "seed": node.seed,
            "variant": node.variant, "cached": result.cached}


@contextmanager
def open_study(run_id: str, tracking_uri: str | None = None) -> Iterator[StudyResults]:
    """The results of pipeline run `run_id` (printed by `exitflow run`), while the block runs."""
    uri = tracking.resolve_uri(tracking_uri, None)
    with tracking_server.serve_store(uri, create=False) as http:  # reading never makes a store
        c = tracking.client(http)
        run = c.get_run(run_id)
        if run.data.tags.get("exitflow.stage") != "pipeline":
            raise ValueError(f"run {run_id} is not a pipeline run (the id `exitflow run` prints last)")
        if run.info.status != "FINISHED":
            raise ValueError(f"pipeline run {run_id} is {run.info.status}, not FINISHED: run the study again to complete it")
        store = ArtifactStore(c)
        with tempfile.TemporaryDirectory() as d:
            try:
                local = store.load_file(run_id, NODES_FILE, Path(d))
            except Exception as e:  # noqa: BLE001 - missing on runs made before nodes.json existed
                raise ValueError(f"pipeline run {run_id} lists no nodes ({NODES_FILE}: {e}); "
                                 "run the study again (all cached, seconds) to record them") from None
            nodes = json.loads(Path(local).read_text())
        yield StudyResults(run_id, nodes, store)
