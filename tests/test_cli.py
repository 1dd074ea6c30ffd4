"""The command line a user meets: config files, MAE's flag names, ranges, requeue-safe runs."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimpipe.tools.cli import parse_args
from mimpipe.train.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
MICRO = "mae_vit_micro_patch8_64"


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mimpipe.tools.cli", *map(str, args)], capture_output=True,
                          text=True, **kw)


def test_config_file_sets_flags_and_the_command_line_wins(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 5\nblr: 1.0e-3\nviews: [src, src+color]\nnorm_pix_loss: false\n"
                 "accum_iter: 2\nwarmup-epochs: 1.5\nmax_steps: null\n")
    a = parse_args(["train", "--shards", "x", "--config", str(f), "--epochs", "7"])
    assert (a.epochs, a.blr, a.views, a.norm_pix_loss, a.accum, a.warmup_epochs, a.max_steps) == \
        (7, 1e-3, "src,src+color", False, 2, 1.5, None)


@pytest.mark.parametrize("text, says", [
    ("epochs: 2\nbogus_key: 3\n", "c.yaml: bogus-key: not a flag of mimpipe train"),
    ("epochs: 0\n", "argument --epochs: '0' is not allowed: expected an integer >= 1"),
    ("- epochs\n", "c.yaml: expected a mapping of flag names to values"),
    ("epochs: [1, [2]]\n", "c.yaml: key 'epochs': a flag takes a scalar or a flat list"),
    ("epochs: {a: 1}\n", "c.yaml: key 'epochs'"),
    ("epochs: : :\n", "c.yaml: not YAML"),
])
def test_a_bad_config_file_is_one_line_naming_file_and_key(tmp_path, capsys, text, says):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_args(["train", "--shards", "x", "--config", str(tmp_path / "c.yaml")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err and err.startswith("usage: mimpipe train"), err


def test_mae_flag_names_are_aliases():
    a = parse_args(["train", "--data_path", "d", "--output_dir", "o", "--accum_iter", "4", "--input_size", "96",
                    "--mask_ratio", "0.6", "--no-norm_pix_loss", "--lr", "1e-3", "--min_lr", "1e-6",
                    "--warmup_epochs", "2", "--weight_decay", "0.1"])
    assert (a.shards, a.out, a.accum, a.img_size, a.mask_ratio, a.norm_pix_loss, a.lr, a.min_lr,
            a.warmup_epochs, a.weight_decay) == ("d", "o", 4, 96, 0.6, False, 1e-3, 1e-6, 2.0, 0.1)


@pytest.mark.parametrize("flag, value", [
    ("--epochs", "0"), ("--accum", "0"), ("--sync-every", "0"), ("--log-every", "0"), ("--threads", "0"),
    ("--mask-ratio", "-0.5"), ("--mask-ratio", "1.0"), ("--blr", "-1"), ("--flip", "2"),
    ("--crop-scale", "0.9,0.1"), ("--crop-scale", "a,b"), ("--batch-size", "0"), ("--heartbeat", "0"),
    ("--mask-timeout", "0"), ("--lut", "-1"), ("--img-size", "0"), ("--model", "vit_nope"),
])
def test_bad_train_values_are_refused_by_the_parser(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        parse_args(["train", "--shards", "x", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("mimpipe train: error: argument " + flag), err


def test_version_and_an_unknown_flag_show_the_subcommand():
    from mimpipe import __version__
    v = run_cli("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"mimpipe {__version__}"
    r = run_cli("train", "--shards", "x", "--no-such-flag")
    assert r.returncode == 2 and r.stderr.startswith("usage: mimpipe train"), r.stderr
    assert "unrecognized arguments: --no-such-flag" in r.stderr


def test_every_shipped_config_parses():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(files) >= 7
    for f in files:   # each recipe against its command's parser
        if f.name.startswith("finetune"):
            a = parse_args(["finetune", "--config", str(f), "--shards", "x"])
            assert a.epochs == 100, f
        else:
            a = parse_args(["train", "--config", str(f), "--shards", "x"])
            assert a.model.startswith("mae_vit_") and a.epochs >= 100 and a.blr == 1.5e-4, f


def test_vit_b_recipe_runs_from_its_config_file_and_resume_reads_the_run_config(sample_ds, tmp_path):
    """The recipe with a tiny override; stderr is no terminal here, as under SLURM: progress lines."""
    out = tmp_path / "run"
    tiny = ["--model", MICRO, "--img-size", 64, "--batch-size", 8, "--accum", 2, "--max-steps", 4,
            "--threads", 1, "--log-every", 1, "--print-every", 2, "--ckpt-every", 2]
    r = run_cli("train", "--config", ROOT / "configs/mae_vit_base_imagenet.yaml", "--shards", sample_ds,
                "--out", out, *tiny, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "it 2/4" in r.stderr and "img/s" in r.stderr and "ETA" in r.stderr, r.stderr[-2000:]
    assert (out / "loss.png").stat().st_size > 0
    saved = (out / "config.yaml").read_text()
    assert "epochs: 800" in saved and f"model: {MICRO}" in saved and "accum: 2" in saved
    # a requeued job: only --out and --resume; everything else from OUT/config.yaml
    r2 = run_cli("train", "--out", out, "--resume", "--max-steps", 6, cwd=ROOT)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "resumed from" in r2.stderr and "at iteration 4" in r2.stderr, r2.stderr[-2000:]
    its = [json.loads(line)["it"] for line in open(out / "metrics.jsonl")]
    assert its == [1, 2, 3, 4, 5, 6]


def cfg(sample_ds, out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(shards=str(sample_ds), out=str(out), model=MICRO, batch_size=16, epochs=2,
                                 threads=1), **kw})


def test_out_of_an_earlier_run_is_refused_without_resume_or_overwrite(sample_ds, tmp_path):
    train(cfg(sample_ds, tmp_path, max_steps=2))
    with pytest.raises(ValueError, match=r"holds an earlier run \(checkpoint.pt, metrics.jsonl\): pass --resume .* or --overwrite"):
        train(cfg(sample_ds, tmp_path, max_steps=2))
    train(cfg(sample_ds, tmp_path, max_steps=3), overwrite=True)
    assert [json.loads(line)["it"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_resume_without_a_checkpoint_starts_fresh(sample_ds, tmp_path):
    r = train(cfg(sample_ds, tmp_path, max_steps=2), resume=True)
    assert r["it"] == 2 and not r["stopped"]


def test_resume_after_a_kill_logs_every_step_once(sample_ds, tmp_path):
    """A run killed after its checkpoint at 4 had logged steps 5, 6: they run again, logged once."""
    train(cfg(sample_ds, tmp_path, max_steps=4))
    ckpt = (tmp_path / "checkpoint.pt").read_bytes()
    train(cfg(sample_ds, tmp_path, max_steps=6), resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(ckpt)   # what the kill left: the checkpoint at 4
    train(cfg(sample_ds, tmp_path, max_steps=8), resume=True)
    assert [json.loads(line)["it"] for line in open(tmp_path / "metrics.jsonl")] == list(range(1, 9))
    # the run keeps its identity across launches (a mask server hands a live rank back only to it)
    first = torch.load(io.BytesIO(ckpt), weights_only=True)["run_id"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["run_id"] == first and len(first) == 32


def test_resume_with_another_model_is_one_line(sample_ds, tmp_path):
    train(cfg(sample_ds, tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"written by --model mae_vit_micro_patch8_64, this run has --model "
                                         r"mae_vit_tiny_patch8_64$"):
        train(cfg(sample_ds, tmp_path, model="mae_vit_tiny_patch8_64", max_steps=2), resume=True)


def test_a_non_finite_loss_stops_the_run_before_anything_is_written(sample_ds, tmp_path):
    train(cfg(sample_ds, tmp_path / "a", max_steps=1))
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    state["model"]["decoder_pred.weight"].fill_(float("nan"))
    del state["digest"]   # a foreign file: no digest to fail first
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(RuntimeError, match=r"rank 0, epoch 0, step 0: loss nan.* stopping before any "
                                           r"checkpoint is written"):
        train(cfg(sample_ds, tmp_path / "b", max_steps=3, init=str(tmp_path / "nan.pt")))
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


def test_img_size_builds_the_model_for_it(sample_ds, tmp_path):
    r = train(cfg(sample_ds, tmp_path, max_steps=1, img_size=96))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert r["it"] == 1 and state["model"]["pos_embed"].shape[1] == 1 + (96 // 8) ** 2


def test_wandb_logs_the_metrics_offline(sample_ds, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(cfg(sample_ds, tmp_path, max_steps=2, wandb="mimpipe-test"))
    (record,) = (tmp_path / "wandb").glob("offline-run-*/*.wandb")   # what `wandb sync` uploads
    blob = record.read_bytes()
    assert b"mimpipe-test" in blob and all(k in blob for k in (b"loss_mae", b"data_wait", b"lr"))


def test_a_damaged_checkpoint_is_refused_naming_the_file(sample_ds, tmp_path):
    """64 flipped bytes inside a tensor used to load silently and train on as NaN."""
    train(cfg(sample_ds, tmp_path, max_steps=2))
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    w = torch.load(path, weights_only=True)["model"]["blocks.0.mlp.fc1.weight"]
    at = good.find(w.numpy().tobytes()[:512])
    assert at > 0
    path.write_bytes(good[:at + 100] + bytes(b ^ 0xFF for b in good[at + 100:at + 164]) + good[at + 164:])
    with pytest.raises(ValueError, match=rf"^{path}: damaged: its tensors do not match the digest"):
        train(cfg(sample_ds, tmp_path, max_steps=4), resume=True)
    for damaged, says in [(b"", "empty file"), (good[:len(good) // 2], "not a readable checkpoint")]:
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"^{path}: {says}") as e:
            train(cfg(sample_ds, tmp_path, max_steps=4), resume=True)
        assert "\n" not in str(e.value)
    from mimpipe.train.model import read_checkpoint   # --init, eval and frozen teachers read the same way
    with pytest.raises(ValueError, match=rf"^{path}: not a readable checkpoint"):
        read_checkpoint(str(path))


def test_keep_last_and_epoch_snapshots(sample_ds, tmp_path):
    """8 steps an epoch (120 images / 16): a checkpoint every 4 iterations, the last 3 kept, and
    one every epoch kept for good."""
    train(cfg(sample_ds, tmp_path, epochs=3, ckpt_every=4, keep_last=3, save_every_epochs=1))
    names = sorted(p.name for p in tmp_path.glob("checkpoint*.pt"))
    assert names == ["checkpoint-epoch0000.pt", "checkpoint-epoch0001.pt", "checkpoint-epoch0002.pt",
                     "checkpoint-it00000016.pt", "checkpoint-it00000020.pt", "checkpoint.pt"], names
    its = {n: torch.load(tmp_path / n, weights_only=True)["it"] for n in names}
    assert its == {"checkpoint-epoch0000.pt": 8, "checkpoint-epoch0001.pt": 16, "checkpoint-epoch0002.pt": 24,
                   "checkpoint-it00000016.pt": 16, "checkpoint-it00000020.pt": 20, "checkpoint.pt": 24}
