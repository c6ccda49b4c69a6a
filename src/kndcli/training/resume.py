"""Which checkpoint a run may resume from: only one its own config (and job) wrote.

A checkpoint directory can outlive a run: Vertex AI's AIP_CHECKPOINT_DIR is
`<base>/checkpoints` for every job sharing a base directory, and a local
`train.checkpoint_dir` can be reused by hand. Resuming another run's `last.ckpt` mixes
two configurations silently, or crashes on a state-dict mismatch. So each run records
its resolved config (and Vertex job id) beside its checkpoints, and a run that finds a
`last.ckpt` resumes only when the record matches.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

from kndcli.config import KndConfig
from kndcli.errors import ConfigError

RECORD = "run.json"
# What is trained: the data, the model and the training recipe. Where the checkpoints
# and bundle go may change between a run and its resumption without changing it, and
# other sections (serving, tracking, the job's cloud settings) never do.
_COMPARED = ("data.", "model.", "train.", "labels")
_IGNORED = ("train.model_dir", "train.checkpoint_dir")


def record_of(cfg: KndConfig) -> dict[str, Any]:
    """What a checkpoint directory records about the run writing it."""
    flat = _flatten(asdict(cfg))
    config = {
        k: v for k, v in flat.items() if k.startswith(_COMPARED) and not k.startswith(_IGNORED)
    }
    return {
        "run_name": cfg.train.run_name,
        "job": os.environ.get("CLOUD_ML_JOB_ID", ""),
        "config": config,
    }


def check_resume(ckpt_dir: str, record: dict[str, Any], has_last: bool, write: bool = True) -> None:
    """Refuse a `last.ckpt` written by another config or job, naming both runs and
    what differs; write this run's record (`write`: rank 0) when nothing is refused."""
    import fsspec

    path = f"{ckpt_dir.rstrip('/')}/{RECORD}"
    fs, _, [stripped] = fsspec.get_fs_token_paths(path)
    before = json.loads(fs.cat_file(stripped)) if fs.exists(stripped) else None
    if has_last and before is not None:
        # A key only one side has is a newer knd's addition, not a change of recipe.
        differ = sorted(
            key
            for key in set(before["config"]) & set(record["config"])
            if before["config"][key] != record["config"][key]
        )
        other_job = before.get("job") and record["job"] and before["job"] != record["job"]
        if differ or other_job:
            what = f"config differs in {', '.join(differ[:6])}" if differ else ""
            if other_job:
                what = (what + "; " if what else "") + f"job {before['job']} != {record['job']}"
            raise ConfigError(
                f"{ckpt_dir} holds the checkpoint of run {before['run_name']!r}, not of this "
                f"run {record['run_name']!r} ({what}): resuming would mix them; train into "
                "another train.checkpoint_dir (on Vertex AI, another base output directory)"
            )
    if write and before != record:
        fs.makedirs(os.path.dirname(stripped) or ".", exist_ok=True)
        with fs.open(stripped, "w") as handle:
            handle.write(json.dumps(record, indent=1, default=str))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat
