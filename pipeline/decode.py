"""Encoded JPEG bytes + the plan's crop boxes -> normalized NCHW float tensors.

DaliDecoder is the graph: external_source (bytes, box, flip) -> ROI decode (only the crop's
blocks are decoded; 'mixed' = nvJPEG on a GPU, libjpeg-turbo on the CPU with device_id=None)
-> resize to the model size (bicubic as MAE's RRC, or bilinear) -> mirror -> normalize -> CHW.
PilDecoder applies the same boxes with PIL: the fallback where DALI has no wheel, and the
benchmark baseline. Both produce the same pixels up to decoder rounding (tested).

Views with color augmentation leave the graph in [0, 1] and get `color.color_augment` in torch,
so both decoders share one implementation of it.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from mimpipe.pipeline.color import color_augment

# The loader refuses (on_error) a sample whose stored width x height exceeds this, before decoding:
# 16 MP is 48 MB as decoded RGB. `mimpipe shard` caps images at 4 MP by default
# (tools/shard.py DEFAULT_MAX_PIXELS), so every default-sharded sample passes with 4x headroom for
# datasets sharded with a larger --max-pixels; what lies beyond is a dataset no trainer should
# decode by accident (8 images of 144 MP took a trainer to 3 GB).
MAX_DECODE_PIXELS = 16 * 1024 * 1024

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DecodeError(RuntimeError):
    """A sample that does not decode; the message names shard, key and cause."""


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def finish(x01: torch.Tensor, color: np.ndarray | None) -> torch.Tensor:
    """[0, 1] images of a color view -> augmented, normalized."""
    return normalize(color_augment(x01, torch.from_numpy(color).to(x01.device)))


class PilDecoder:
    """PIL on a thread pool (PIL releases the GIL while decoding and resizing)."""

    def __init__(self, img_size: int, n_views: int = 1, color_views=(), *, threads: int = 2,
                 interpolation: str = "bicubic", **_):
        self.size, self.color_views = img_size, set(color_views)
        self.resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[interpolation]
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="mimpipe-pil")

    def decode_one(self, data: np.ndarray, box, flip: bool) -> np.ndarray:
        try:
            im = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise DecodeError(f"{type(e).__name__}: {e}") from e
        x, y, w, h = (int(v) for v in box)
        im = im.resize((self.size, self.size), self.resample, box=(x, y, x + w, y + h))
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(im)

    def decode(self, encoded: list[np.ndarray], views) -> list[torch.Tensor]:
        out = []
        for i, v in enumerate(views):
            arr = np.stack(list(self.pool.map(self.decode_one, encoded, v.crop, v.flip)))
            x01 = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)
            out.append(finish(x01, v.color) if i in self.color_views else normalize(x01))
        return out


class DaliDecoder:
    """A DALI pipeline fed by external_source; one graph decodes all views of a batch."""

    def __init__(self, img_size: int, n_views: int = 1, color_views=(), *, batch_size: int,
                 threads: int = 2, interpolation: str = "bicubic", device: str = "auto",
                 device_id: int | None = None, buffers: int = 5):
        self.size, self.n_views, self.color_views = img_size, n_views, set(color_views)
        self.interpolation = interpolation
        # Output tensors are recycled round-robin (as DALIGenericIterator does): a fresh 38 MB
        # CPU tensor per batch costs ~20 ms of page faults, more than the copy into it (~4 ms)
        self.buffers, self._ring, self._next = buffers, [], 0
        gpu = torch.cuda.is_available() if device == "auto" else device == "gpu"
        self.device_id = (device_id if device_id is not None else torch.cuda.current_device()) if gpu else None
        self.batch_size, self.threads = batch_size, threads
        self.pipe = self._build()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def graph():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            outs = []
            for v in range(self.n_views):
                anchor = fn.external_source(name=f"anchor{v}", dtype=types.FLOAT, ndim=1)
                shape = fn.external_source(name=f"shape{v}", dtype=types.FLOAT, ndim=1)
                flip = fn.external_source(name=f"flip{v}", dtype=types.INT32, ndim=0)
                img = fn.decoders.image_slice(
                    jpegs, anchor, shape, axis_names="WH", normalized_anchor=False,
                    normalized_shape=False, output_type=types.RGB,
                    device="mixed" if self.device_id is not None else "cpu")
                img = fn.resize(img, resize_x=self.size, resize_y=self.size,
                                interp_type=types.INTERP_CUBIC if self.interpolation == "bicubic"
                                else types.INTERP_LINEAR, antialias=True)
                raw = v in self.color_views   # color is applied later in torch, on [0, 1]
                outs.append(fn.crop_mirror_normalize(
                    img, mirror=flip, dtype=types.FLOAT, output_layout="CHW",
                    mean=[0.0] * 3 if raw else [255 * m for m in IMAGENET_MEAN],
                    std=[255.0] * 3 if raw else [255 * s for s in IMAGENET_STD]))
            return tuple(outs)

        pipe = graph()
        pipe.build()
        return pipe

    def decode(self, encoded: list[np.ndarray], views) -> list[torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        self.pipe.feed_input("jpegs", encoded)
        for i, v in enumerate(views):
            self.pipe.feed_input(f"anchor{i}", v.crop[:, :2].astype(np.float32))
            self.pipe.feed_input(f"shape{i}", v.crop[:, 2:].astype(np.float32))
            self.pipe.feed_input(f"flip{i}", v.flip.astype(np.int32))
        try:
            outs = self.pipe.run()
        except RuntimeError as e:
            self.pipe = self._build()   # a failed run leaves the pipeline unusable
            raise DecodeError(str(e)) from e
        result = []
        for i, (out, v, t) in enumerate(zip(outs, views, self._buffer(len(encoded)))):
            feed_ndarray(out.as_tensor(), t)   # one copy out of DALI's reused output buffer
            result.append(finish(t, v.color) if i in self.color_views else t)
        return result

    def _buffer(self, n: int) -> list[torch.Tensor]:
        if len(self._ring) < self.buffers:
            device = torch.device("cuda", self.device_id) if self.device_id is not None else torch.device("cpu")
            self._ring.append([torch.empty((self.batch_size, 3, self.size, self.size), device=device)
                               for _ in range(self.n_views)])
        bufs = self._ring[self._next % len(self._ring)]
        self._next += 1
        return [b[:n] for b in bufs]


DECODERS = {"dali": DaliDecoder, "pil": PilDecoder}


def make_decoder(name: str, **kw):
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; choose from {', '.join(DECODERS)}")
    return DECODERS[name](**kw)


def check_decodable(data: np.ndarray) -> str | None:
    """None if PIL decodes `data` fully, else the cause (used to find the culprit of a failed
    batch, and to vet a replacement; the bytes have passed their checksum by then, so a failure
    here means the sharder stored something a decoder rejects)."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            im.load()
        return None
    except Exception as e:  # noqa: BLE001 - any decoder complaint is the cause we report
        return f"{type(e).__name__}: {e}"
