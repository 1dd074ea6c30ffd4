"""`mimpipe bench STAGE`: one stage against the baseline a user would write today, measured in one
run on the same data and cores; prints the ratio. Stages are added as the system grows."""
from __future__ import annotations

import importlib
import json

# stage -> module with add_arguments(p) and run(args) -> dict of results
STAGES = {
    "shard": "tools.bench_shard",
    "teacher": "tools.bench_teacher",
    "loader": "tools.bench_loader",
    "transport": "tools.bench_transport",
}


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="stage", metavar="STAGE")
    for name, module in STAGES.items():
        sp = sub.add_parser(name, help=importlib.import_module(module).__doc__.splitlines()[0])
        importlib.import_module(module).add_arguments(sp)
        sp.add_argument("--json", action="store_true", help="print one JSON object, nothing else")


def main(args) -> int:
    stages = [args.stage] if args.stage else list(STAGES)
    for stage in stages:
        mod = importlib.import_module(STAGES[stage])
        if not args.stage:   # `mimpipe bench` alone runs every stage with its defaults
            args = _defaults(stage)
        result = mod.run(args)
        print(json.dumps(result) if args.json else mod.table(result))
    return 0


def _defaults(stage: str):
    import argparse
    p = argparse.ArgumentParser()
    importlib.import_module(STAGES[stage]).add_arguments(p)
    p.add_argument("--json", action="store_true")
    return p.parse_args([])
