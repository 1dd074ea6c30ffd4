"""`mimpipe bench STAGE`: one stage against the baseline a user would write today, measured in one
run on the same data and cores; prints the ratio. Stages are added as the system grows."""
from __future__ import annotations

import importlib
import json

# stage -> module with add_arguments(p) and run(args) -> dict of results
STAGES = {
    "shard": "mimpipe.tools.bench_shard",
    "teacher": "mimpipe.tools.bench_teacher",
    "loader": "mimpipe.tools.bench_loader",
    "transport": "mimpipe.tools.bench_transport",
    "knn": "mimpipe.tools.bench_knn",
    "remote": "mimpipe.tools.bench_remote",
    "sync": "mimpipe.tools.bench_sync",
    "cache": "mimpipe.tools.bench_cache",
}


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="stage", metavar="STAGE")
    for name, module in STAGES.items():
        sp = sub.add_parser(name, help=importlib.import_module(module).__doc__.splitlines()[0])
        importlib.import_module(module).add_arguments(sp)
        sp.add_argument("--json", action="store_true", help="print one JSON object, nothing else")


def main(args) -> int:
    run_all = not args.stage   # `mimpipe bench` alone runs every stage with its defaults
    for stage in list(STAGES) if run_all else [args.stage]:
        mod = importlib.import_module(STAGES[stage])
        stage_args = _defaults(stage) if run_all else args
        result = mod.run(stage_args)
        print(json.dumps(result) if stage_args.json else mod.table(result), flush=True)
    return 0


def _defaults(stage: str):
    import argparse
    p = argparse.ArgumentParser()
    importlib.import_module(STAGES[stage]).add_arguments(p)
    p.add_argument("--json", action="store_true")
    return p.parse_args([])
