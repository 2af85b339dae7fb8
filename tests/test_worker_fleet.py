"""Choosing the workers' engine (``serve --engine``), refusing mixed fleets (deploy/worker_actors.py,
deploy/serve.py), and Pin on workers that cannot hold pins (router/pins.py); without Ray or vLLM."""

from __future__ import annotations

import argparse

import grpc
import pytest

from cache_service.records import UnsupportedFeatureError, WorkerInfo, WorkerLoad
from deploy.serve import add_arguments, config_from_args
from deploy.worker_actors import WorkerActors, fleet_mismatch
from router.pins import PinManager, PinNotFoundError, PinUnsupportedError
from router.servicer import _status_of
from tests.fake_workers import BS, async_test, make_stack, prompt
from workers.ray_worker import WorkerConfig
from workers.vllm_worker import PINS_UNSUPPORTED


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
    with pytest.raises(ValueError, match="tiers of the native engine's block pool; vLLM workers"):
        config_from_args(args("--engine", "vllm", "--model", "/models/llama", "--host-cache-gb", "1"))
    with pytest.raises(SystemExit):
        args("--engine", "sglang")


@async_test
async def test_pin_on_workers_that_cannot_hold_pins_is_failed_precondition_and_leaves_nothing():
    # As vLLM workers answer (workers/vllm_worker.py): the error crosses the worker client as it is.
    s = make_stack(2)
    for fake in s.workers.values():
        fake.load = WorkerLoad(capacity_blocks=100, num_free_blocks=100)
        fake.pin_error = UnsupportedFeatureError(PINS_UNSUPPORTED)
    await s.registry.poll_all()
    pins = PinManager(s.routing.encoder, s.registry, None)
    with pytest.raises(PinUnsupportedError) as err:
        await pins.pin("", prompt(2 * BS), replicas=2, ttl_seconds=0, cache_salt="")
    assert str(err.value) == f"Pin is not available on worker-0, worker-1: {PINS_UNSUPPORTED}"
    assert [w.pins for w in s.registry.snapshot()] == [frozenset(), frozenset()]
    with pytest.raises(PinNotFoundError):  # nothing was recorded
        await pins.unpin("", prompt(2 * BS), cache_salt="")
    assert _status_of(err.value) == (grpc.StatusCode.FAILED_PRECONDITION, str(err.value))
