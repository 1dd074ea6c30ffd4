"""The `mimpipe` command: one entry point, one subcommand per tool."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, help); modules are imported only when their command runs, so
# `mimpipe shard` does not pay for torch and DALI
COMMANDS = {
    "shard": ("mimpipe.tools.shard", "image folder / ImageNet -> WebDataset shards + DALI index + manifest"),
    "sample": ("mimpipe.tools.sample", "generate the embedded sample dataset (shapes on clutter)"),
    "train": ("mimpipe.train.trainer", "MAE pre-training with random, in-loop or mask-server masks"),
    "eval": ("mimpipe.train.evaluate", "k-NN and linear-probe accuracy of an encoder on labeled shards"),
    "viz": ("mimpipe.tools.viz", "mask pictures per strategy and object recall on the sample dataset"),
    "demo": ("mimpipe.tools.demo", "the whole system on the sample dataset (what `make demo` runs)"),
    "profile": ("mimpipe.tools.profile", "where throughput goes: every stage alone and the whole system"),
    "bench": ("mimpipe.tools.bench", "measure throughput of a stage against its baseline"),
    "maskserver": ("mimpipe.maskserver.serve", "serve attention-guided masks to trainer ranks over ZeroMQ"),
    "keys": ("mimpipe.maskserver.keys", "CURVE key pairs for the mask server and its trainers"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mimpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:   # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(run=importlib.import_module(module).main)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, RuntimeError, OSError) as e:
        # data, config and peer errors are for the user, not a traceback
        print(f"mimpipe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
