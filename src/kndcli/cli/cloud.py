"""`knd cloud`: Vertex AI training jobs and Cloud Run services."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from kndcli.cli.common import ConfigOpt, JsonOpt, OverridesArg, SetOpt, build_config

app = typer.Typer(help="Train on Vertex AI, serve on Cloud Run.", no_args_is_help=True)

ProjectOpt = Annotated[
    str | None, typer.Option("--project", help="Google Cloud project (or KND_PROJECT).")
]
RegionOpt = Annotated[str | None, typer.Option("--region", help="Region (or KND_REGION).")]
LabelOpt = Annotated[
    list[str] | None, typer.Option("--label", help="Resource label k=v (repeatable).")
]
EnvOpt = Annotated[
    list[str] | None, typer.Option("--env", help="Container environment K=V (repeatable).")
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the exact request JSON; call nothing.")
]
ServiceAccountOpt = Annotated[
    str | None, typer.Option("--service-account", help="Service account e-mail to run as.")
]


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.table import Table

    from kndcli.cli.common import console

    table = Table(show_header=False, box=None)
    for key, value in summary.items():
        if value not in ("", None):
            table.add_row(f"[bold]{key}[/bold]", str(value))
    console().print(table)


@app.command("submit")
def submit(
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
    project: ProjectOpt = None,
    region: RegionOpt = None,
    image: Annotated[str | None, typer.Option("--image", help="Training image URI.")] = None,
    machine: Annotated[
        str | None, typer.Option("--machine", help="Machine type, e.g. n1-highcpu-32.")
    ] = None,
    accelerator: Annotated[
        str | None, typer.Option("--accelerator", help="Accelerator type, e.g. NVIDIA_L4.")
    ] = None,
    accelerator_count: Annotated[
        int | None, typer.Option("--accelerator-count", help="Accelerators per node.")
    ] = None,
    replicas: Annotated[
        int | None, typer.Option("--replicas", help="Nodes: one primary plus N-1 workers.")
    ] = None,
    spot: Annotated[
        bool | None, typer.Option("--spot/--no-spot", help="Run on Spot capacity.")
    ] = None,
    timeout: Annotated[
        str | None, typer.Option("--timeout", help="Longest run, e.g. 24h or 90m.")
    ] = None,
    service_account: ServiceAccountOpt = None,
    base_output_dir: Annotated[
        str | None,
        typer.Option("--base-output-dir", help="gs:// root for AIP_MODEL_DIR and checkpoints."),
    ] = None,
    label: LabelOpt = None,
    env: EnvOpt = None,
    display_name: Annotated[
        str | None, typer.Option("--display-name", help="Job name shown in the console.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
    poll: Annotated[float, typer.Option("--poll", help="Seconds between polls.")] = 30.0,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Submit a Vertex AI CustomJob that runs `knd train` with this config and overrides."""
    from kndcli.cloud import jobs

    cfg = build_config(config, overrides)
    opts = jobs.job_options(
        cfg.cloud,
        display_name=display_name or jobs.default_display_name(cfg.train.run_name),
        config_files=[str(path) for path in config or []],
        overrides=list(overrides or []),
        project=project,
        region=region,
        image=image,
        machine=machine,
        accelerator=accelerator,
        accelerator_count=accelerator_count,
        replicas=replicas,
        spot=spot,
        timeout=timeout,
        service_account=service_account,
        base_output_dir=base_output_dir,
        labels=jobs.parse_pairs(label, "--label"),
        env=jobs.parse_pairs(env, "--env"),
    )
    if dry_run:
        typer.echo(jobs.request_json(opts))
        return
    echo = (lambda _line: None) if as_json else typer.echo
    summary = jobs.submit_job(opts, wait=wait, poll_s=poll, echo=echo)
    if as_json or wait:
        _print_summary(summary, as_json)


@app.command("deploy")
def deploy(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    project: ProjectOpt = None,
    region: RegionOpt = None,
    service: Annotated[str | None, typer.Option("--service", help="Service name.")] = None,
    image: Annotated[str | None, typer.Option("--image", help="Serve image URI.")] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Bundle: gs://bucket/path (mounted) or a path in the image."),
    ] = None,
    log_sink: Annotated[
        str | None,
        typer.Option(
            "--log-sink", help="Prediction log, gs://bucket/path (default serve.log_sink)."
        ),
    ] = None,
    token_secret: Annotated[
        str | None,
        typer.Option("--token-secret", help="Secret Manager secret[:version] holding the token."),
    ] = None,
    cpu: Annotated[str | None, typer.Option("--cpu", help="CPUs per instance.")] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="Memory, e.g. 2Gi.")] = None,
    min_instances: Annotated[int | None, typer.Option("--min-instances")] = None,
    max_instances: Annotated[int | None, typer.Option("--max-instances")] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", help="Requests per instance.")
    ] = None,
    timeout: Annotated[
        int | None, typer.Option("--timeout", help="Request timeout in seconds.")
    ] = None,
    service_account: ServiceAccountOpt = None,
    env: EnvOpt = None,
    label: LabelOpt = None,
    allow_unauthenticated: Annotated[
        bool | None,
        typer.Option(
            "--allow-unauthenticated/--no-allow-unauthenticated",
            help="Grant (or revoke) public access. Default: leave as is (new: private).",
        ),
    ] = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Create or update the Cloud Run service that runs `knd serve`, and print its URL."""
    from kndcli.cloud import jobs, services

    cfg = build_config(config, overrides)
    opts = services.service_options(
        cfg.cloud,
        log_sink_default=cfg.serve.log_sink,
        project=project,
        region=region,
        service=service,
        image=image,
        model=model,
        log_sink=log_sink,
        token_secret=token_secret,
        cpu=cpu,
        memory=memory,
        min_instances=min_instances,
        max_instances=max_instances,
        concurrency=concurrency,
        request_timeout_s=timeout,
        service_account=service_account,
        env=jobs.parse_pairs(env, "--env"),
        labels=jobs.parse_pairs(label, "--label"),
        allow_unauthenticated=allow_unauthenticated,
    )
    if dry_run:
        typer.echo(services.request_json(opts))
        return
    echo = (lambda _line: None) if as_json else typer.echo
    summary = services.deploy_service(opts, echo=echo)
    if as_json:
        _print_summary(summary, as_json)


@app.command("status")
def status(
    target: Annotated[
        str, typer.Argument(help="CustomJob resource name or job id, or a Cloud Run service.")
    ],
    config: ConfigOpt = None,
    project: ProjectOpt = None,
    region: RegionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the state of a Vertex AI job or Cloud Run service: state, times, URL, revision."""
    from kndcli.cloud import jobs, services

    cfg = build_config(config, [])
    project = jobs.pick(project, "KND_PROJECT", cfg.cloud.project)
    region = jobs.pick(region, "KND_REGION", cfg.cloud.region)
    job_name = jobs.resolve_job_name(target, project, region)
    if job_name:
        summary = jobs.job_status(job_name, jobs.region_of(job_name, region))
    else:
        summary = services.service_status(services.resolve_service_name(target, project, region))
    _print_summary(summary, as_json)
