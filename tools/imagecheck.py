"""Validate one input image and decide what goes into the shard.

An RGB JPEG that decodes completely is stored byte for byte (re-encoding would cost quality and
time for nothing). Everything else a decoder downstream might trip over (PNG, CMYK, grayscale,
16-bit, palette, EXIF-rotated, other formats) becomes an RGB JPEG at quality 95, and so does an
image larger than the caps (`max_side` px on its longer side, `max_pixels` in all), downscaled to
fit them. Empty, truncated, corrupt and non-image inputs raise BadImage with the reason that goes
into the report.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

QUALITY = 95
EXIF_ORIENTATION = 0x0112


class BadImage(ValueError):
    """An input that cannot be stored; str(e) is the reason written to report.json."""


@dataclass(frozen=True)
class Checked:
    data: bytes          # what goes into KEY.jpg
    width: int           # of the source image, as stored in the file
    height: int
    stored: tuple[int, int]   # (width, height) of `data`
    converted: bool      # re-encoded (format/mode/orientation) or downscaled
    why: str             # what conversion happened, '' if stored as is


def fit_size(width: int, height: int, max_side: int | None, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, until the longer side is at most max_side and
    width x height at most max_pixels (unchanged if it already fits)."""
    s = 1.0
    if max_side is not None and max(width, height) > max_side:
        s = max_side / max(width, height)
    if max_pixels is not None and width * height > max_pixels:
        s = min(s, math.sqrt(max_pixels / (width * height)))
    if s >= 1.0:
        return width, height
    w, h = max(1, round(width * s)), max(1, round(height * s))
    if max_pixels is not None and w * h > max_pixels:   # rounding up crossed the cap
        w, h = max(1, math.floor(width * s)), max(1, math.floor(height * s))
        if w * h > max_pixels:   # a side clamped to 1 px: a sliver of an image
            w, h = (max(1, max_pixels // h), h) if w >= h else (w, max(1, max_pixels // w))
    if max_side is not None:
        w, h = min(w, max_side), min(h, max_side)
    return w, h


def check_image(raw: bytes, *, max_side: int | None = None, max_pixels: int | None = None) -> Checked:
    if not raw:
        raise BadImage("empty file")
    fmt, reasons = None, []
    try:
        im = Image.open(io.BytesIO(raw))
        fmt, (width, height) = im.format, im.size
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        rotated = orientation not in (0, 1)
        target = fit_size(width, height, max_side, max_pixels)
        reasons = [r for r, bad in (
            (f"format {fmt}", fmt != "JPEG"), (f"mode {im.mode}", im.mode != "RGB"),
            ("EXIF orientation", rotated),
            (f"longer side over {max_side} px", max_side is not None and max(width, height) > max_side),
            (f"over {max_pixels} pixels", max_pixels is not None and width * height > max_pixels))
            if bad]
        if not reasons:
            # a JPEG stored as is needs no pixels, only proof that every entropy-coded byte
            # decodes: libjpeg's 1/8 scaled decode reads them all at a fraction of the IDCT cost
            im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        elif target != (width, height) and fmt == "JPEG":
            # downscaling a JPEG: decode at the smallest DCT scale still >= the target (a 144 MP
            # photo is never held at full size); it still reads every entropy-coded byte
            im.draft(None, target)
        im.load()   # Image.open alone does not notice truncation
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognized format)") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large to decode safely: {e}") from None
    except Exception as e:  # noqa: BLE001 - hostile files make PIL raise anything (struct.error, ...)
        raise BadImage(f"corrupt or truncated {fmt or 'image'}: {type(e).__name__}: {e}") from None
    if not reasons:
        return Checked(raw, width, height, (width, height), False, "")
    im = _to_rgb(ImageOps.exif_transpose(im) if rotated else im)
    if target != (width, height):   # target is in source orientation; both caps ignore rotation
        # EXIF orientations 5-8 turn the image a quarter: its sides swap
        im = im.resize(target[::-1] if orientation in (5, 6, 7, 8) else target, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=QUALITY)
    return Checked(out.getvalue(), width, height, im.size, True, ", ".join(reasons))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's convert('RGB') clips 16-bit values at 255; scale to 8 bit first
        a = np.asarray(im, dtype=np.int64)
        im = Image.fromarray((a >> 8 if a.max() > 255 else a).clip(0, 255).astype(np.uint8))
    return im.convert("RGB")
