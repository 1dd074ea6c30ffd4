"""Config files: `--config FILE.yaml` for any command, keys = flag names, the command line wins.

A config becomes command-line tokens placed before the user's own (`epochs: 800` -> `--epochs 800`),
so argparse applies every type, choice and range check to a file's values exactly as to a flag's,
and the last occurrence (the command line) wins. Keys may be written with `_` or `-`; MAE's flag
names are accepted as aliases (`ALIASES`). Lists become comma lists (`views: [src, src+color]`),
booleans `--flag` / `--no-flag`, null leaves the default.
"""
from __future__ import annotations

from pathlib import Path

import yaml

# MAE's main_pretrain.py names that differ from ours (train accepts them as flags too)
ALIASES = {"accum_iter": "accum", "input_size": "img_size", "output_dir": "out", "data_path": "shards"}


def read_config(path: str | Path) -> dict:
    """FILE.yaml -> {key: value}; one line naming the file for anything that is not a flat mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, "
                         f"got {type(data).__name__}")
    for k, v in data.items():
        if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v)):
            raise ValueError(f"--config {path}: key {k!r}: a flag takes a scalar or a flat list")
    return data


def flag_name(key: str) -> str:
    key = key.replace("-", "_")
    return "--" + ALIASES.get(key, key).replace("_", "-")


def config_tokens(data: dict) -> list[str]:
    """{key: value} -> argv tokens, in the file's order."""
    tokens = []
    for key, value in data.items():
        flag = flag_name(key)
        if value is None:
            continue
        if isinstance(value, bool):
            tokens.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            tokens += [flag, ",".join(str(v) for v in value)]
        else:
            tokens += [flag, repr(value) if isinstance(value, float) else str(value)]
    return tokens


def write_config(path: Path, data: dict) -> None:
    """The resolved config of a run (every field, None left out), readable back by --config."""
    resolved = {k: v for k, v in data.items() if v is not None}
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))
