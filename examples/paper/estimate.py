"""Upper bound on the training compute of the paper's specs, and the device-hours it means.

    .venv/bin/python examples/paper/estimate.py [SPEC...]   # default: every spec under examples/paper/

For each spec: load it, build its graph (exactly what `exitflow plan` runs) and sum over its phase
nodes (train and tune):

    trainings = 1 per train node, the trial count per tune node (grid length, or num_samples)
    FLOP      = sum over trainings of max_epochs x train images x 3 x forward FLOPs per image

The forward FLOPs are the project's own count (`stages.core.flops`: fvcore multiply-adds of the whole
multi-exit net, every IC included) times 2, since a device's FLOP/s count a multiply-add as two.
x 3: a forward and a backward pass (which costs about two forwards). Every training is charged its
max_epochs: early stopping ends most runs sooner, so this is an upper bound on the epochs. Not
counted: the per-epoch validation pass (a forward over the held-out share, val_fraction /
(3 x (1 - val_fraction)) on top of the count: 3.7% at 0.1), evaluation, the analyses, data loading.

Device-hours divide the FLOPs by an ASSUMED sustained throughput (below): a stated assumption, not a
measurement. Prints a markdown table; examples/paper/README.md holds this script's output.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAPER = Path(__file__).resolve().parent
REPO = PAPER.parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the project's packages are beside examples/
    sys.path.insert(0, str(REPO))

from exitflow.pipeline.graph import build_graph  # noqa: E402
from exitflow.pipeline.stage import PHASE, nodes_with_role  # noqa: E402
from exitflow.pipeline.spec import load_spec  # noqa: E402

# Assumed sustained training throughput of one A100/H100-class GPU in bf16 on these small-image nets:
# about 10% of an A100's 312 TFLOP/s dense bf16 peak (small feature maps, short token sequences and
# image decoding keep the tensor cores far from peak). An assumption, not a measurement.
ASSUMED_GPU_TFLOPS = 30.0
# Assumed sustained fp32 throughput of one CPU core (one intra-op thread, as the CPU specs run) on
# the narrow CPU-sized nets. An assumption, not a measurement.
ASSUMED_CPU_CORE_GFLOPS = 10.0


@dataclass(frozen=True)
class Dataset:
    train: int  # images of the train split (before the validation share is held out)
    test: int
    classes: int
    channels: int
    side: int  # square side the loaders produce (ImageNet-style images are cropped to 224)


# The data sets the specs use, by the name of their data folder (`data.root`'s last part, as
# `exitflow data SOURCE data/<name>` writes it) or by data.name for torchvision's CIFAR readers.
DATASETS = {
    "cifar10": Dataset(train=50_000, test=10_000, classes=10, channels=3, side=32),
    "cifar100": Dataset(train=50_000, test=10_000, classes=100, channels=3, side=32),
    "tinyimagenet": Dataset(train=100_000, test=10_000, classes=200, channels=3, side=64),
    "imagenette": Dataset(train=9_469, test=3_925, classes=10, channels=3, side=224),  # imagenette2(-320)
    "imagenet": Dataset(train=1_281_167, test=50_000, classes=1000, channels=3, side=224),
}


def dataset_of(data: Any) -> tuple[str, Dataset]:
    """The known data set a node's DataSpec reads, by data.name or its folder's name."""
    name = data.name if data.name in DATASETS else Path(data.root or "").name
    if name not in DATASETS:
        raise SystemExit(f"estimate.py: unknown data set {data.name!r} at {data.root!r}; the data folder must be "
                         f"named one of {sorted(DATASETS)} (or add its sizes to DATASETS)")
    return name, DATASETS[name]


def train_images(data: Any, ds: Dataset) -> int:
    """Images one epoch trains on: the (capped) pool less its validation share, as stages.core.data splits it."""
    pool = ds.train if data.train_subset is None else min(data.train_subset, ds.train)
    return pool - int(round(data.val_fraction * pool))


_FLOPS: dict[tuple[Any, str], int] = {}


def forward_flops(choice: Any, dataset: str, side: int | None = None) -> int:
    """FLOPs of one image's forward pass through the whole multi-exit net (every IC): 2 x multiply-adds,
    at the data set's side or at `side` (data.resize)."""
    key = (choice, dataset, side)
    if key not in _FLOPS:
        from exitflow.stages.core.flops import exit_flops
        from exitflow.stages.core.nets import create_net

        ds = DATASETS[dataset]
        net = create_net(choice.sized(ds.classes, ds.channels, side or ds.side))
        _FLOPS[key] = 2 * exit_flops(net)[-1]
    return _FLOPS[key]


@dataclass(frozen=True)
class Estimate:
    spec: str  # path relative to the repository
    label: str
    net: str
    compares: str
    gpu: bool
    phases: int
    trainings: int
    max_epochs: int
    flop: float

    @property
    def hours(self) -> float:
        per_s = ASSUMED_GPU_TFLOPS * 1e12 if self.gpu else ASSUMED_CPU_CORE_GFLOPS * 1e9
        return self.flop / per_s / 3600

    @property
    def hours_text(self) -> str:
        """`12.0 GPU-h`, `2,320 GPU-h`, `0.0380 CPU-core-h`: what the table and each spec's Cost line say."""
        return f"{_significant(self.hours)} {'GPU-h' if self.gpu else 'CPU-core-h'}"


def figure_label(path: Path) -> str:
    """`fig01-fig06-...` -> `Fig. 1, 6`; `fig14-16-...` -> `Fig. 14-16`; `tab01` -> `Table 1`; `appC` -> `App. C`."""
    figs, tabs, apps = [], [], []
    for part in re.findall(r"fig\d+(?:-\d+(?=-|$))?|tab\d+|app[A-Z]", path.stem):
        if part.startswith("fig"):
            figs.append("-".join(str(int(n)) for n in part[3:].split("-")))
        elif part.startswith("tab"):
            tabs.append(str(int(part[3:])))
        else:
            apps.append(part[3:])
    out = ([f"Fig. {', '.join(figs)}"] if figs else []) + ([f"Table {', '.join(tabs)}"] if tabs else []) \
        + ([f"App. {', '.join(apps)}"] if apps else [])
    label = "; ".join(out) or path.stem
    return f"{label} (CPU)" if path.parent.name == "cpu" else label


def describe(spec: Any) -> tuple[str, str]:
    """(net / data, what the study compares): the regimes, every comparison axis, the analyses, the criteria."""
    name, _ = dataset_of(spec.data)
    method = "" if spec.net.method == "sdn" else f" {spec.net.method}"
    net = f"{spec.net.backbone}{method} / {name}"
    parts = ["/".join(spec.regimes)]
    parts += [f"{axis}: {', '.join(_text(v) for v in values)}" for axis, values in spec.compare.items()]
    analyses = [a for a, cfg in spec.analyses if cfg.enabled]
    if analyses:
        parts.append("analyses: " + ", ".join(analyses))
    if spec.evaluation.criteria != ["max_softmax"]:  # the paper's criterion goes without saying
        parts.append("criteria: " + ", ".join(spec.evaluation.criteria))
    return net, "; ".join(parts)


def _text(value: Any) -> str:
    return "[" + ", ".join(_text(v) for v in value) + "]" if isinstance(value, list) else str(value)


def estimate(path: Path) -> Estimate:
    spec = load_spec(path)
    # Where the backbone starts changes no cost: estimate without net.init, so its weights (a file,
    # a run, a library's cache) need not be on this machine.
    graph = build_graph(spec.model_copy(update={"net": spec.net.model_copy(update={"init": None})}))
    phases = nodes_with_role(graph, PHASE)
    trainings, max_epochs, flop = 0, 0, 0.0
    for node in phases:
        cfg = node.config
        name, ds = dataset_of(cfg.data)
        trials = cfg.search.trials if cfg.search is not None else 1
        trainings += trials
        max_epochs = max(max_epochs, cfg.train.max_epochs)
        flop += trials * cfg.train.max_epochs * train_images(cfg.data, ds) * 3 * forward_flops(cfg.net, name, cfg.data.resize)
    net, compares = describe(spec)
    rel = path.resolve().relative_to(REPO).as_posix()
    return Estimate(rel, figure_label(path), net, compares, spec.resources.use_gpu, len(phases), trainings, max_epochs, flop)


def _significant(x: float, digits: int = 3) -> str:
    """`x` to `digits` significant digits, in plain notation: 1,300 / 33.4 / 0.00137."""
    if x == 0:
        return "0"
    places = digits - 1 - math.floor(math.log10(abs(x)))  # negative: round to tens, hundreds...
    return f"{round(x, places):,.{max(0, places)}f}"


def table(estimates: list[Estimate]) -> str:
    """The markdown table README.md holds."""
    lines = ["| Figure | Net / data | Compares | Command | Phases | Trainings | Max epochs | Training PFLOP (bound) | Device-hours (bound) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for e in estimates:
        lines.append(f"| {e.label} | {e.net} | {e.compares} | `exitflow run {e.spec}` | {e.phases} | {e.trainings} | "
                     f"{e.max_epochs} | {_significant(e.flop / 1e15)} | {e.hours_text} |")
    return "\n".join(lines)


def assumptions() -> str:
    """The line under the table: the throughputs its device-hours assume."""
    return (f"Device-hours at an assumed sustained {ASSUMED_GPU_TFLOPS:g} TFLOP/s per GPU and "
            f"{ASSUMED_CPU_CORE_GFLOPS:g} GFLOP/s per CPU core (assumptions, not measurements); "
            f"every training charged its max_epochs (an upper bound).")


def datasets_table() -> str:
    """The data set sizes the estimate uses, as README.md lists them."""
    lines = ["| Data set | Train | Test | Classes | Input side (px) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {d.train:,} | {d.test:,} | {d.classes} | {d.side} |" for name, d in DATASETS.items()]
    return "\n".join(lines)


def report(paths: list[Path]) -> str:
    """What the script prints: the table and the assumptions under it."""
    return f"{table([estimate(p) for p in paths])}\n\n{assumptions()}"


def spec_paths() -> list[Path]:
    """Every spec under examples/paper/: the GPU ones, then cpu/; figures, then tables, then appendices."""
    order = {"fig": 0, "tab": 1, "app": 2}
    return sorted(PAPER.rglob("*.yaml"), key=lambda p: (p.parent != PAPER, order.get(p.stem[:3], 3), p.stem))


def main(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)  # one image per net: one thread is plenty
    print(report([Path(a) for a in argv] or spec_paths()))


if __name__ == "__main__":
    main(sys.argv[1:])
