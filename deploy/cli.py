"""The `prefixcache` console script: a thin dispatcher over subcommand modules.

Each subcommand lives with the package it drives and exposes
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only
when their subcommand runs, so `prefixcache generate` never imports Ray.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("deploy.serve", "start the whole stack: Valkey, Ray, cache service, workers, router"),
    "generate": ("workers.generate_cli", "offline batch generation on one engine (JSONL in, JSONL out)"),
    "cache-service": ("cache_service.server_cli", "run the cache service (CacheService gRPC) alone"),
    "stats": ("deploy.stats", "print cache-hit metrics of a running stack"),
    "bench": ("loadgen.cli", "drive a running stack with the standard workloads"),
    "simulate": ("simulator.cli", "replay a trace against simulated nodes"),
}


def _set_process_defaults() -> None:
    # Ray 2.60 fails nodes and drivers with InvalidAuthToken on a mismatch;
    # every process we start must agree.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="prefixcache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name, (_, help_text) in SUBCOMMANDS.items():
        subparsers[name] = sub.add_parser(name, help=help_text, description=help_text)
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    _set_process_defaults()
    argv = sys.argv[1:] if argv is None else argv
    parser, subparsers = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage / errors for unknown commands
        parser.print_help()
        return 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    module.add_arguments(subparsers[name])
    args = parser.parse_args(argv)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
