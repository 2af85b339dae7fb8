"""`prefixcache serve`: start the whole stack and serve until Ctrl-C / SIGTERM.

    prefixcache serve --model demo --workers 2
    ready router=127.0.0.1:50051 metrics=http://127.0.0.1:9400/metrics cache_service=127.0.0.1:52052 ...
          http=http://127.0.0.1:8000/v1

Embedded Valkey unless ``--redis-url``; a local Ray unless ``--ray-address``; then the cache service,
N workers (``worker-0`` .. ``worker-<N-1>``, spread over the cluster's machines; one per GPU when
there are GPUs) and the router (gRPC on ``--port``, the OpenAI-compatible HTTP API on ``--http-port``).
With ``--ray-address`` (or ``--elastic``) machines that join later get workers (``worker-<N>``,
``worker-<N+1>``, ...) that enter the rotation; ``--no-elastic`` keeps the start-up set.
On SIGINT/SIGTERM everything is stopped in reverse order (router, workers
via ``ray.kill``, ``ray.shutdown()`` for a Ray we started, cache service, Valkey): no process is left.

Only members reach the cache service and the workers' BlockTransfer endpoints: with no credential flag the
stack makes a shared secret for this start; ``--cluster-secret-file`` or ``--tls-cert/--tls-key/--tls-ca``
choose one (``common/cluster_flags.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from typing import TYPE_CHECKING

from common import cluster_flags
from router.policies import POLICY_NAMES

if TYPE_CHECKING:
    from deploy.stack import StackConfig
    from router.policies import CostWeights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="checkpoint folder (Hugging Face layout) or 'demo'")
    parser.add_argument("--engine", default="native", choices=("native", "vllm"),
                        help="the workers' engine: 'native' (this project's) or 'vllm' (vLLM's async engine with "
                             "prefix caching and KV events; pip install \"prefixcache[vllm]\"; needs --model PATH)")
    parser.add_argument("--dtype", default=None,
                        help="the workers' dtype, either engine: float32, bfloat16, float16 (default: the checkpoint's)")
    parser.add_argument("--workers", type=int, default=None,
                        help="number of workers (default: one per GPU, or 2 on CPU)")
    parser.add_argument("--redis-url", default=None, help="Redis for the cache index (default: embedded Valkey)")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local Ray)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface every listener binds: router, metrics, cache service, the workers' "
                             "BlockTransfer and raw stream, a local Ray's own (0.0.0.0 for a multi-machine cluster)")
    parser.add_argument("--advertise-host", default=None,
                        help="address of this machine that others dial (workers reach the cache service on it; "
                             "the ready line prints it); default: --host, or this machine's IP when --host is "
                             "0.0.0.0 or ::")
    parser.add_argument("--port", type=int, default=50051, help="router gRPC port")
    parser.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics port")
    parser.add_argument("--http-port", type=int, default=8000,
                        help="OpenAI-compatible HTTP API port (/v1/chat/completions, /v1/completions, ...); 0: off")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id HTTP clients name (default: 'demo', or the model folder's name)")
    parser.add_argument("--policy", default="cache_aware", choices=POLICY_NAMES, help="routing policy")
    parser.add_argument("--policy-weight", action="append", default=[], metavar="NAME=VALUE",
                        help="a cache_aware cost weight (repeatable): prefill_weight, decode_load_weight, "
                             "queue_weight (default 0.2 here), transfer_cost_ratio, min_transfer_blocks")
    parser.add_argument("--transfer-aware", action="store_true",
                        help="let cache_aware route to a worker that pulls the prefix from a peer (cost "
                             "transfer_cost_ratio per block) instead of only to holders")
    parser.add_argument("--transfer-stream", default="raw", choices=("raw", "grpc"),
                        help="how workers move KV blocks between them: 'raw' (gRPC hands each fetch to a plain TCP "
                             "stream, one more port per worker) or 'grpc' (the gRPC stream only)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="tokens per KV block (default 16; 32 for --engine vllm on CPU, whose attention needs "
                             "multiples of 32)")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker (default: by memory)")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="workers' KV cache storage: 'auto' = the model's dtype, 'fp8' = float8 e4m3 with "
                             "per-token scales (~4x the blocks of float32); blocks move only between equal dtypes")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences per batch per worker")
    from workers.generate_cli import add_tier_arguments  # torch-free: the flags only

    add_tier_arguments(parser)  # --host-cache-gb, --disk-cache DIR (per worker: DIR/<worker id>), --disk-cache-gb
    parser.add_argument("--cache-service-port", type=int, default=50052, help="CacheService gRPC port")
    parser.add_argument("--auth-tokens", default=None, metavar="FILE",
                        help="JSON {token: tenant}; enables bearer-token auth "
                             "(or set PREFIXCACHE_AUTH_TOKENS=tok1=tenantA,tok2=tenantB)")
    parser.add_argument("--index-source", default="mirror", choices=("mirror", "service"),
                        help="where routing looks prompts up: the router's local mirror or the cache service")
    parser.add_argument("--max-in-flight", type=int, default=256,
                        help="requests in flight at the router before RESOURCE_EXHAUSTED")
    parser.add_argument("--elastic", action=argparse.BooleanOptionalAction, default=None,
                        help="start workers on Ray nodes that join while serving (one per GPU; one per CPU-only "
                             "node with room in a CPU fleet) and retire those of nodes that die (default: on "
                             "with --ray-address, off for a local Ray)")
    cluster_flags.add_arguments(parser, front_door=True)


def parse_weights(items: list[str], transfer_aware: bool) -> CostWeights:
    """The stack's cost weights with each ``--policy-weight NAME=VALUE`` applied, and ``enable_transfer``
    from ``--transfer-aware``; ``CostWeights`` checks the ranges. Raises ValueError with the flag's name."""
    from deploy.stack import default_policy_weights
    from router.policies import CostWeights

    # Every CostWeights field but enable_transfer (its own flag), converted like its default (float or int).
    kinds = {f.name: type(f.default) for f in dataclasses.fields(CostWeights) if f.name != "enable_transfer"}
    overrides: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in kinds:
            raise ValueError(f"--policy-weight expects NAME=VALUE with NAME one of {', '.join(kinds)}; got {item!r}")
        try:
            overrides[name] = kinds[name](value)
        except ValueError:
            raise ValueError(f"--policy-weight {name}: {value!r} is not a number") from None
    if transfer_aware:
        overrides["enable_transfer"] = True
    return dataclasses.replace(default_policy_weights(), **overrides)


def config_from_args(args: argparse.Namespace) -> StackConfig:
    from deploy.stack import StackConfig

    from workers.generate_cli import check_tier_arguments

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.engine == "vllm" and args.model == "demo":
        raise ValueError("--engine vllm serves a checkpoint folder (--model PATH); the demo model is native only")
    if args.engine == "vllm" and (args.host_cache_gb or args.disk_cache):
        from workers.vllm_worker import TIERS_UNSUPPORTED

        raise ValueError(TIERS_UNSUPPORTED)
    if args.block_size is not None and args.block_size <= 0:
        raise ValueError(f"--block-size must be positive, got {args.block_size}")
    check_tier_arguments(args)
    if not 0 <= args.http_port <= 65535:
        raise ValueError(f"--http-port must be a port number (0: off), got {args.http_port}")
    flags = cluster_flags.CredentialFlags.from_args(args)
    flags.check(front_door=True)  # CredentialError is a ValueError: a one-line message, exit 2
    return StackConfig(
        model=args.model, engine=args.engine, dtype=args.dtype, num_workers=args.workers, redis_url=args.redis_url,
        ray_address=args.ray_address,
        host=args.host, advertise_host=args.advertise_host, port=args.port, metrics_port=args.metrics_port,
        policy=args.policy,
        http_port=args.http_port or None, served_model_name=args.served_model_name,
        policy_weights=parse_weights(args.policy_weight, args.transfer_aware), block_size=args.block_size,
        num_blocks=args.num_blocks, kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=args.max_num_seqs,
        cache_service_port=args.cache_service_port,
        auth_tokens_file=args.auth_tokens, index_source=args.index_source, max_in_flight=args.max_in_flight,
        elastic=args.elastic, raw_transfer_stream=args.transfer_stream == "raw",
        host_cache_gb=args.host_cache_gb, disk_cache=args.disk_cache, disk_cache_gb=args.disk_cache_gb,
        cluster_secret_file=flags.secret_file, tls_cert=flags.tls_cert, tls_key=flags.tls_key, tls_ca=flags.tls_ca,
    )


def run(args: argparse.Namespace) -> int:
    from deploy.stack import Stack

    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"prefixcache serve: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stack = Stack(config)
    try:
        try:
            stack.start()
        except Exception as exc:  # noqa: BLE001 - a clear one-line reason, then exit
            print(f"prefixcache serve: failed to start: {exc}", file=sys.stderr)
            return 1
        # ray.init installs its own SIGTERM handler (it aborts the process): take the signals back.
        for s in previous:
            signal.signal(s, on_signal)
        workers = ",".join(f"{w}@{i.node_id[:8]}" for w, i in sorted(stack.worker_infos.items()))
        http_port = stack.router_server.http_port
        scheme = "https" if config.tls_cert else "http"  # the front doors serve TLS with --tls-cert
        http = f" http={scheme}://{config.dial_host()}:{http_port}/v1" if http_port is not None else ""
        print(f"ready router={stack.router_address} metrics={stack.metrics_url} "
              f"cache_service={stack.cache_service_address} redis={stack.redis_url} workers={workers}{http}",
              flush=True)
        while not stop.wait(0.5):
            pass
        print("shutting down", flush=True)
        return 0
    finally:
        stack.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
