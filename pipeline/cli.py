"""The `exitflow` command: plan, run, submit, report, ui.

Bad input (a spec, a data set, a tracking store) exits with status 2 and a message naming
the field and the reason, before Ray starts and before anything is written.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from exitflow.pipeline.spec import SpecError, StudySpec, load_spec
from exitflow.stages.core.allowed import PREPARE_FORMATS
from exitflow.stages.core.log_lines import first_line

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and study early-exit networks: joint, disjoint and mixed regimes on Ray, tracked in MLflow.")

SpecArg = Annotated[Path, typer.Argument(help="Study spec (YAML). Every field has a default.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a field: key.path=value (YAML value), e.g. seeds=[0,1].")]
UriOpt = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")]
AddressOpt = Annotated[Optional[str], typer.Option("--address", help="Ray cluster to join (default: $RAY_ADDRESS or a local Ray).")]


def _fail(msg: str, code: int = 2) -> typer.Exit:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _load(spec: Path, sets: list[str] | None) -> StudySpec:
    try:
        return load_spec(spec, sets or [])
    except SpecError as e:
        raise _fail(f"exitflow: {e}") from None


def _check(study: StudySpec, tracking_uri: str | None, data: bool) -> None:
    """Up-front checks that write nothing: the tracking store, Ray storage and (if `data`) data + net."""
    from exitflow.pipeline.resolve import check_storage, preflight
    from exitflow.pipeline.runner import storage_path
    from exitflow.pipeline.tracking import TrackingError, check_store, resolve_uri

    try:
        check_store(resolve_uri(tracking_uri, study.tracking.uri))
        check_storage(storage_path(study, tracking_uri))
        if data:
            preflight(study)
    except (SpecError, TrackingError) as e:
        raise _fail(f"exitflow: {e}") from None


@app.command()
def plan(spec: SpecArg, set_: SetOpt = None, tracking_uri: UriOpt = None) -> None:
    """Print the DAG: stages, edges and which ones are already cached. Runs nothing."""
    from exitflow.pipeline.runner import plan as make_plan
    from exitflow.pipeline.tracking import TrackingError

    study = _load(spec, set_)
    _check(study, tracking_uri, data=True)  # plan fails on whatever would stop `run`
    try:
        graph, planned = make_plan(study, tracking_uri)
    except ValueError as e:  # a SpecError too: net.init's run, read from the store
        raise _fail(f"exitflow: {e}") from None
    except TrackingError as e:
        raise _fail(_store_error(e)) from None
    cached = sum(p.cached_run is not None for p in planned)
    typer.echo(f"study {study.name}: {len(planned)} nodes, {cached} cached, {len(planned) - cached} to run")
    for line in _data_lines(graph):
        typer.echo(line)
    for p in planned:
        n = p.node
        state = f"cached ({p.cached_run})" if p.cached_run else "to run"
        inputs = f" <- {', '.join(n.inputs)}" if n.inputs else ""
        typer.echo(f"  {n.id:<22} {n.kind:<8} key={n.key}  {state}{inputs}")
    typer.echo("edges:")
    for src, dst in graph.edges():
        typer.echo(f"  {src} -> {dst}")


def _store_error(e: Exception, command: str = "exitflow") -> str:
    """One line for a tracking store that cannot be used (its messages that name the store keep their own words)."""
    text = str(e)
    return f"{command}: {text}" if text.startswith(("tracking store", "tracking server")) else f"{command}: tracking store: {text}"


def _data_lines(graph: Any) -> list[str]:
    """`data: ...` for each data set the study's nodes read: its digest (what their keys hold) and what
    computing it cost in the pre-flight (identified once per process: this reads it back)."""
    from exitflow.pipeline.resolve import data_identity
    from exitflow.stages.core.data import DataError

    read = {(d.name, d.root): d for n in graph.nodes.values() if (d := getattr(n.config, "data", None)) is not None}
    lines = []
    for data in read.values():
        try:
            lines.append(f"data: {data_identity(data).describe()}")
        except (DataError, OSError) as e:  # a comparison's other data set, unreadable here
            lines.append(f"data: {data.name} {data.root}: not identified ({e})")
    return lines


@app.command()
def run(
    spec: SpecArg,
    set_: SetOpt = None,
    tracking_uri: UriOpt = None,
    address: AddressOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Also print Ray's own output of every process (kept in Ray's session logs otherwise).")] = False,
    plain: Annotated[bool, typer.Option("--plain", help="Plain progress lines, even on a terminal (they are plain whenever stderr is not one).")] = False,
) -> None:
    """Run the study (or reuse what is cached) and print the budget table."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        from exitflow.pipeline.loopback import use_loopback

        use_loopback()  # a local Ray listens on 127.0.0.1 only
    from exitflow.pipeline.display import choose_display
    from exitflow.pipeline.ray_session import ClusterError
    from exitflow.pipeline.runner import StudyFailed, run_study
    from exitflow.pipeline.tracking import TrackingError

    study = _load(spec, set_)
    _check(study, tracking_uri, data=False)  # run_study checks data and net itself, before Ray
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        display = choose_display(lambda m: typer.echo(m, err=True), plain=plain)
        result = run_study(study, tracking_uri, address, ray_logs=verbose, display=display)
    except (SpecError, ClusterError) as e:
        raise _fail(f"exitflow: {e}") from None
    except TrackingError as e:
        raise _fail(_store_error(e)) from None
    except StudyFailed as e:
        raise _fail(f"exitflow: {e}\nfinished stages are cached: run the same command again to resume.", 1) from None
    typer.echo(result.table)
    for node, run_id in result.analyses.items():
        typer.echo(f"analysis {node}: run {run_id}")
    typer.echo(
        f"pipeline run {result.parent_run_id}: {len(result.results)} nodes, {len(result.cache_hits)} cached, "
        f"{len(result.trained)} phases trained, {result.seconds:.1f}s\n"
        f"results: exitflow report {result.parent_run_id}   (or: exitflow ui)"
    )


JobAddressOpt = Annotated[str, typer.Option("--address", envvar="RAY_API_SERVER_ADDRESS",
                                            help="Ray dashboard address of the cluster, e.g. http://HEAD:8265.")]
JobArg = Annotated[str, typer.Argument(help="The job id `exitflow submit` printed.")]


def _jobs(address: str, command: str) -> Any:
    """A job client for the cluster at `address`, or exit 2 naming why it cannot be used: unreachable,
    refusing this client's token, or running another Ray than this machine's."""
    import ray
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except AuthenticationError as e:  # 401 (no token sent) or 403 (another token)
        raise _fail(f"exitflow {command}: the Ray cluster at {address} refused this client: {first_line(e)}; export "
                    "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token> (cluster/README.md, Security)") from None
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError here
        raise _fail(f"exitflow {command}: cannot reach the Ray dashboard at {address}: {first_line(e)}") from None
    # The client's own connection check read the cluster's version (Ray keeps it on the client).
    theirs = getattr(client, "_server_ray_version", None)
    if theirs and theirs != ray.__version__:
        raise _fail(f"exitflow {command}: the cluster at {address} runs Ray {theirs}, this machine Ray {ray.__version__}: "
                    f"install ray=={theirs} here (a job's client and the cluster's job server must match)")
    return client


def _job_call(command: str, job_id: str, call: Any) -> Any:
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - an unknown job id, a dashboard gone away...
        raise _fail(f"exitflow {command} {job_id}: {first_line(e)}") from None


def _follow(client: Any, job_id: str) -> None:
    """Stream the job's logs until it ends; exit with its outcome: 0 SUCCEEDED; 2 when its `exitflow run`
    rejected its input (a spec, the data, a tracking server the cluster cannot reach: the reason is
    in the logs above); 1 otherwise."""
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            typer.echo(lines, nl=False)

    asyncio.run(tail())
    info = client.get_job_info(job_id)
    typer.echo(f"job {job_id}: {info.status}" + (f" ({info.message})" if info.message else ""), err=True)
    if str(info.status) == "SUCCEEDED":
        raise typer.Exit(0)
    raise typer.Exit(2 if getattr(info, "driver_exit_code", None) == 2 else 1)


def _check_uploaded(study: StudySpec) -> None:
    """A backbone module of the user's (`net.backbone: module:builder`) reaches the cluster with the working
    directory, which the job's `exitflow run` ships to every worker: one outside it, and not installed,
    would not import there. Exit 2 naming it, before anything is submitted."""
    from exitflow.pipeline.spec import variants
    from exitflow.pipeline.user_code import shipped_paths

    here = Path.cwd().resolve()
    for _, variant in variants(study):
        try:
            outside = [p for p in shipped_paths([variant.net.backbone]) if not Path(p).is_relative_to(here)]
        except ValueError as e:
            raise _fail(f"exitflow submit: net: {e}") from None
        if outside:
            raise _fail(f"exitflow submit: net.backbone {variant.net.backbone}: {outside[0]} lies outside the working "
                        "directory, which is what the cluster gets: put it beside the spec (or install it on every node)")


@app.command()
def submit(
    spec: SpecArg,
    address: JobAddressOpt,
    set_: SetOpt = None,
    tracking_uri: UriOpt = None,
    wait: Annotated[bool, typer.Option(help="Follow the job's logs until it ends; exit with its outcome.")] = False,
) -> None:
    """Submit `exitflow run` as a Ray job to a cluster (the working directory is uploaded)."""
    study = _load(spec, set_)  # validate locally first: a typo costs nothing
    uri = tracking_uri or study.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        raise _fail("exitflow submit: a cluster needs a tracking server every node reaches: pass --tracking-uri http://... (or set tracking.uri)")
    rel = spec.resolve().relative_to(Path.cwd().resolve()) if spec.resolve().is_relative_to(Path.cwd().resolve()) else None
    if rel is None:
        raise _fail(f"exitflow submit: {spec} must lie under the working directory, which is uploaded to the cluster")
    _check_uploaded(study)
    args = ["exitflow", "run", str(rel), "--tracking-uri", uri] + [a for s in (set_ or []) for a in ("--set", s)]
    from exitflow.pipeline.job_submit import submit_job

    client = _jobs(address, "submit")
    job_id = _job_call("submit", str(rel), lambda: submit_job(
        client, on_wait=lambda why: typer.echo(f"exitflow submit: {why}", err=True),
        entrypoint=shlex.join(args),
        runtime_env={"working_dir": ".", "excludes": [".venv", "mlartifacts", "mlflow.db", ".exitflow", ".git"]},
        metadata={"exitflow.study": study.name},
    ))
    typer.echo(f"submitted {job_id} to {address}\nfollow: exitflow logs {job_id} --follow --address {address}")
    if wait:
        _follow(client, job_id)


@app.command()
def status(job_id: JobArg, address: JobAddressOpt) -> None:
    """A submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and why."""
    client = _jobs(address, "status")
    info = _job_call("status", job_id, lambda: client.get_job_info(job_id))
    typer.echo(f"job {job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))


@app.command()
def logs(job_id: JobArg, address: JobAddressOpt,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends; exit with its outcome.")] = False) -> None:
    """A submitted job's output: exitflow's progress lines and the budget table."""
    client = _jobs(address, "logs")
    if follow:
        _job_call("logs", job_id, lambda: client.get_job_info(job_id))  # an unknown id: exit 2, not a stream error
        _follow(client, job_id)
    typer.echo(_job_call("logs", job_id, lambda: client.get_job_logs(job_id)), nl=False)


@app.command()
def stop(job_id: JobArg, address: JobAddressOpt) -> None:
    """Stop a submitted job (its finished stages stay cached: submit again to resume)."""
    client = _jobs(address, "stop")
    stopped = _job_call("stop", job_id, lambda: client.stop_job(job_id))
    typer.echo(f"job {job_id}: {'stopping' if stopped else 'not running (already finished)'}")


@app.command()
def report(run_id: Annotated[str, typer.Argument(help="A pipeline run id (printed by exitflow run) or a report run id.")],
           tracking_uri: UriOpt = None) -> None:
    """Print a study's budget table and where its plots are."""
    from exitflow.pipeline.runner import study_report
    from exitflow.pipeline.tracking import TrackingError

    try:
        table, where = study_report(run_id, tracking_uri)
    except TrackingError as e:  # no store there (a report never makes one), or it cannot be served
        raise _fail(_store_error(e, "exitflow report")) from None
    except Exception as e:  # noqa: BLE001 - an unknown run id is the usual cause
        raise _fail(f"exitflow report: {type(e).__name__}: {e}") from None
    typer.echo(table)
    typer.echo(f"report run {where['report_run']} (experiment {where['experiment_id']})")
    typer.echo(f"plots: {', '.join(where['artifact_uri'].rstrip('/') + '/' + p for p in where['plots'])}")
    for node, plots in where["analyses"].items():
        typer.echo(f"analysis {node}: {', '.join(plots)}")


@app.command()
def ui(tracking_uri: UriOpt = None, port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000) -> None:
    """Open the MLflow UI on the same tracking store, with a link to each study's runs."""
    from exitflow.pipeline.tracking import CLIENT_ENV, DEFAULT_ARTIFACTS, resolve_uri
    from exitflow.pipeline.tracking_server import runs_links

    uri = resolve_uri(tracking_uri, None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--port", str(port), "--host", "127.0.0.1"]
    if uri.startswith("sqlite:///"):
        cmd += ["--artifacts-destination", str(Path(uri[len("sqlite:///"):]).parent / DEFAULT_ARTIFACTS)]
    elif uri.startswith("http"):
        raise _fail(f"exitflow ui: {uri} is already a tracking server: open it in a browser")
    url = f"http://127.0.0.1:{port}"
    typer.echo(f"MLflow UI on {url} for {uri} (Ctrl-C stops it)")
    sys.stdout.flush()
    env = {**os.environ, **CLIENT_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # as `exitflow run` serves it
    proc = subprocess.Popen(cmd, env=env)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())  # stopped by a supervisor: stop the server too
    try:
        links = runs_links(url, proc)
        if links:
            typer.echo("each study's runs (MLflow opens in its GenAI mode otherwise):")
            for name, link in links:
                typer.echo(f"  {name}: {link}")
        sys.stdout.flush()
        raise typer.Exit(proc.wait())
    except KeyboardInterrupt:  # Ctrl-C reached the server too (one foreground group): let it finish
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise typer.Exit(130) from None


@app.command()
def data(
    source: Annotated[Path, typer.Argument(help="The dataset in its own layout: a folder of class folders, train/ + val/, a torchvision download folder...")],
    out: Annotated[Path, typer.Argument(help="Where train.parquet and test.parquet go: a study's data.root.")],
    format_: Annotated[Optional[str], typer.Option("--format", help=f"Layout of SOURCE: {' | '.join(PREPARE_FORMATS)}; detected when omitted.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the Parquet files OUT already has.")] = False,
    test_fraction: Annotated[Optional[float], typer.Option("--test-fraction", help="Image folders without a test split (SOURCE/<class>/*, or train/ alone): each class's share that goes to test.parquet, stratified (default 0.2).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Image folders without a test split: the seed of which images go to test (default 0); recorded in OUT/dataset.json.")] = None,
    test_folder: Annotated[Optional[str], typer.Option("--test-folder", help="Image folders with train/: the folder beside it that becomes test.parquet (default: val/, else test/).")] = None,
) -> None:
    """Prepare a dataset as exitflow's Parquet layout (a study reads it with data.name: parquet, data.root: OUT).

    An image folder is SOURCE/<class>/* (split here: --test-fraction, --seed) or SOURCE/train/<class>/* with SOURCE/val/<class>/* (or test/); CIFAR-10/100, SVHN, Tiny ImageNet and ImageNet are read in their own layouts. A folder it does not know is answered with the layouts it does, drawn as trees (exit 2).
    """
    from functools import partial

    from tqdm import tqdm

    from exitflow.stages.core.data import DataError
    from exitflow.stages.core.data.prepare import FolderOptions, prepare, summary_lines

    options = FolderOptions(test_fraction=test_fraction, seed=seed, test_folder=test_folder)
    try:
        done = prepare(source, out, format_, force, bar=partial(tqdm, file=sys.stderr, disable=None, leave=False),
                       options=options)
    except DataError as e:
        raise _fail(f"exitflow data: {e}") from None
    for line in summary_lines(done):
        typer.echo(line)


@app.command()
def register(
    run_id: Annotated[str, typer.Argument(help="A pipeline run id (printed by exitflow run).")],
    node: Annotated[str, typer.Argument(help="The node whose model to register: an evaluation node (seed0/joint/evaluate) or the phase it evaluated (seed0/joint/P2).")],
    name: Annotated[str, typer.Option("--name", help="The registered model's name (a new version if it exists).")],
    budget: Annotated[Optional[str], typer.Option("--budget", help="The version's default exit rule: a fraction of the backbone's FLOPs (0.5) or max; default: the model's own.")] = None,
    criterion: Annotated[Optional[str], typer.Option("--criterion", help="The exit criterion the budget is read for (default: the model's, the study's first).")] = None,
    tracking_uri: UriOpt = None,
) -> None:
    """Put a study's early-exit model in the MLflow Model Registry, loading at a FLOPs budget."""
    from exitflow.pipeline.register import RegisterError, register as register_model
    from exitflow.pipeline.tracking import TrackingError
    from exitflow.stages.core.exit_policy import parse_budget

    try:
        chosen = parse_budget(budget) if budget is not None else None
        done = register_model(run_id, node, name, chosen, criterion, tracking_uri)
    except TrackingError as e:  # no store there (registering never makes one), or it cannot be served
        raise _fail(_store_error(e, "exitflow register")) from None
    except (RegisterError, ValueError) as e:  # a bad budget, node or name: nothing was written
        raise _fail(f"exitflow register: {e}") from None
    except Exception as e:  # noqa: BLE001 - an unknown run id is the usual cause
        raise _fail(f"exitflow register: {type(e).__name__}: {e}") from None
    typer.echo(f"registered {done.name} version {done.version}: {done.node} ({done.model_id})")
    typer.echo(done.description)
    typer.echo(f'load it with mlflow.pyfunc.load_model("models:/{done.name}/{done.version}"); serve it with '
               f"mlflow models serve -m models:/{done.name}/{done.version} --env-manager local")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
