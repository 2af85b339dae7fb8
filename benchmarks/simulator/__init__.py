"""Cluster simulation on real traces: the project's routing policies and block pool at 10 to 1000 nodes.

    sim_request.py    a request's block identities and what happened to it
    time_model.py     prefill / decode / transfer durations of one node
    node.py           one node: BlockPool, prefill queue, batched decode
    cluster_index.py  block hash -> holders, from the pools' events (the cache service's view)
    cluster.py        the discrete-event loop: routing, transfers, accounting
    results.py        hit rates, load imbalance, TTFTs -> JSON
    cli.py            `prefixcache simulate`
"""

from .cluster import GLOBAL, SIM_POLICY_NAMES, SimConfig, Simulator, simulate
from .sim_request import SimRequest, from_workload, replicate
from .time_model import TimeModel

__all__ = ["GLOBAL", "SIM_POLICY_NAMES", "SimConfig", "SimRequest", "Simulator", "TimeModel", "from_workload", "replicate", "simulate"]
