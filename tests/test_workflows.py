"""The GitHub workflows and the Cloud Build file: schema-valid and doing what they claim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"


def _check(schema: str, *files: Path) -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    proc = subprocess.run(
        [str(checker), "--builtin-schema", schema, *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def _steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def test_workflows_match_the_github_schema() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"tests.yml", "lint.yml", "images.yml"}
    _check("vendor.github-workflows", *files)


def test_cloudbuild_matches_its_schema() -> None:
    _check("vendor.cloudbuild", REPO / "docker" / "cloudbuild.yaml")


def test_tests_workflow_runs_the_readme_command_with_a_uv_cache() -> None:
    steps = _steps(_workflow("tests.yml"))
    setup = [s for s in steps if s.get("uses", "").startswith("astral-sh/setup-uv")]
    assert setup and all(s["with"]["enable-cache"] for s in setup)
    runs = [s.get("run", "") for s in steps]
    assert "uv sync --frozen" in runs
    assert "uv run pytest" in runs
    assert "uv run pytest -m slow" in runs
    assert "uv run pytest" in (REPO / "README.md").read_text()


def test_lint_workflow_runs_ruff() -> None:
    runs = " ".join(s.get("run", "") for s in _steps(_workflow("lint.yml")))
    assert "ruff check" in runs and "ruff format --check" in runs


@pytest.mark.parametrize("image", ["train", "serve"])
def test_images_workflow_builds_and_pushes_on_main(image: str) -> None:
    workflow = _workflow("images.yml")
    # PyYAML reads the bare key `on` as True.
    triggers = workflow.get("on", workflow.get(True))
    assert triggers["push"]["branches"] == ["main"]
    job = workflow["jobs"]["build"]
    assert image in job["strategy"]["matrix"]["image"]
    [build] = [s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action")]
    assert build["with"]["push"] is True
    assert build["with"]["file"] == "docker/${{ matrix.image }}.Dockerfile"
    assert (REPO / "docker" / f"{image}.Dockerfile").is_file()
