"""examples/paper/: every spec loads and builds its graph, uses the paper's hyper-parameters, the CPU
variants stay small, and README.md and each spec's Cost line say what estimate.py computes.

No Ray, no data: specs are loaded and their graphs built, and estimate.py counts FLOPs on nets built
in memory.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from exitflow.pipeline.dag import Graph
from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.spec import StudySpec, load_spec
from exitflow.pipeline.spec_sections import LR_PRESETS, Preset
from exitflow.pipeline.stage import PHASE, nodes_with_role

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "examples" / "paper"
README = PAPER / "README.md"
SPECS = sorted(PAPER.rglob("*.yaml"))
GPU_SPECS = [p for p in SPECS if p.parent == PAPER]
CPU_SPECS = [p for p in SPECS if p.parent == PAPER / "cpu"]

# App. D's grids: D.2 for ResNets, D.1 for ViTs (the presets must be exactly these).
PAPER_GRIDS = {
    "resnet": {8e-3, 2e-2, 5e-2, 8e-2, 2e-1},
    "vit": {1e-3, 1e-4, 1e-5, 4e-3, 8e-3, 5e-4, 8e-4, 4e-5, 8e-5},
}

# Per GPU spec, each phase it trains: the lr it must have (a preset name: searched over that grid;
# a number: fixed, as the paper states) and the optimizer and batch of its family (D.1, D.2, E.5).
RESNET = {"optimizer": "sgd", "batch_size": 125, "weight_decay": 0.0, "schedule": "none"}
VIT = {"optimizer": "adamw", "batch_size": 128, "weight_decay": 0.0}
EXPECTED: dict[str, dict[str, Any]] = {
    "fig01-fig06-regimes-vit-cifar100": {**VIT, "lr": {"P1": 5e-4, "P2": "vit", "P3": "vit"}},
    "fig03-fig05-rank-mi-resnet34-cifar100": {**RESNET, "lr": {"P1": 8e-2, "P2": "resnet"}},  # D.5's backbone lr
    "fig04-gradient-dominance-resnet50-tinyimagenet": {**RESNET, "lr": {"P1": "resnet", "P2": "resnet"}},
    "fig06-fig12-regimes-resnet34-cifar100": {**RESNET, "lr": {"P1": "resnet", "P2": "resnet", "P3": "resnet"}},
    "fig06-regimes-msdnet-cifar100": {**RESNET, "lr": {"P1": "resnet", "P2": "resnet", "P3": "resnet"}},  # D.2's conv-net recipe
    "fig07-regimes-vit-tiny-imagenet": {**VIT, "batch_size": 2048, "lr": {"P1": 5e-4, "P2": "vit", "P3": "vit"}},
    "fig10-gpf-vit-cifar100": {**VIT, "lr": {"P1": 5e-4, "P2": "vit", "P3": "vit"}},
    "fig11-pretrained-vit-base-cifar100": {**VIT, "lr": {"P1": 5e-4, "P2": "vit", "P3": "vit"}},
    "fig13-undertrained-backbone-vit-cifar10": {**VIT, "lr": {"P1": 5e-4, "P2": "vit"}},
    "fig14-16-loss-weighting-resnet50-tinyimagenet": {**RESNET, "lr": {"P1": "resnet", "P2": "resnet"}},
    "fig02-connectivity-resnet20-cifar10": {**RESNET, "lr": {"P1": "resnet", "P2": "resnet", "P3": "resnet"}},
    "fig17-landscape-resnet20-cifar10": {**RESNET, "lr": {"P1": "resnet", "P2": "resnet", "P3": "resnet"}},
    "fig21-fig23-fig26-gpf-vit-cifar10": {**VIT, "lr": {"P1": 5e-4, "P2": "vit", "P3": "vit"}},
    "fig22-regimes-vit-cifar10": {**VIT, "lr": {"P1": 5e-4, "P2": "vit", "P3": "vit"}},
    "tab01-ic-density-vit-tiny-imagenette": {**VIT, "lr": {"P1": 5e-4, "P2": "vit", "P3": "vit"}},
    "tab02-head-size-vit-tiny-imagenette": {**VIT, "lr": {"P1": 5e-4, "P2": "vit", "P3": "vit"}},
    "appC-pabee-vit-cifar10": {**VIT, "lr": {"P1": 5e-4, "P2": "vit", "P3": "vit"}},
    "appC-ztw-vit-cifar10": {**VIT, "lr": {"P1": 5e-4, "P2": "vit", "P3": "vit"}},
}

# Each GPU spec's net: the backbone and early-exit method the paper's figure uses (Sec. 4, App. C, D).
NETS: dict[str, tuple[str, str]] = {
    "fig06-regimes-msdnet-cifar100": ("msdnet_cifar", "sdn"),
    "fig10-gpf-vit-cifar100": ("vit_cifar", "gpf"),
    "fig21-fig23-fig26-gpf-vit-cifar10": ("vit_cifar", "gpf"),
    "appC-pabee-vit-cifar10": ("vit_cifar", "pabee"),
    "appC-ztw-vit-cifar10": ("vit_cifar", "ztw"),
}

# The paper's readout (Sec. 4, "Evaluation plots"): 100 evenly spaced confidence thresholds; its budget
# table (Table 1) at 25/50/75/100% of the backbone's FLOPs and Max.
PAPER_BUDGETS = [0.25, 0.5, 0.75, 1.0, "max"]

# Each CPU spec is the study of an existing example (so the two cannot drift apart), or None: the
# analyses' CPU spec is its own (no example outside examples/paper/ runs it).
CPU_TWINS: dict[str, str | None] = {
    "fig06-regimes-cifar10": "cifar10-quick.yaml",
    "fig14-16-loss-weighting-cifar10": "cifar10-loss-weighting.yaml",
    "fig02-fig03-fig04-fig05-fig17-analyses-cifar10": None,
}


def _import_estimate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("paper_estimate", PAPER / "estimate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their string annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def estimate() -> ModuleType:
    return _import_estimate()


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Path, tuple[StudySpec, Graph]]]:
    """Every spec and its graph; the timm weights a spec starts from sit in a temporary Hugging Face
    cache (a stand-in file: the graph keys its content; nothing loads it)."""
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hf")
    for path in SPECS:
        init = load_spec(path).net.init or ""
        if init.startswith("timm:"):
            snapshot = cache / f"models--timm--{init.removeprefix('timm:')}" / "snapshots" / ("0" * 40)
            snapshot.mkdir(parents=True)
            (snapshot / "model.safetensors").write_bytes(b"stand-in")
            (snapshot.parents[1] / "refs").mkdir()
            (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_CACHE", str(cache))
        yield {p: (spec := load_spec(p), build_graph(spec)) for p in SPECS}


@pytest.fixture(scope="module")
def estimates(estimate: ModuleType) -> dict[str, Any]:
    """Every spec's estimate, by path relative to the repository (FLOP counting is the slow part: once)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as estimate.py runs: one image per net, and more threads only contend
    try:
        return {e.spec: e for e in (estimate.estimate(p) for p in estimate.spec_paths())}
    finally:
        torch.set_num_threads(threads)


def _block(text: str, tag: str) -> str:
    m = re.search(rf"<!-- {re.escape(tag)}: begin -->\n(.*?)\n<!-- {re.escape(tag)}: end -->", text, re.S)
    assert m, f"README.md has no {tag} block"
    return m.group(1)


def test_the_folder_has_both_kinds() -> None:
    assert set(EXPECTED) == {p.stem for p in GPU_SPECS}, "every GPU spec needs its EXPECTED hyper-parameters"
    assert set(CPU_TWINS) == {p.stem for p in CPU_SPECS}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.relative_to(PAPER).as_posix())
def test_spec_builds_a_graph_on_the_checkouts_data(path: Path, studies: dict[Path, tuple[StudySpec, Graph]]) -> None:
    spec, graph = studies[path]
    assert nodes_with_role(graph, PHASE)
    graph.order()  # acyclic, every input produced
    # data.root resolves into the checkout's data/ folder: nothing outside the repository
    root = Path(spec.data.root or "")
    assert root.parent == REPO / "data", root
    assert spec.name.startswith("paper-")


def test_presets_are_the_papers_grids() -> None:
    for name, grid in PAPER_GRIDS.items():
        assert len(LR_PRESETS[name]) == len(grid) and set(LR_PRESETS[name]) == grid


@pytest.mark.parametrize("path", GPU_SPECS, ids=lambda p: p.stem)
def test_gpu_spec_uses_the_papers_hyper_parameters(path: Path, studies: dict[Path, tuple[StudySpec, Graph]]) -> None:
    spec, graph = studies[path]
    want = EXPECTED[path.stem]
    # four seeds, or one model per regime (analyses): from one seed, or each from its own (D.8)
    across = spec.analyses.connectivity.seeds
    assert spec.resources.use_gpu and (len(spec.seeds) in (1, 4) or across and set(across.values()) == set(spec.seeds))
    trained = {n.phase for n in nodes_with_role(graph, PHASE)}
    assert trained == set(want["lr"]), f"{path.name} trains {sorted(trained)}"
    for phase, lr in want["lr"].items():
        pc = getattr(spec.phases, phase)
        for field in ("optimizer", "batch_size", "weight_decay", "schedule"):
            if field in want:
                assert getattr(pc, field) == want[field], f"{phase}.{field}"
        if isinstance(lr, str):
            assert pc.lr == Preset(preset=lr), f"{phase} searches the {lr} grid"
        else:
            assert pc.lr == lr, f"{phase} trains at {lr}"
    # what the graph runs: each search is the whole grid, every fixed lr one training
    for node in nodes_with_role(graph, PHASE):
        lr = want["lr"][node.phase]
        if isinstance(lr, str):
            assert node.kind == "tune" and node.config.search.grid == LR_PRESETS[lr]
        else:
            assert node.kind == "train" and node.config.search is None
    assert spec.evaluation.thresholds == 100 and spec.evaluation.budget_rule == "costliest"


@pytest.mark.parametrize("path", CPU_SPECS, ids=lambda p: p.stem)
def test_cpu_spec_is_small(path: Path, studies: dict[Path, tuple[StudySpec, Graph]]) -> None:
    spec, graph = studies[path]
    across = spec.analyses.connectivity.seeds  # models from two seeds where connectivity asks for them
    assert not spec.resources.use_gpu and spec.seeds == ([0, 1] if across else [0])
    assert spec.data.train_subset is not None and spec.data.train_subset <= 5000
    assert spec.data.test_subset is not None and spec.data.test_subset <= 5000
    for node in nodes_with_role(graph, PHASE):
        assert node.kind == "train", f"{node.id} searches"
        assert node.config.train.max_epochs <= 8  # minutes per phase on one core at these sizes


@pytest.mark.parametrize("path", [p for p in CPU_SPECS if CPU_TWINS[p.stem]], ids=lambda p: p.stem)
def test_cpu_spec_is_its_examples_study(path: Path) -> None:
    twin = REPO / "examples" / str(CPU_TWINS[path.stem])
    assert load_spec(path).model_dump(exclude={"name"}) == load_spec(twin).model_dump(exclude={"name"})


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.relative_to(PAPER).as_posix())
def test_spec_uses_the_papers_thresholds(path: Path) -> None:
    # stated in the file, not left to exitflow's defaults
    stated = yaml.safe_load(path.read_text(encoding="utf-8"))["evaluation"]
    assert {"thresholds", "threshold_spacing", "budgets"} <= set(stated), f"{path.name}: evaluation states {sorted(stated)}"
    # and what the real spec loader makes of it
    evaluation = load_spec(path).evaluation
    assert evaluation.thresholds == 100
    assert evaluation.threshold_spacing == "uniform"
    assert evaluation.budgets == PAPER_BUDGETS


@pytest.mark.parametrize("stem", sorted(NETS))
def test_gpu_spec_uses_the_figures_net(stem: str) -> None:
    net = load_spec(PAPER / f"{stem}.yaml").net
    assert (net.backbone, net.method) == NETS[stem]


def test_shared_nodes_the_readme_names(studies: dict[Path, tuple[StudySpec, Graph]]) -> None:
    def graph(name: str) -> Graph:
        return studies[PAPER / name][1]

    fig04, fig14 = graph("fig04-gradient-dominance-resnet50-tinyimagenet.yaml"), graph("fig14-16-loss-weighting-resnet50-tinyimagenet.yaml")
    assert fig04.nodes["seed0/P1"].key == fig14.nodes["seed0/P1"].key
    fig13, fig22 = graph("fig13-undertrained-backbone-vit-cifar10.yaml"), graph("fig22-regimes-vit-cifar10.yaml")
    fig13_keys = {n.key for n in fig13.nodes.values()}
    for seed in (0, 1, 2, 3):
        for node in ("P1", "joint/P2", "mixed/P2"):
            assert fig22.nodes[f"seed{seed}/{node}"].key in fig13_keys
    vit = build_graph(load_spec(REPO / "examples" / "cifar10-vit.yaml"))
    assert {n.id: n.key for n in nodes_with_role(fig22, PHASE)} == {n.id: n.key for n in nodes_with_role(vit, PHASE)}
    regimes, weighting = graph("cpu/fig06-regimes-cifar10.yaml"), graph("cpu/fig14-16-loss-weighting-cifar10.yaml")
    assert regimes.nodes["seed0/P1"].key == weighting.nodes["seed0/P1"].key
    for regime in ("joint", "mixed"):
        assert regimes.nodes[f"seed0/{regime}/P2"].key == weighting.nodes[f"phases.P2.loss_weighting=uniform/seed0/{regime}/P2"].key


def test_readme_table_is_what_estimate_prints(estimate: ModuleType, estimates: dict[str, Any]) -> None:
    text = README.read_text(encoding="utf-8")
    expected = f"{estimate.table(list(estimates.values()))}\n\n{estimate.assumptions()}"
    assert _block(text, "estimate.py") == expected, "run examples/paper/estimate.py and paste its output"
    assert _block(text, "datasets") == estimate.datasets_table()


def test_readme_lists_every_spec_and_no_other() -> None:
    text = README.read_text(encoding="utf-8")
    listed = set(re.findall(r"examples/paper/[\w./-]+\.yaml", text))
    assert listed == {p.relative_to(REPO).as_posix() for p in SPECS}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.relative_to(PAPER).as_posix())
def test_spec_header_states_its_estimate(path: Path, estimates: dict[str, Any]) -> None:
    e = estimates[path.relative_to(REPO).as_posix()]
    header = path.read_text(encoding="utf-8")
    line = f"# Cost (examples/paper/estimate.py): phases: {e.phases}, trainings: {e.trainings}, upper bound: {e.hours_text}\n"
    assert line in header
    assert f"exitflow plan examples/paper/{path.relative_to(PAPER).as_posix()}" in header
    # every other spec or example a header names exists
    for name in re.findall(r"[\w./-]+\.yaml", header):
        candidates = [REPO / name, path.parent / name, PAPER / name, PAPER / "cpu" / name]
        assert any(c.is_file() for c in candidates), f"{path.name} names {name}"
