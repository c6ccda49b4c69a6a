"""`knd cloud`: Vertex AI training jobs and Cloud Run services.

Every flag that is configuration names its key (`--machine` sets `cloud.machine`), so a
flag, `--set cloud.machine=...`, `KND_PROJECT`/`KND_REGION` and the `cloud:` section of a
config file are one thing, resolved and checked by `opt.load`. The Google SDKs are
imported inside the command bodies only.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kndcli.cli import options as opt
from kndcli.errors import UsageError

if TYPE_CHECKING:
    from kndcli.config import KndConfig

app = typer.Typer(help="Train on Vertex AI, serve on Cloud Run.", no_args_is_help=True)


Project = Annotated[
    str | None,
    opt.keyed("cloud.project", "--project", help="Google Cloud project; KND_PROJECT also sets it."),
]
Region = Annotated[
    str | None, opt.keyed("cloud.region", "--region", help="Region; KND_REGION also sets it.")
]
ServiceAccount = Annotated[
    str | None,
    opt.keyed(
        "cloud.service_account", "--service-account", help="Service account e-mail to run as."
    ),
]
Machine = Annotated[
    str | None,
    opt.keyed("cloud.machine", "--machine", help="Machine type, e.g. n1-highcpu-32."),
]
Replicas = Annotated[
    int | None,
    opt.keyed("cloud.replicas", "--replicas", help="Nodes: one primary plus N-1 workers."),
]
Spot = Annotated[
    bool | None, opt.keyed("cloud.spot", "--spot/--no-spot", help="Run on Spot capacity.")
]
Timeout = Annotated[
    str | None,
    opt.keyed("cloud.timeout", "--timeout", help="Longest run, e.g. 24h, 90m or 2d."),
]
ServeImage = Annotated[
    str | None, opt.keyed("cloud.serve_image", "--serve-image", help="Serve image URI.")
]
DisplayName = Annotated[
    str | None, typer.Option("--display-name", help="Job name shown in the console.")
]
Wait = Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")]
Poll = Annotated[float, typer.Option("--poll", help="Seconds between polls.")]
Labels = Annotated[
    list[str] | None,
    typer.Option("--label", metavar="K=V", help="Resource label k=v (repeatable)."),
]
Env = Annotated[
    list[str] | None,
    typer.Option("--env", metavar="K=V", help="Container environment K=V (repeatable)."),
]
SecretEnv = Annotated[
    list[str] | None,
    typer.Option(
        "--secret-env",
        metavar="NAME=SECRET[:VERSION]",
        help="Environment variable read from Secret Manager inside the job, e.g. "
        "WANDB_API_KEY=wandb-key (repeatable); only the reference is in the job spec.",
    ),
]


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in summary.items():
        if value not in ("", None):
            table.add_row(f"[bold]{key}[/bold]", str(value))
    opt.console().print(table)


def _submit(opts: Any, *, dry_run: bool, wait: bool, poll: float, as_json: bool) -> None:
    """Print the CustomJob request (dry run) or create it, following it with `wait`."""
    from kndcli.cloud import jobs

    if dry_run:
        typer.echo(jobs.request_json(opts))
        return
    echo = (lambda _line: None) if as_json else typer.echo
    summary = jobs.submit_job(opts, wait=wait, poll_s=poll, echo=echo)
    if as_json or wait:
        _print_summary(summary, as_json)


def _dotlist_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def forwarded_overrides(ctx: typer.Context) -> list[str]:
    """The `key=value` overrides the remote `knd train` gets: the user's `--set`s, then the
    keyed flags given here that set keys outside `cloud:` (those configure the job itself)."""
    overrides = list(ctx.params.get("sets") or [])
    for param in ctx.command.params:
        key = opt.FLAG_KEYS.get(param.opts[0]) if param.opts else None
        value = ctx.params.get(param.name or "")
        if key and value is not None and not key.startswith("cloud."):
            overrides.append(f"{key}={_dotlist_value(value)}")
    return overrides


# What decides a replica's answers; the backend, batch size and workers are left to the
# serving image and the replica's own CPUs (the image has no torch backend).
_SCORING_KEYS = ("inference.window_s", "inference.hop_s", "inference.min_confidence")


def scoring_overrides(cfg: KndConfig) -> list[str]:
    """`key=value` for each key of `_SCORING_KEYS` and `audio.*` that the resolved
    configuration changes from the defaults, config files included: a job's replicas see
    neither this machine's files nor its environment, and would otherwise score with other
    windows, limits or `min_confidence` than `knd predict` here. The model travels as
    --model."""
    from dataclasses import asdict

    from kndcli.config import KndConfig

    ours, defaults = asdict(cfg), asdict(KndConfig())
    keys = [*_SCORING_KEYS, *(f"audio.{name}" for name in ours["audio"])]
    overrides = []
    for key in keys:
        section, name = key.split(".")
        value = ours[section][name]
        if value != defaults[section][name]:
            overrides.append(f"{key}={_dotlist_value(value)}")
    return overrides


@app.command("submit")
def submit(
    ctx: typer.Context,
    project: Project = None,
    region: Region = None,
    train_image: Annotated[
        str | None, opt.keyed("cloud.train_image", "--train-image", help="Training image URI.")
    ] = None,
    machine: Machine = None,
    accelerator: Annotated[
        str | None,
        opt.keyed("cloud.accelerator", "--accelerator", help="Accelerator type, e.g. NVIDIA_L4."),
    ] = None,
    accelerator_count: Annotated[
        int | None,
        opt.keyed("cloud.accelerator_count", "--accelerator-count", help="Accelerators per node."),
    ] = None,
    replicas: Replicas = None,
    spot: Spot = None,
    timeout: Timeout = None,
    service_account: ServiceAccount = None,
    base_output_dir: Annotated[
        str | None,
        opt.keyed(
            "cloud.base_output_dir",
            "--base-output-dir",
            help="gs:// root of the job's directory (<root>/<run>-<time>: model, checkpoints).",
        ),
    ] = None,
    bucket: Annotated[
        str | None,
        opt.keyed("cloud.bucket", "--bucket", help="Without --base-output-dir: gs://BUCKET/runs."),
    ] = None,
    label: Labels = None,
    env: Env = None,
    secret_env: SecretEnv = None,
    display_name: DisplayName = None,
    wait: Wait = False,
    poll: Poll = 30.0,
    dry_run: opt.DryRun = False,
    as_json: opt.Json = False,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Submit a Vertex AI CustomJob that runs `knd train` with these config files and --sets.

    Its container runs `knd train --config F ... --set k=v ...` (paths inside the image).
    """
    from kndcli.cloud import jobs, secrets

    cfg = opt.load(ctx)
    references = jobs.parse_pairs(secret_env, "--secret-env")
    if references:
        jobs.require_location(cfg.cloud)
    opts = jobs.JobOptions(
        cloud=cfg.cloud,
        display_name=display_name or jobs.default_display_name(cfg.train.run_name),
        labels=jobs.parse_pairs(label, "--label"),
        env=jobs.parse_pairs(env, "--env"),
        config_files=[str(path) for path in config or []],
        overrides=forwarded_overrides(ctx),
        run=jobs.submission_run_name(cfg.train.run_name),
        # A dry run reads nothing from Secret Manager: `latest` stays unpinned there.
        secret_env=secrets.job_secret_env(references, cfg.cloud.project, pin=not dry_run),
    )
    _submit(opts, dry_run=dry_run, wait=wait, poll=poll, as_json=as_json)
    if not (dry_run or as_json):
        home = jobs.job_home(cfg.cloud, opts.run)
        typer.echo(f"  model: {home}/model/  checkpoints: {home}/checkpoints/")


@app.command("predict")
def predict(
    ctx: typer.Context,
    sources: Annotated[
        list[str],
        typer.Argument(help="gs:// prefixes (or files) of the audio to score.", show_default=False),
    ],
    out: Annotated[
        str,
        opt.out_option("gs:// prefix for the result parts, error parts and done-markers."),
    ],
    project: Project = None,
    region: Region = None,
    serve_image: ServeImage = None,
    model: opt.Model = None,
    machine: Machine = None,
    replicas: Replicas = None,
    spot: Spot = None,
    timeout: Timeout = None,
    service_account: ServiceAccount = None,
    part_size: Annotated[
        int, typer.Option("--part-size", help="Files per part (the resume unit).")
    ] = 1000,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes", help="Scoring processes per replica (default: the machine's vCPUs)."
        ),
    ] = None,
    expect_files: Annotated[
        int | None,
        typer.Option("--expect-files", help="Print a time and cost estimate for this many clips."),
    ] = None,
    clip_seconds: Annotated[
        float, typer.Option("--clip-seconds", help="With --expect-files: mean clip length.")
    ] = 4.0,
    price_per_hour: Annotated[
        float | None,
        typer.Option(
            "--price-per-hour",
            help="With --expect-files: the machine's USD price per hour (region, Spot), "
            "for a cost in dollars.",
        ),
    ] = None,
    label: Labels = None,
    env: Env = None,
    display_name: DisplayName = None,
    local: Annotated[
        bool,
        typer.Option("--local", help="Run the job's command here, as one replica (a dry run)."),
    ] = False,
    wait: Wait = False,
    poll: Poll = 30.0,
    dry_run: opt.DryRun = False,
    as_json: opt.Json = False,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Score an archive in a bucket with a Vertex AI CustomJob of N replicas.

    Each replica runs `knd predict SOURCES --shard auto --out OUT`: a disjoint share of the
    files, written in resumable parts, so a rerun after preemption skips finished parts.
    The window, hop, min_confidence and audio keys of --config files and --set travel
    with it.
    """
    from kndcli.cloud import jobs

    cfg = opt.load(ctx)
    if processes is None:
        processes = 1 if local else jobs.machine_vcpus(cfg.cloud.machine)
    if expect_files is not None:
        if expect_files < 1 or clip_seconds <= 0:
            raise UsageError("--expect-files and --clip-seconds must be positive")
        replicas = 1 if local else cfg.cloud.replicas
        estimate = jobs.estimate_archive(
            expect_files, clip_seconds, processes, replicas, price_per_hour
        )
        typer.echo(estimate.describe(), err=True)
    if local:
        from kndcli.cli.predict import predict_to_store

        predict_to_store(cfg, sources, out, "0/1", part_size, as_json, processes=processes)
        return
    opts = jobs.predict_job_options(
        cfg.cloud,
        sources=sources,
        out=out,
        model=cfg.inference.model,
        part_size=part_size,
        processes=processes,
        display_name=display_name or "knd-predict",
        labels=jobs.parse_pairs(label, "--label"),
        env=jobs.parse_pairs(env, "--env"),
        overrides=[*scoring_overrides(cfg), *(sets or [])],
    )
    _submit(opts, dry_run=dry_run, wait=wait, poll=poll, as_json=as_json)


@app.command("deploy")
def deploy(
    ctx: typer.Context,
    project: Project = None,
    region: Region = None,
    service: Annotated[
        str | None, opt.keyed("cloud.service", "--service", help="Service name.")
    ] = None,
    serve_image: ServeImage = None,
    model: opt.Model = None,
    log_sink: Annotated[
        str | None,
        opt.keyed("serve.log_sink", "--log-sink", help="Prediction log, gs://bucket/prefix."),
    ] = None,
    token_secret: Annotated[
        str | None,
        typer.Option("--token-secret", help="Secret Manager secret[:version] holding the token."),
    ] = None,
    cpu: Annotated[str | None, opt.keyed("cloud.cpu", "--cpu", help="CPUs per instance.")] = None,
    memory: Annotated[
        str | None, opt.keyed("cloud.memory", "--memory", help="Memory per instance, e.g. 2Gi.")
    ] = None,
    min_instances: Annotated[
        int | None,
        opt.keyed("cloud.min_instances", "--min-instances", help="Instances kept warm."),
    ] = None,
    max_instances: Annotated[
        int | None,
        opt.keyed("cloud.max_instances", "--max-instances", help="Most instances."),
    ] = None,
    concurrency: Annotated[
        int | None,
        opt.keyed("cloud.concurrency", "--concurrency", help="Requests per instance."),
    ] = None,
    request_timeout: Annotated[
        int | None,
        opt.keyed(
            "cloud.request_timeout_s", "--request-timeout", help="Request timeout in seconds."
        ),
    ] = None,
    service_account: ServiceAccount = None,
    env: Env = None,
    label: Labels = None,
    insecure_no_token: Annotated[
        bool | None,
        opt.keyed(
            "serve.allow_no_token",
            "--insecure-no-token",
            help="Allow a public service without --token-secret.",
        ),
    ] = None,
    allow_unauthenticated: Annotated[
        bool | None,
        typer.Option(
            "--allow-unauthenticated/--no-allow-unauthenticated",
            help="Grant (or revoke) public access. Default: leave as is (new: private).",
        ),
    ] = None,
    ephemeral_log: Annotated[
        bool,
        typer.Option(
            "--ephemeral-log",
            help="Without --log-sink: keep the prediction log on the instance (lost on "
            "scale-down).",
        ),
    ] = False,
    dry_run: opt.DryRun = False,
    as_json: opt.Json = False,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Create or update the Cloud Run service that runs `knd serve`, and print its URL.

    The model must be a gs:// URI (mounted read-only) or an absolute path inside the image.
    """
    from kndcli.cloud import jobs, services

    cfg = opt.load(ctx)
    opts = services.service_options(
        cfg,
        token_secret=token_secret or "",
        env=jobs.parse_pairs(env, "--env"),
        labels=jobs.parse_pairs(label, "--label"),
        allow_unauthenticated=allow_unauthenticated,
        ephemeral_log=ephemeral_log,
    )
    if dry_run:
        typer.echo(services.request_json(opts))
        return
    # A new revision keeps the token version it started with, not whatever is latest when
    # an instance starts (a rotation would otherwise split instances between two tokens).
    opts.token_secret = services.pinned_token_secret(opts)
    echo = (lambda _line: None) if as_json else typer.echo
    summary = services.deploy_service(opts, echo=echo)
    if as_json:
        _print_summary(summary, as_json)


@app.command("invoke")
def invoke(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="Cloud Run service name (or full name).")],
    files: Annotated[list[str], typer.Argument(help="Audio files to score.", show_default=False)],
    project: Project = None,
    region: Region = None,
    url: Annotated[
        str | None, typer.Option("--url", help="The service URL (default: asked from Cloud Run).")
    ] = None,
    token_secret: Annotated[
        str | None,
        typer.Option(
            "--token-secret",
            help="Secret Manager secret[:version] with knd's API token (default: KND_API_TOKEN).",
        ),
    ] = None,
    public: Annotated[
        bool, typer.Option("--public", help="No ID token: the service allows unauthenticated.")
    ] = False,
    # Not --timeout: that flag sets cloud.timeout (a job's longest run) in every command.
    max_time: Annotated[
        float,
        typer.Option("--max-time", min=0.001, help="Seconds to wait for each file's answer."),
    ] = 60.0,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Score clips with a deployed service: a JSON line per file.

    Sends a Google ID token for the service (Cloud Run IAM) in X-Serverless-Authorization
    and knd's token in Authorization. Exit 1 when any file was not answered 200.
    """
    import os
    from pathlib import Path

    from kndcli.cloud import invoke as calls
    from kndcli.cloud import services

    cfg = opt.load(ctx)
    paths = [Path(f) for f in files]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"{missing[0]}: no such file")
    if url is None:
        name = services.resolve_service_name(service, cfg.cloud.project, cfg.cloud.region)
        url = services.service_status(name)["url"]
        if not url:
            raise UsageError(f"service {name} has no URL yet (is it deployed?)")
    knd_token = os.environ.get("KND_API_TOKEN") or None
    if token_secret:
        from kndcli.cloud.secrets import read_secret

        knd_token = read_secret(token_secret, cfg.cloud.project)
    headers = calls.invoke_headers(None if public else calls.identity_token(url), knd_token)
    failed = 0
    for path in paths:
        answer = calls.post_clip(url, path, headers, max_time)
        failed += answer["status"] != 200
        typer.echo(json.dumps(answer))
    if failed:
        typer.echo(f"{failed} of {len(paths)} files were not scored", err=True)
        raise typer.Exit(1)


@app.command("setup")
def setup(
    ctx: typer.Context,
    project: Project = None,
    region: Region = None,
    bucket: Annotated[
        str | None,
        opt.keyed("cloud.bucket", "--bucket", help="Bucket for data, runs, models and the log."),
    ] = None,
    repository: Annotated[
        str, typer.Option("--repository", help="Artifact Registry Docker repository.")
    ] = "knd",
    trainer_account: Annotated[
        str, typer.Option("--trainer-account", help="Service account id for training jobs.")
    ] = "knd-trainer",
    serve_account: Annotated[
        str, typer.Option("--serve-account", help="Service account id for the service.")
    ] = "knd-serve",
    token_secret: Annotated[
        str, typer.Option("--token-secret", help="Secret Manager secret for the API token.")
    ] = "knd-token",
    deployer: Annotated[
        str,
        typer.Option(
            "--deployer",
            metavar="MEMBER",
            help="user:EMAIL (or group:, serviceAccount:) that submits and deploys as the "
            "two accounts.",
        ),
    ] = "",
    apply: Annotated[
        bool, typer.Option("--apply", help="Make the changes (default: print them only).")
    ] = False,
    as_json: opt.Json = False,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Check (and with --apply create) what the cloud path needs in a project.

    Service accounts, Docker repository, bucket, token secret, least-privilege grants.

    Prints what exists, what would change and the same changes as gcloud commands.
    """
    from kndcli.cloud import setup as project_setup

    cfg = opt.load(ctx)
    opts = project_setup.setup_options(
        cfg,
        repository=repository,
        trainer=trainer_account,
        server=serve_account,
        token_secret=token_secret,
        deployer=deployer,
    )
    steps = project_setup.plan(opts)
    pending = [s for s in steps if s.changes]
    echo = (lambda _line: None) if as_json else typer.echo
    for step in steps:
        detail = f": {step.detail}" if step.detail else ""
        echo(f"{step.action:<8}{step.resource}{detail}")
    made = project_setup.apply(steps, echo=echo) if apply else 0
    if as_json:
        document = {
            "project": opts.project,
            "applied": apply,
            "changes": len(pending),
            "made": made,
            "steps": [s.as_dict() for s in steps],
            "next": project_setup.next_commands(opts),
        }
        typer.echo(json.dumps(document, indent=2))
        return
    skipped = [s for s in steps if s.action == "skip"]
    if pending and not apply:
        echo(f"\n{len(pending)} changes; nothing was changed. The same with gcloud:")
        for step in pending + skipped:
            echo(f"  {step.gcloud}")
        echo("Run again with --apply to make them.")
        return
    echo(f"\n{made} changes made." if apply else "\nNothing to change.")
    for step in skipped:
        echo(f"Still to do by hand: {step.gcloud}")
    echo("Next:")
    for line in project_setup.next_commands(opts):
        echo(f"  {line}")


@app.command("status")
def status(
    ctx: typer.Context,
    target: Annotated[
        str, typer.Argument(help="CustomJob resource name or job id, or a Cloud Run service.")
    ],
    project: Project = None,
    region: Region = None,
    as_json: opt.Json = False,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Show the state of a Vertex AI job or Cloud Run service: state, times, URL, revision."""
    from kndcli.cloud import jobs, services

    cfg = opt.load(ctx)
    project, region = cfg.cloud.project, cfg.cloud.region
    job_name = jobs.resolve_job_name(target, project, region)
    if job_name:
        summary = jobs.job_status(job_name, jobs.region_of(job_name, region))
    else:
        summary = services.service_status(services.resolve_service_name(target, project, region))
    _print_summary(summary, as_json)
