"""Load generation: the standard workloads and the gRPC driver that `prefixcache bench` runs against a stack.

    workloads.py  request generators (token ids) and the Mooncake trace reader, deterministic per seed
    spec.py       a workload scaled for a live stack (WorkloadSpec) -> driver requests
    driver.py     GenerateStream calls with bounded concurrency and arrival times -> per-request results
    stats.py      the project's one percentile definition
    report.py     summaries and PNG plots of a run's results
    cli.py        `prefixcache bench`

Layer: above the router (it may import protos, common, cache_service, workers, router), never deploy or
benchmarks; the simulator and the benchmark scripts import it for workloads, the driver and percentiles.
"""
