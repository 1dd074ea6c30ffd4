"""Encoded JPEG bytes + the plan's crop boxes -> normalized NCHW float tensors.

DaliDecoder is the graph: external_source (bytes, box, flip) -> ROI decode (only the crop's
blocks are decoded; 'mixed' = nvJPEG on a GPU, libjpeg-turbo on the CPU with device_id=None)
-> resize to the model size (bicubic as MAE's RRC, or bilinear) -> mirror -> normalize -> CHW.
PilDecoder applies the same boxes with PIL: the fallback where DALI has no wheel, and the
benchmark baseline. Both produce the same pixels up to decoder rounding (tested).

Views with color augmentation leave the graph in [0, 1] and get `color.color_augment` in torch,
so both decoders share one implementation of it.

A decoder is a queue: `submit(encoded, views)` batches, `collect()` their outputs in the same
order, at most `depth` batches in flight (DALI's executor decodes them while the loader reads and
copies); `release(decoded)` gives a batch's recycled tensors back once the consumer is done.
"""
from __future__ import annotations

import io
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mimpipe.pipeline.color import color_augment, device_constant

# The loader refuses (on_error) a sample whose stored width x height exceeds this, before decoding:
# 16 MP is 48 MB as decoded RGB. `mimpipe shard` caps images at 4 MP by default
# (tools/shard.py DEFAULT_MAX_PIXELS), so every default-sharded sample passes with 4x headroom for
# datasets sharded with a larger --max-pixels; what lies beyond is a dataset no trainer should
# decode by accident (8 images of 144 MP took a trainer to 3 GB).
MAX_DECODE_PIXELS = 16 * 1024 * 1024

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HW_DECODER_LOAD = 0.65   # DALI's default share of JPEGs for the A100/H100 hardware decoder


class DecodeError(RuntimeError):
    """A sample that does not decode; the message names shard, key and cause."""


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - device_constant(IMAGENET_MEAN, x.device)) / device_constant(IMAGENET_STD, x.device)


def finish(x01: torch.Tensor, color: np.ndarray) -> torch.Tensor:
    """[0, 1] images of a color view -> augmented, normalized."""
    return normalize(color_augment(x01, color))


@dataclass
class Decoded:
    """One batch out of a decoder. views: [B, 3, S, S] per view; slot: the recycled tensors they
    live in (None: fresh tensors); ready: on a GPU, the event recorded on the decoder's stream
    after the batch's last kernel (the consumer's stream waits on it, loader.py)."""
    views: list[torch.Tensor]
    slot: "Slot | None" = None
    ready: "torch.cuda.Event | None" = None


@dataclass
class Slot:
    tensors: list[torch.Tensor]
    released: "torch.cuda.Event | None" = None   # recorded on the consumer's stream at release


class OutputRing:
    """Output tensors recycled as DALIGenericIterator recycles its own: a fresh 38 MB CPU tensor
    per batch costs ~20 ms of page faults, more than the copy into it (~4 ms). A slot is taken
    again only after the consumer has released its batch (loader.py), and on a GPU the decoder's
    stream first waits for the event recorded on the consumer's stream at that release, so no
    copy overwrites what the consumer's queued kernels may still read. The ring grows when every
    slot is out (the loader keeps about prefetch + 3 out at once)."""

    def __init__(self, shape: tuple[int, ...], n_views: int, device: torch.device):
        self.shape, self.n_views, self.device = shape, n_views, device
        self._free: deque[Slot] = deque()   # appended by the consumer, taken by the producer

    def take(self, stream: "torch.cuda.Stream | None") -> Slot:
        if not self._free:
            # host sync: on a GPU, the cudaMalloc behind a new slot may synchronize the device;
            # it happens for the first few batches only (and when the ring grows)
            return Slot([torch.empty(self.shape, device=self.device) for _ in range(self.n_views)])
        slot = self._free.popleft()
        if slot.released is not None:
            stream.wait_event(slot.released)   # queued on the GPU, no host sync
        return slot

    def give_back(self, slot: Slot, released: "torch.cuda.Event | None") -> None:
        slot.released = released
        self._free.append(slot)


class PilDecoder:
    """PIL on a thread pool (PIL releases the GIL while decoding and resizing); one batch in
    flight, decoded when collected."""
    depth = 1
    device = torch.device("cpu")

    def __init__(self, img_size: int, n_views: int = 1, color_views=(), *, threads: int = 2,
                 interpolation: str = "bicubic", **_):
        self.size, self.color_views = img_size, set(color_views)
        self.resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[interpolation]
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="mimpipe-pil")
        self._queued: deque = deque()

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

    def submit(self, encoded: list[np.ndarray], views) -> None:
        self._queued.append((encoded, views))

    def collect(self) -> Decoded:
        encoded, views = self._queued.popleft()
        out = []
        for i, v in enumerate(views):
            arr = np.stack(list(self.pool.map(self.decode_one, encoded, v.crop, v.flip)))
            x01 = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)
            out.append(finish(x01, v.color) if i in self.color_views else normalize(x01))
        return Decoded(out)

    def release(self, decoded: Decoded, *, used: bool = True) -> None:
        pass   # fresh tensors: nothing to recycle

    def discard(self) -> None:
        self._queued.clear()


class DaliDecoder:
    """A DALI pipeline fed by external_source; one graph decodes all views of a batch, on DALI's
    pipelined (dynamic) executor with `depth` batches in flight (prefetch_queue_depth).

    On a GPU the decoder works on its own CUDA stream: DALI's outputs are bound to it, the copy
    into the recycled tensors and the colour views run on it, and each batch carries an event
    recorded there; nothing in submit/collect waits for the GPU on the host."""

    def __init__(self, img_size: int, n_views: int = 1, color_views=(), *, batch_size: int,
                 threads: int = 2, interpolation: str = "bicubic", device: str = "auto",
                 device_id: int | None = None, prefetch: int = 2,
                 hw_decoder_load: float = HW_DECODER_LOAD):
        self.size, self.n_views, self.color_views = img_size, n_views, set(color_views)
        self.interpolation, self.batch_size, self.threads = interpolation, batch_size, threads
        self.depth, self.hw_decoder_load = prefetch, hw_decoder_load
        gpu = torch.cuda.is_available() if device == "auto" else device == "gpu"
        self.device_id = (device_id if device_id is not None else torch.cuda.current_device()) if gpu else None
        self.device = torch.device("cuda", self.device_id) if gpu else torch.device("cpu")
        self.stream = torch.cuda.Stream(self.device) if gpu else None
        self.ring = OutputRing((batch_size, 3, img_size, img_size), n_views, self.device)
        self._last = None   # (encoded, views) of the last batch submitted: the padding
        self.pipe = self._build()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types
        # the views of each batch submitted and not yet collected, oldest first; None marks a
        # padding batch, whose outputs are dropped (see collect)
        self._queued: deque = deque()
        self._started = False

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id,
                      prefetch_queue_depth=self.depth, exec_pipelined=True, exec_async=True,
                      exec_dynamic=True)
        def graph():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            outs = []
            for v in range(self.n_views):
                anchor = fn.external_source(name=f"anchor{v}", dtype=types.FLOAT, ndim=1)
                shape = fn.external_source(name=f"shape{v}", dtype=types.FLOAT, ndim=1)
                flip = fn.external_source(name=f"flip{v}", dtype=types.INT32, ndim=0)
                img = fn.decoders.image_slice(
                    jpegs, anchor, shape, axis_names="WH", normalized_anchor=False,
                    normalized_shape=False, output_type=types.RGB, hw_decoder_load=self.hw_decoder_load,
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

    def submit(self, encoded: list[np.ndarray], views) -> None:
        self._last = (encoded, views)
        self._feed(encoded, views, views)

    def _feed(self, encoded, views, queued) -> None:
        # external_source copies what it is fed; each run takes the oldest feed
        self.pipe.feed_input("jpegs", encoded)
        for i, v in enumerate(views):
            self.pipe.feed_input(f"anchor{i}", v.crop[:, :2].astype(np.float32))
            self.pipe.feed_input(f"shape{i}", v.crop[:, 2:].astype(np.float32))
            self.pipe.feed_input(f"flip{i}", v.flip.astype(np.int32))
        self._queued.append(queued)
        try:
            if self._started:
                self.pipe.schedule_run()
            elif len(self._queued) == self.depth:
                # the first schedule_run starts `depth` runs at once (Pipeline._prefetch): it
                # waits until that many batches are fed
                self.pipe.schedule_run()
                self._started = True
        except RuntimeError as e:
            self._failed(e)

    def _outputs(self):
        """The oldest run's outputs and the views it was fed with (None: padding)."""
        while not self._started:
            # fewer than `depth` batches fed since the build (a short epoch): pad with copies of
            # the last one to start DALI; their outputs are dropped when they come out
            self._feed(*self._last, None)
        views = self._queued.popleft()
        try:
            # host sync: DALI's CPU stage of this run (on the CPU: all of it); on a GPU the
            # outputs are bound to our stream, ordered there, their GPU work not waited for
            return self.pipe.outputs(cuda_stream=self.stream) if self.stream else self.pipe.outputs(), views
        except RuntimeError as e:
            self._failed(e)

    def collect(self) -> Decoded:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        outs, views = self._outputs()
        while views is None:
            outs, views = self._outputs()
        with torch.cuda.stream(self.stream):   # a no-op on the CPU (stream None)
            slot = self.ring.take(self.stream)
            result = []
            for i, (out, t, v) in enumerate(zip(outs, slot.tensors, views)):
                t = t[:len(out)]
                # one copy out of DALI's output, as DALIGenericIterator makes it: on the current
                # stream of the named device (ours), non-blocking; DALI orders it after the
                # outputs are ready and frees them only after it
                feed_ndarray(out.as_tensor(), t, cuda_stream=self.stream)
                result.append(finish(t, v.color) if i in self.color_views else t)
            ready = None
            if self.stream is not None:
                ready = torch.cuda.Event()
                ready.record(self.stream)
        return Decoded(result, slot, ready)

    def release(self, decoded: Decoded, *, used: bool = True) -> None:
        """Give a batch's tensors back. used: the consumer was handed the batch; on a GPU an event
        on its current stream then marks the end of every kernel it queued on them (loader.py
        releases a batch once the consumer has asked for the batch after the next)."""
        released = None
        if used and self.stream is not None:
            released = torch.cuda.Event()
            released.record(torch.cuda.current_stream(self.device))
        self.ring.give_back(decoded.slot, released)

    def discard(self) -> None:
        """Drop every batch submitted and not collected (an epoch stopped early), so that the
        next collect returns the next batch submitted."""
        try:
            while self._queued:
                self._outputs()
        except DecodeError:
            pass   # rebuilt: nothing is in flight any more

    def _failed(self, e: RuntimeError):
        self.pipe = self._build()   # a failed run may leave the pipeline unusable
        raise DecodeError(str(e)) from e


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
