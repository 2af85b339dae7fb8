"""deploy/: the manifests parse, name only commands and flags the CLI (and `ray start`) has, and every metric the
Grafana dashboard queries is in the metrics contract and exported by a running stack."""

from __future__ import annotations

import json
import re
import shlex
import urllib.request

import grpc
import pytest
import yaml

from deploy import cli
from router.metrics import anonymous_tenant
from stack_process import (REPO, free_port, prefixcache_cmd, process_env, start_session, stop_session,
                           wait_for_stack)

DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"

# The metrics contract (README "Metrics"): name -> type. The dashboard and the router both follow it.
CONTRACT = {
    "prefixcache_requests_total": "counter",
    "prefixcache_prefix_cache_queries_tokens_total": "counter",
    "prefixcache_prefix_cache_hits_tokens_total": "counter",
    "prefixcache_prefix_cache_tier_hits_tokens_total": "counter",
    "prefixcache_router_predicted_cached_tokens_total": "counter",
    "prefixcache_router_realised_cached_tokens_total": "counter",
    "prefixcache_router_decision_seconds": "histogram",
    "prefixcache_index_lookups_total": "counter",
    "prefixcache_index_lookup_seconds": "histogram",
    "prefixcache_blocks_stored_total": "counter",
    "prefixcache_blocks_evicted_total": "counter",
    "prefixcache_transfers_total": "counter",
    "prefixcache_transfer_bytes_total": "counter",
    "prefixcache_transfer_seconds": "histogram",
    "prefixcache_queue_depth": "gauge",
    "prefixcache_running_requests": "gauge",
    "prefixcache_kv_blocks_free": "gauge",
    "prefixcache_worker_up": "gauge",
    "prefixcache_worker_prefix_hits_tokens_total": "counter",
    "prefixcache_ttft_seconds": "histogram",
    "prefixcache_inter_token_latency_seconds": "histogram",
}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# ---- helpers -------------------------------------------------------------------------------------------
def _dashboard() -> dict:
    return json.loads((DEPLOY / "observability" / "grafana-dashboard.json").read_text())


def _dashboard_exprs() -> list[str]:
    out = []
    for panel in _dashboard()["panels"]:
        out += [t["expr"] for t in panel.get("targets", [])]
    for var in _dashboard()["templating"]["list"]:
        if var.get("type") == "query":
            out.append(var["definition"])
    return out


def _contract_name(series: str) -> str:
    """The contract family a queried series belongs to (histogram series carry _bucket/_sum/_count)."""
    for suffix in _HISTOGRAM_SUFFIXES:
        base = series[: -len(suffix)]
        if series.endswith(suffix) and CONTRACT.get(base) == "histogram":
            return base
    return series


def _dashboard_metrics() -> set[str]:
    return {_contract_name(m) for e in _dashboard_exprs() for m in re.findall(r"\bprefixcache_[a-z_]+", e)}


def _shell_commands() -> list[tuple[str, str]]:
    """(where, shell command) for every command a manifest runs."""
    cmds = []
    cluster = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        cmds += [(f"ray-cluster.yaml:{key}", c) for c in cluster.get(key) or []]
    rc = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    groups = [("head", rc["spec"]["headGroupSpec"])] + [(g["groupName"], g) for g in rc["spec"]["workerGroupSpecs"]]
    for name, group in groups:
        for c in group["template"]["spec"]["containers"]:
            cmds += [(f"raycluster.yaml:{name}", a) for a in c.get("args", [])]
    return cmds


def _invocations(command: str, program: list[str]) -> list[list[str]]:
    """Argument lists of every call of ``program`` (e.g. ["prefixcache"] or ["ray", "start"]) in a shell line."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    tokens = list(lexer)
    out = []
    for i in range(len(tokens) - len(program) + 1):
        if tokens[i: i + len(program)] == program:
            args = []
            for tok in tokens[i + len(program):]:
                if tok and set(tok) <= set(";&|<>"):
                    break
                args.append(tok)
            out.append(args)
    return out


def _parse_prefixcache(args: list[str]):
    import importlib

    parser, subparsers = cli.build_parser()
    name = args[0]
    assert name in cli.SUBCOMMANDS, f"unknown subcommand {name!r}"
    importlib.import_module(cli.SUBCOMMANDS[name][0]).add_arguments(subparsers[name])
    # Shell variables become placeholders; argparse then checks every flag and its value's type.
    concrete = [re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "x", a) for a in args]
    return parser.parse_args(concrete)


# ---- static checks -------------------------------------------------------------------------------------
def test_every_manifest_parses():
    kinds = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        kinds[path.name] = [d["kind"] for d in yaml.safe_load_all(path.read_text()) if d]
    assert kinds == {
        "kustomization.yaml": ["Kustomization"], "namespace.yaml": ["Namespace"], "raycluster.yaml": ["RayCluster"],
        "redis.yaml": ["Secret", "Service", "StatefulSet"], "services.yaml": ["Service", "Service"]}
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(k for k in kinds if k != "kustomization.yaml")
    prom = yaml.safe_load((DEPLOY / "observability" / "prometheus.yml").read_text())
    assert {j["job_name"] for j in prom["scrape_configs"]} >= {"prefixcache", "prefixcache-kubernetes"}
    assert _dashboard()["panels"]


def test_ray_cluster_yaml_is_a_valid_launcher_config():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    validate_config(config)  # Ray's own JSON schema for `ray up`
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)


def test_manifests_run_prefixcache_serve_with_flags_the_cli_has():
    serves = []
    for where, command in _shell_commands():
        for args in _invocations(command, ["prefixcache"]):
            ns = _parse_prefixcache(args)
            serves.append((where, ns))
    assert sorted(w for w, _ in serves) == ["ray-cluster.yaml:head_start_ray_commands", "raycluster.yaml:head"]
    for where, ns in serves:
        assert ns.command == "serve" and ns.ray_address == "auto", where
        assert (ns.port, ns.metrics_port, ns.cache_service_port) == (50051, 9400, 50052), where
        assert ns.redis_url, where  # the persistent Redis, never the embedded one


def test_manifests_run_ray_start_with_flags_ray_has():
    from ray.scripts.scripts import start

    num_calls = 0
    for where, command in _shell_commands():
        for args in _invocations(command, ["ray", "start"]):
            start.make_context("start", [re.sub(r"\$[A-Z_]+", "10.0.0.1", a) for a in args])  # raises on a bad flag
            num_calls += 1
    assert num_calls == 2  # head and workers of ray-cluster.yaml (KubeRay generates its own)


def test_kuberay_wiring():
    docs = {(d["kind"], d["metadata"]["name"]): d for p in KUBERAY.glob("*.yaml") for d in yaml.safe_load_all(
        p.read_text()) if d and "metadata" in d}
    rc = docs[("RayCluster", "prefixcache")]
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "KUBERAY_GEN_RAY_START_CMD" in head["args"][0]
    head_ports = {p["containerPort"] for p in head["ports"]}
    env = {e["name"]: e for e in head["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "prefixcache-redis", "key": "password"}
    gpu_group = rc["spec"]["workerGroupSpecs"][0]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] >= 1
    # Redis: AOF persistence on a volume, password from the Secret.
    redis = docs[("StatefulSet", "prefixcache-redis")]["spec"]
    args = redis["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert redis["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert docs[("Secret", "prefixcache-redis")]["stringData"]["password"]
    # Services select the head pod and point at ports it serves.
    for name in ("prefixcache-router", "prefixcache-cache-service"):
        svc = docs[("Service", name)]["spec"]
        assert svc["selector"] == {"ray.io/cluster": "prefixcache", "ray.io/node-type": "head"}
        assert {p["targetPort"] for p in svc["ports"]} <= head_ports
    redis_selector = docs[("Service", "prefixcache-redis")]["spec"]["selector"]
    assert redis_selector.items() <= redis["template"]["metadata"]["labels"].items()
    assert "prefixcache-redis:6379" in head["args"][0]


def test_dashboard_queries_only_contract_metrics_and_covers_the_contract():
    queried = _dashboard_metrics()
    assert queried - set(CONTRACT) == set()
    assert set(CONTRACT) - queried == set()


# ---- against a running stack ---------------------------------------------------------------------------
def _exported_families(text: str) -> set[str]:
    """Metric families a /metrics page declares (``# TYPE`` lines; counters under their ``_total`` name)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            names.add(name + "_total" if kind == "counter" and not name.endswith("_total") else name)
        elif line and not line.startswith("#"):
            names.add(_contract_name(re.split(r"[{ ]", line, maxsplit=1)[0]))
    return names


@pytest.mark.timeout(180)
def test_every_dashboard_metric_is_exported_by_a_running_stack(tmp_path):
    from protos.prefixcache.v1 import generation_pb2, generation_pb2_grpc

    port, metrics_port, cs_port = free_port(), free_port(), free_port()
    log = tmp_path / "serve.log"
    proc = start_session(prefixcache_cmd("serve", "--workers", "1", "--model", "demo", "--port", str(port),
                                         "--metrics-port", str(metrics_port), "--cache-service-port", str(cs_port),
                                         "--num-blocks", "64"), log, env=process_env(local_ray=True))
    try:
        wait_for_stack(proc, port, metrics_port, log)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            for salt in ("", "tenant-a"):
                prompt = list(range(40, 40 + 40))
                for _ in range(2):
                    for _msg in stub.GenerateStream(generation_pb2.GenerateRequest(
                            token_ids=prompt, cache_salt=salt,
                            sampling=generation_pb2.SamplingParams(max_tokens=3, ignore_eos=True)), timeout=60):
                        pass
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        exported = _exported_families(text)
        missing = sorted(_dashboard_metrics() - exported)
        assert missing == [], f"queried by the dashboard but not exported: {missing}"
        # After traffic the per-tenant series exist, with the labels the dashboard groups by.
        # Auth is off: the salt "tenant-a" is labelled by its digest, never verbatim.
        tenant_a = anonymous_tenant("tenant-a")
        assert 'tenant="tenant-a"' not in text
        assert re.search(rf'prefixcache_prefix_cache_hits_tokens_total\{{[^}}]*tenant="{tenant_a}"[^}}]*\}} [1-9]', text), \
            text[:3000]
        ttft_counts = re.findall(r'prefixcache_ttft_seconds_count\{([^}]*)\} ([0-9.]+)', text)
        assert sorted(ttft_counts) == [('tenant="default",worker="worker-0"', "2.0"),
                                       (f'tenant="{tenant_a}",worker="worker-0"', "2.0")], ttft_counts
        assert re.search(r'prefixcache_worker_up\{worker="worker-0"\} 1\.0', text)
    finally:
        stop_session(proc)
