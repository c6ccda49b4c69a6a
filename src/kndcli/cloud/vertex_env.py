"""Translate Vertex AI's multi-node environment into the one Lightning's DDP reads.

Vertex AI starts one container per node and sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE (the
number of nodes) and RANK (this node's index), plus CLUSTER_SPEC. Lightning instead reads
NODE_RANK and needs `num_nodes`, and it counts WORLD_SIZE and RANK in processes, not nodes,
so Vertex's values must not leak through under those names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from kndcli.errors import KndError

# Vertex's node-level meanings of these clash with Lightning's process-level ones.
_NODE_LEVEL_VARS = ("WORLD_SIZE", "RANK")


def _cluster_spec(environ: Mapping[str, str]) -> dict[str, Any] | None:
    raw = environ.get("CLUSTER_SPEC")
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise KndError(f"CLUSTER_SPEC is not valid JSON: {exc.msg}") from None
    return spec if isinstance(spec, dict) else None


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise KndError(f"environment variable {name}={value!r} is not an integer") from None


def num_nodes_from_env(environ: Mapping[str, str]) -> int:
    """How many nodes (Vertex replicas) the job runs on; 1 outside a multi-node Vertex job."""
    if "MASTER_ADDR" in environ and "WORLD_SIZE" in environ:
        return max(1, _int_var(environ, "WORLD_SIZE"))
    spec = _cluster_spec(environ)
    if spec:
        cluster = spec.get("cluster") or {}
        nodes = sum(len(cluster.get(pool) or []) for pool in ("workerpool0", "workerpool1"))
        return max(1, nodes)
    return 1


def lightning_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set so Lightning's DDP joins the other nodes; {} on a single node.

    Uses MASTER_ADDR/MASTER_PORT/RANK when Vertex sets them, else derives them from
    CLUSTER_SPEC (pool 0 holds the primary; pool 1 the workers, numbered after it).
    """
    if num_nodes_from_env(environ) <= 1:
        return {}
    if "MASTER_ADDR" in environ and "RANK" in environ:
        result = {
            "MASTER_ADDR": environ["MASTER_ADDR"],
            "NODE_RANK": str(_int_var(environ, "RANK")),
        }
        if environ.get("MASTER_PORT"):
            result["MASTER_PORT"] = environ["MASTER_PORT"]
        return result
    spec = _cluster_spec(environ) or {}
    cluster = spec.get("cluster") or {}
    primary = (cluster.get("workerpool0") or [""])[0]
    if not primary:
        raise KndError("CLUSTER_SPEC names no workerpool0 primary: cannot find the DDP master")
    host, _, port = primary.rpartition(":")
    task = spec.get("task") or {}
    index = int(task.get("index", 0))
    node_rank = 0 if task.get("type", "workerpool0") == "workerpool0" else 1 + index
    result = {"MASTER_ADDR": host or primary, "NODE_RANK": str(node_rank)}
    if port.isdigit():
        result["MASTER_PORT"] = port
    return result


def apply_lightning_env(environ: MutableMapping[str, str] | None = None) -> int:
    """Rewrite the process environment for Lightning and return `num_nodes` for the Trainer."""
    env = os.environ if environ is None else environ
    nodes = num_nodes_from_env(env)
    update = lightning_env(env)
    if update:
        for name in _NODE_LEVEL_VARS:
            env.pop(name, None)
        env.update(update)
    return nodes
