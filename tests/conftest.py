"""Shared fixtures: small generated inputs, every bad kind the sharder must handle."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# relpath -> expected outcome: "as_is" (stored byte for byte), "converted", or "skip"
BAD_KINDS = {
    "cat/gray.jpg": "converted", "cat/cmyk.jpg": "converted", "dog/rgb.png": "converted",
    "dog/sixteen.png": "converted", "dog/palette.png": "converted", "dog/rotated.jpg": "converted",
    "dog/bitmap.bmp": "converted", "fish/empty.jpg": "skip", "fish/truncated.jpg": "skip",
    "fish/corrupt.jpg": "skip", "fish/notes.txt": "skip", "cat/img.v2.jpg": "as_is",
}


def picture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth gradient plus noise: compresses like a photo, unlike pure noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([xx, yy, 1 - xx], -1) * 200 + rng.uniform(0, 55, 3)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def jpeg_bytes(a: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def make_image_folder(root: Path, n_good: int = 12, seed: int = 0, size=(64, 48)) -> dict[str, str]:
    """ImageNet-train-style folder (cat/, dog/, fish/) with good JPEGs and every bad kind."""
    rng = np.random.default_rng(seed)
    outcome = {}
    for i in range(n_good):
        rel = f"{('cat', 'dog', 'fish')[i % 3]}/good_{i:03d}.jpg"
        _write(root / rel, jpeg_bytes(picture(rng, *size)))
        outcome[rel] = "as_is"
    a = picture(rng, *size)
    _write(root / "cat/img.v2.jpg", jpeg_bytes(a))
    buf = io.BytesIO()
    Image.fromarray(a).convert("L").save(buf, "JPEG")
    _write(root / "cat/gray.jpg", buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(a).convert("CMYK").save(buf, "JPEG")
    _write(root / "cat/cmyk.jpg", buf.getvalue())
    Image.fromarray(a).save(_mk(root / "dog/rgb.png"))
    Image.fromarray(a[..., 0].astype(np.uint16) * 257).save(_mk(root / "dog/sixteen.png"))
    Image.fromarray(a).convert("P").save(_mk(root / "dog/palette.png"))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(_mk(root / "dog/rotated.jpg"), exif=exif)
    Image.fromarray(a).save(_mk(root / "dog/bitmap.bmp"))
    _write(root / "fish/empty.jpg", b"")
    good = jpeg_bytes(picture(rng, 200, 150))
    _write(root / "fish/truncated.jpg", good[: len(good) // 2])
    _write(root / "fish/corrupt.jpg", b"\xff\xd8\xff\xe0" + rng.bytes(3000))
    _write(root / "fish/notes.txt", b"not an image\n")
    outcome.update(BAD_KINDS)
    return outcome


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write(path: Path, data: bytes) -> None:
    _mk(path).write_bytes(data)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return root, make_image_folder(root)


def build_sample(out: Path, n: int = 120, size: int = 64, per_shard: int = 30, seed: int = 0) -> Path:
    from mimpipe.tools.sample import CLASSES, GENERATOR, SampleItem
    from mimpipe.tools.shard import ShardConfig, shard_items
    items = [SampleItem(seed, i, size) for i in range(n)]
    shard_items(items, CLASSES, out, ShardConfig(name="sample", shard_bytes=None,
                                                 samples_per_shard=per_shard, seed=seed), progress=False,
                 source=f"{GENERATOR} --n {n} --size {size} --seed {seed}")
    return out


@pytest.fixture(scope="session")
def sample_ds(tmp_path_factory):
    """A small sample dataset (120 images, 64 px, 4 shards), shared read-only by tests."""
    return build_sample(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="session")
def http_server(sample_ds):
    """The sample dataset served over HTTP with Range support, on 127.0.0.1 (RangeServer)."""
    from mimpipe.tools.bench_remote import RangeServer
    server = RangeServer(sample_ds)
    with server:
        yield server


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server (moto's, as s3fs's own tests use) on 127.0.0.1, with the
    environment pointing boto at it: credentials come from the usual variables, as for users."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                     "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
            mp.setenv(k, v)
        import fsspec
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("mimpipe-test")
        yield "s3://mimpipe-test"
    server.stop()
