"""Choosing the workers' engine (``serve --engine``) and refusing mixed fleets (deploy/worker_actors.py,
deploy/serve.py), without Ray or vLLM."""

from __future__ import annotations

import argparse

import pytest

from cache_service.records import WorkerInfo
from deploy.serve import add_arguments, config_from_args
from deploy.worker_actors import WorkerActors, fleet_mismatch
from workers.ray_worker import WorkerConfig


def info(model_id: str = "tiny@00", block_size: int = 32) -> WorkerInfo:
    return WorkerInfo("worker-1", "node", model_id, "cpu", block_size, 64, "")


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_worker_of_the_fleets_model_and_block_size_joins():
    assert fleet_mismatch(info(), ("tiny@00", 32)) is None


@pytest.mark.parametrize("worker, fleet", [(info("other@11", 32), ("tiny@00", 32)), (info("tiny@00", 16), ("tiny@00", 32))])
def test_a_mixed_fleet_is_refused_naming_both_sides(worker, fleet):
    why = fleet_mismatch(worker, fleet)
    assert why == (f"refused: it serves model {worker.model_id!r} with block size {worker.block_size}, but the fleet "
                   f"(and its router) serves {fleet[0]!r} with block size {fleet[1]}; a mixed fleet cannot share "
                   f"one index")


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="engine must be one of native, vllm"):
        WorkerActors(WorkerConfig(worker_id=""), cpus_per_worker=1, max_restarts=0, start_timeout_s=1, engine="sglang")


def test_serve_engine_flags():
    native = config_from_args(args())
    assert (native.engine, native.dtype, native.block_size) == ("native", None, None)  # the stack picks 16
    vllm = config_from_args(args("--engine", "vllm", "--model", "/models/llama", "--dtype", "float32",
                                 "--num-blocks", "128", "--block-size", "64"))
    assert (vllm.engine, vllm.model, vllm.dtype, vllm.num_blocks, vllm.block_size) == (
        "vllm", "/models/llama", "float32", 128, 64)
    with pytest.raises(ValueError, match="--engine vllm serves a checkpoint folder"):
        config_from_args(args("--engine", "vllm"))
    with pytest.raises(SystemExit):
        args("--engine", "sglang")
