"""The `mimpipe` command: one entry point, one subcommand per tool."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from mimpipe import __version__
from mimpipe.tools.config import config_tokens, read_config

# subcommand -> (module, help); modules are imported only when their command runs, so
# `mimpipe shard` does not pay for torch and DALI
COMMANDS = {
    "shard": ("mimpipe.tools.shard", "image folder / ImageNet -> WebDataset shards + DALI index + manifest"),
    "sample": ("mimpipe.tools.sample", "generate the embedded sample dataset (shapes on clutter)"),
    "train": ("mimpipe.train.trainer", "MAE pre-training with random, in-loop or mask-server masks"),
    "eval": ("mimpipe.train.evaluate", "k-NN and linear-probe accuracy of an encoder on labeled shards"),
    "finetune": ("mimpipe.train.finetune", "MAE's end-to-end fine-tuning recipe: top-1/top-5 of a pre-trained encoder"),
    "export": ("mimpipe.tools.export", "a checkpoint's encoder as a timm ViT .safetensors file"),
    "viz": ("mimpipe.tools.viz", "mask pictures per strategy and object recall on the sample dataset"),
    "demo": ("mimpipe.tools.demo", "the whole system on the sample dataset (what `make demo` runs)"),
    "profile": ("mimpipe.tools.profile", "where throughput goes: every stage alone and the whole system"),
    "bench": ("mimpipe.tools.bench", "measure throughput of a stage against its baseline"),
    "maskserver": ("mimpipe.maskserver.serve", "serve attention-guided masks to trainer ranks over ZeroMQ"),
    "launch": ("mimpipe.tools.launch", "one node's mask servers and trainer ranks from one set of flags"),
    "keys": ("mimpipe.maskserver.keys", "CURVE key pairs for the mask server and its trainers"),
    "doctor": ("mimpipe.tools.doctor", "facts for a bug report: versions, CUDA, GPUs, DALI, ZeroMQ; where a command runs"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The `mimpipe` command line, with `--config` layers, for the chosen command only."""
    parser = argparse.ArgumentParser(prog="mimpipe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mimpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    chosen_parser = None
    for name, (module, help_) in COMMANDS.items():
        # no abbreviations: a config key or a typo must not silently match a longer flag
        p = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == chosen:   # only the chosen command's module is imported
            mod = importlib.import_module(module)
            p.add_argument("--config", metavar="FILE.yaml", help="flag values from a YAML file (keys are "
                           "the flag names); flags given on the command line win")
            mod.add_arguments(p)
            p.set_defaults(run=mod.main)
            chosen_parser = p
    layers = []
    if chosen_parser is not None:
        try:
            layers = config_layers(chosen, argv, getattr(mod, "RUN_CONFIG", None))
        except ValueError as e:
            chosen_parser.error(str(e))
        i = argv.index(chosen)
        argv = argv[:i + 1] + [t for _, tokens in layers for t in tokens] + argv[i + 1:]
    args, unknown = parser.parse_known_args(argv)
    for source, tokens in layers:
        if bad := [t for t in unknown if t.startswith("--") and t in tokens]:
            chosen_parser.error(f"{source}: {', '.join(b[2:] for b in bad)}: not a flag of mimpipe {chosen}")
    if unknown:   # the subcommand's own usage, not the top level's
        (chosen_parser or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = os.environ.get("RANK")   # torchrun's: every rank's lines say whose they are
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s " + (f"[rank {rank}] " if rank else "") + "%(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, RuntimeError, OSError) as e:
        # data, config and peer errors are for the user, not a traceback
        print(f"mimpipe {args.command}: error: {e}", file=sys.stderr)
        return 2


def config_layers(command: str, argv: list[str], run_config: str | None) -> list[tuple[str, list[str]]]:
    """[(source, tokens)] to put in front of the command's own flags, lowest precedence first:
    with `--resume`, OUT/RUN_CONFIG (the run's own resolved config), then `--config FILE`."""
    own = argv[argv.index(command) + 1:]
    own = own[:own.index("--")] if "--" in own else own   # what follows `--` is another command's (launch)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--out", "--output_dir")
    pre.add_argument("--resume", action="store_true")
    known, _ = pre.parse_known_args(own)
    layers = []
    if known.config:
        data = read_config(known.config)
        layers.append((known.config, config_tokens(data)))
        known, _ = pre.parse_known_args(layers[0][1] + own)   # --out/--resume may come from the file
    if run_config and known.resume and known.out and (Path(known.out) / run_config).is_file():
        path = Path(known.out) / run_config
        layers.insert(0, (str(path), config_tokens(read_config(path))))
    return layers


if __name__ == "__main__":
    sys.exit(main())
