"""The cluster files (cluster/) as a user meets them: every manifest parses; every Ray, Python and
MLflow version they pin agrees with pyproject.toml and with each other; Ray's token is set up on every
node and client and is never written into a file; and every command the cluster README tells a user
to type parses: the shell's syntax (`bash -n`), exitflow's and Ray's own command lines (their
parsers, options included), the files they name, and the specs exitflow commands load with their
`--set`s."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
README = (CLUSTER / "README.md").read_text()
MANIFESTS = sorted(CLUSTER.rglob("*.yaml"))
LAUNCHER = [CLUSTER / "ray-cluster.yaml", CLUSTER / "ray-cluster-gcp.yaml"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Where the README's commands run: the repository root (its launcher section says so); the sanity
# check's `~/exitflow` is the checkout.
CHECKOUT_PREFIX = "~/exitflow/"


def _requirement(name: str) -> Requirement:
    [req] = [Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == name]
    return req


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def _inline_commands() -> list[str]:
    """Commands quoted inline in the README's prose (a span may wrap over lines)."""
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    spans = (" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose))
    # A command to type names a folder of the checkout (cluster/, examples/, data/); `ray start
    # --address` or `exitflow run ... --tracking-uri ...` is prose naming a command.
    return [s for s in spans if re.match(r"(exitflow|ray|kubectl|docker) ", s) and "..." not in s
            and re.search(r"(^| )(cluster|examples|data)/", s)]


def _simple_commands(script: str) -> list[list[str]]:
    """A script's simple commands as argv lists: one per line (continuations joined), split at `&&`,
    `||`, `;`, `|` and `&`; comments and redirections dropped."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True  # words end at blanks and those operators only (URLs keep their ':')
        current: list[str] = []
        skip_next = False
        for token in lexer:
            if token in (";", "&&", "||", "|", "&"):
                commands.append(current)
                current = []
            elif token in (">", ">>", "<", "2>", "&>"):
                skip_next = True
            elif skip_next:
                skip_next = False
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def _readme_commands() -> list[list[str]]:
    out = [c for block in _bash_blocks() for c in _simple_commands(block)]
    out += [c for line in _inline_commands() for c in _simple_commands(line)]
    nested = [c for argv in out if argv[:2] == ["ray", "exec"] and len(argv) > 3 for c in _simple_commands(argv[3])]
    return out + nested


def _parse(group: click.Group, argv: list[str]) -> tuple[click.Command, click.Context]:
    """Parse argv (after the program's name) with a click group's own parser: unknown commands,
    unknown options and missing arguments raise click.UsageError."""
    name, *rest = argv
    parent = click.Context(group, info_name=group.name)
    command = group.get_command(parent, name)
    if command is None:
        raise click.UsageError(f"no such command: {name}")
    return command, command.make_context(name, rest, parent=parent)


def _exitflow() -> click.Group:
    import typer

    from exitflow.pipeline.cli import app

    return typer.main.get_command(app)


def _ray() -> click.Group:
    from ray.scripts.scripts import cli

    return cli


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# ----------------------------------------------------------------------------- the files


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_manifest_parses(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents)
    for d in documents:
        if "kind" in d:  # a Kubernetes object
            assert d.get("apiVersion") and d.get("metadata", {}).get("name"), d


def test_every_pinned_ray_is_one_version_that_pyproject_allows() -> None:
    texts = {p.name: p.read_text() for p in [*MANIFESTS, CLUSTER / "Dockerfile"]}
    pins = {(name, v) for name, t in texts.items() for v in re.findall(r"ray(?:\[[\w,]+\])?==([\w.]+)", t)}
    images = {(name, v) for name, t in texts.items() for v in re.findall(r"rayproject/ray:([\d.]+)-py\d+", t)}
    rays = {(name, v) for name, t in texts.items() for v in re.findall(r'rayVersion:\s*"([\d.]+)"', t)}
    assert {n for n, _ in pins} >= {"Dockerfile", "ray-cluster.yaml", "ray-cluster-gcp.yaml"}
    assert {n for n, _ in images} >= {"Dockerfile", "ray-cluster.yaml", "ray-cluster-gcp.yaml"}
    assert {n for n, _ in rays} == {"raycluster.yaml"}
    [version] = {v for _, v in pins | images | rays}
    assert _requirement("ray").specifier.contains(Version(version)), (version, str(_requirement("ray")))
    assert f"Ray {version}" in README and f"rayproject/ray:{version}" in README


def test_the_images_python_is_one_pyproject_allows() -> None:
    tags = set(re.findall(r"rayproject/ray:[\d.]+-py(\d)(\d+)", "".join(p.read_text() for p in [*MANIFESTS, CLUSTER / "Dockerfile"])))
    [(major, minor)] = tags
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(Version(f"{major}.{minor}"))


def test_the_mlflow_server_image_is_a_version_pyproject_allows() -> None:
    [tag] = re.findall(r"ghcr\.io/mlflow/mlflow:v([\d.]+)", (CLUSTER / "kuberay" / "mlflow.yaml").read_text())
    assert _requirement("mlflow").specifier.contains(Version(tag)), tag


# ----------------------------------------------------------------------------- Ray's token


def _pod_containers() -> list[tuple[str, dict[str, Any]]]:
    """Every Ray container of the KubeRay manifests (head, each worker group, the job submitter)."""
    cluster = next(d for d in yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text()) if d["kind"] == "RayCluster")
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    templates = [("head", cluster["spec"]["headGroupSpec"]["template"])]
    templates += [(g["groupName"], g["template"]) for g in cluster["spec"]["workerGroupSpecs"]]
    templates += [("submitter", job["spec"]["submitterPodTemplate"])]
    return [(name, c) for name, t in templates for c in t["spec"]["containers"]]


def test_every_kuberay_pod_authenticates_with_the_token_from_a_secret() -> None:
    containers = _pod_containers()
    assert len(containers) >= 3
    for name, container in containers:
        env = _env(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token and token["valueFrom"]["secretKeyRef"] == {"name": "exitflow-ray-token", "key": "token"}, name
    assert "kubectl create secret generic exitflow-ray-token" in README


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_every_launched_node_starts_ray_with_the_token(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"  # from the user's machine
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        before = command.split("ray start")[0]
        assert re.search(r"export RAY_AUTH_MODE=token\b", before), command
    for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        script = "\n".join(config.get(key) or [])
        assert subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True).returncode == 0, (key, script)


def test_no_token_is_a_file_of_the_repository() -> None:
    assert not [p for p in CLUSTER.rglob("*") if p.name == "auth_token"]
    for path in MANIFESTS:  # a token is 64 hex digits (Ray's generator): none is written down
        assert not re.search(r"\b[0-9a-f]{64}\b", path.read_text()), path


# ----------------------------------------------------------------------------- the README's commands


def test_the_readme_has_the_commands_this_file_checks() -> None:
    commands = _readme_commands()
    programs = {c[0] for c in commands}
    assert {"exitflow", "ray", "kubectl", "docker"} <= programs
    assert sum(c[:2] == ["exitflow", "submit"] for c in commands) >= 2  # launcher and KubeRay


@pytest.mark.parametrize("index", range(len(_bash_blocks())))
def test_every_shell_block_is_valid_bash(index: int) -> None:
    block = _bash_blocks()[index]
    done = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
    assert done.returncode == 0, (block, done.stderr)


def test_every_exitflow_command_parses_and_its_spec_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from exitflow.pipeline.spec import load_spec

    monkeypatch.chdir(ROOT)
    group = _exitflow()
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    checked = 0
    for argv in [*_readme_commands(), *_simple_commands(job["spec"]["entrypoint"])]:  # the RayJob's, too
        if argv[0] != "exitflow":
            continue
        argv = [a.replace(CHECKOUT_PREFIX, "") for a in argv]
        _, ctx = _parse(group, argv[1:])
        spec = ctx.params.get("spec")
        if spec is not None:
            load_spec(spec, ctx.params.get("set_") or [])  # raises SpecError naming the field
        checked += 1
    assert checked >= 5


def test_every_ray_command_parses_and_names_a_file_of_the_repository() -> None:
    group = _ray()
    checked = 0
    for argv in _readme_commands():
        if argv[0] != "ray":
            continue
        _, ctx = _parse(group, argv[1:])
        config = ctx.params.get("cluster_config_file")
        if config is not None:
            assert (ROOT / config).is_file(), argv
        checked += 1
    assert checked >= 5


def test_every_file_kubectl_and_docker_are_given_exists() -> None:
    named = []
    for argv in _readme_commands():
        if argv[0] in ("kubectl", "docker"):
            named += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-f"]
    assert named and all((ROOT / f).is_file() for f in named), named
