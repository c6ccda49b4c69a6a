"""Vertex AI's multi-node environment mapped to what Lightning's DDP reads."""

from __future__ import annotations

import json

import pytest

from kndcli.cloud.vertex_env import apply_lightning_env, lightning_env, num_nodes_from_env
from kndcli.errors import KndError


def test_single_node_needs_nothing() -> None:
    assert num_nodes_from_env({}) == 1
    assert lightning_env({}) == {}
    # A one-node Vertex job still sets the variables: nothing to map.
    one = {"MASTER_ADDR": "host", "MASTER_PORT": "2222", "WORLD_SIZE": "1", "RANK": "0"}
    assert num_nodes_from_env(one) == 1
    assert lightning_env(one) == {}


def test_vertex_variables_become_node_rank() -> None:
    environ = {
        "MASTER_ADDR": "cmle-training-workerpool0-abc-0",
        "MASTER_PORT": "2222",
        "WORLD_SIZE": "4",
        "RANK": "2",
    }
    assert num_nodes_from_env(environ) == 4
    assert lightning_env(environ) == {
        "MASTER_ADDR": "cmle-training-workerpool0-abc-0",
        "MASTER_PORT": "2222",
        "NODE_RANK": "2",
    }


def _cluster_spec(task_type: str, index: int) -> str:
    return json.dumps(
        {
            "cluster": {
                "workerpool0": ["primary-0:2222"],
                "workerpool1": ["worker-0:2222", "worker-1:2222"],
            },
            "task": {"type": task_type, "index": index},
            "environment": "cloud",
        }
    )


@pytest.mark.parametrize(
    ("task_type", "index", "node_rank"),
    [("workerpool0", 0, "0"), ("workerpool1", 0, "1"), ("workerpool1", 1, "2")],
)
def test_cluster_spec_alone_is_enough(task_type: str, index: int, node_rank: str) -> None:
    environ = {"CLUSTER_SPEC": _cluster_spec(task_type, index)}
    assert num_nodes_from_env(environ) == 3
    assert lightning_env(environ) == {
        "MASTER_ADDR": "primary-0",
        "MASTER_PORT": "2222",
        "NODE_RANK": node_rank,
    }


def test_apply_removes_node_level_world_size_and_rank() -> None:
    environ = {"MASTER_ADDR": "m", "MASTER_PORT": "1", "WORLD_SIZE": "2", "RANK": "1", "X": "y"}
    assert apply_lightning_env(environ) == 2
    assert environ == {"MASTER_ADDR": "m", "MASTER_PORT": "1", "NODE_RANK": "1", "X": "y"}


def test_bad_values_are_named() -> None:
    with pytest.raises(KndError, match="WORLD_SIZE='two'"):
        num_nodes_from_env({"MASTER_ADDR": "m", "WORLD_SIZE": "two"})
    with pytest.raises(KndError, match="CLUSTER_SPEC"):
        num_nodes_from_env({"CLUSTER_SPEC": "{not json"})
