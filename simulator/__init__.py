"""Cluster simulation on real traces: the project's routing policies, index mirror and block pool at 10 to
1000 nodes; what `prefixcache simulate` runs.

    sim_request.py    a request's block identities and what happened to it
    time_model.py     prefill / decode / transfer durations of one node
    node.py           one node: BlockPool (and host / disk tiers under it), prefill queue, batched decode
    routing_index.py  the router's IndexMirror fed by the pools' events, keyed by node
    cluster.py        the discrete-event loop: routing, transfers, accounting
    results.py        hit rates, load imbalance, TTFTs -> JSON
    cli.py            `prefixcache simulate`

Layer: above the router (protos, common, cache_service, workers, router, and loadgen for the workloads and
percentiles); never deploy or benchmarks.
"""

from .cluster import GLOBAL, SIM_POLICY_NAMES, SimConfig, Simulator, simulate
from .sim_request import SimRequest, from_workload, replicate
from .time_model import TimeModel

__all__ = ["GLOBAL", "SIM_POLICY_NAMES", "SimConfig", "SimRequest", "Simulator", "TimeModel", "from_workload", "replicate", "simulate"]
