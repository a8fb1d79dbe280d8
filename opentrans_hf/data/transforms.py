"""Segmentation transforms in plain torch (no torchvision): resize, random scale + crop, flip, CLIP
normalisation, label reduction and label validation."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EVAL_RESIZE_MODES = ("square", "shortest_side")


def to_rgb(im) -> "Image.Image":
    """A PIL image of any mode -> RGB as it is meant to be seen: transparent parts composited over white,
    16/32-bit grey (``I;16``, ``I``, ``F``) scaled to 8 bits (by 65535 when a value exceeds 255), palette
    and grey images converted."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def array_to_rgb(image) -> "Image.Image":
    """An in-memory image that is not PIL -> an RGB PIL image: ``(H, W)``, ``(H, W, 1|3|4)`` or channels-first
    ``(1|3|4, H, W)`` arrays (or tensors); uint8 as is, 16-bit grey scaled to 8 bits, floats in [0, 1] times
    255; four channels are RGBA (composited over white)."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"an image must be (H, W), (H, W, 3) or (H, W, 4) (or channels first), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"the image is empty (shape {arr.shape})")
    if arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.max(initial=0) > 255):
        if arr.ndim != 2:
            raise ValueError(f"a 16-bit image must be grey (H, W), got shape {arr.shape}")
        return to_rgb(Image.fromarray(arr.astype(np.int32), mode="I"))
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        scale = 255.0 if arr.dtype.kind == "f" and arr.max(initial=0) <= 1.0 else 1.0
        arr = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
    return to_rgb(Image.fromarray(arr))


def load_image(image) -> "Image.Image":
    """An image file (path) or an in-memory image -> an RGB PIL image as it is meant to be seen: EXIF
    orientation applied, transparency composited over white, 16-bit grey scaled to 8 bits. A file that
    cannot be read fully (missing, not an image, truncated) is a ``ValueError`` naming it."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            with Image.open(path) as im:
                im.load()  # decode everything now: a truncated file fails here, not halfway through the job
                rgb = to_rgb(ImageOps.exif_transpose(im))
                return rgb.copy() if rgb is im else rgb  # independent of the file, which closes here
        except FileNotFoundError:
            raise ValueError(f"image {path}: no such file") from None
        except IsADirectoryError:
            raise ValueError(f"image {path}: is a directory, not an image file") from None
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
            reason = "not an image PIL can read" if type(err).__name__ == "UnidentifiedImageError" else str(err).strip()
            raise ValueError(f"image {path} cannot be read: {reason or type(err).__name__}") from None
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    return array_to_rgb(image)


def to_image_tensor(image) -> torch.Tensor:
    """Any image -> ``(3, H, W)`` float in [0, 1]: a ``(3, H, W)`` float tensor is taken as it is (already in
    [0, 1]); a PIL image of any mode (L, RGBA, P, I;16, ...) or an array / integer tensor goes through
    :func:`to_rgb` / :func:`array_to_rgb` (transparency over white, 16-bit grey scaled), then ``/ 255``."""
    if isinstance(image, torch.Tensor) and image.is_floating_point() and image.ndim == 3 and image.shape[0] == 3:
        return image.float()
    if isinstance(image, torch.Tensor) and image.is_floating_point() and image.ndim == 3 and image.shape[0] != 3:
        raise ValueError(f"image tensor must have shape (3, H, W), got {tuple(image.shape)}")
    rgb = to_rgb(image) if isinstance(image, Image.Image) else array_to_rgb(image)
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255.0


def resize_image(image: torch.Tensor, size: tuple[int, int], resample: str = "bilinear") -> torch.Tensor:
    """``(C, H, W)`` or ``(B, C, H, W)`` float image(s) -> ``size`` (h, w): bilinear/bicubic with antialiasing
    (as PIL resizes), or nearest."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    x = image[None] if image.dim() == 3 else image
    if resample == "nearest":
        out = F.interpolate(x, size=size, mode="nearest")
    else:
        out = F.interpolate(x, size=size, mode=resample, align_corners=False, antialias=True)
    return out[0] if image.dim() == 3 else out


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An ``(H, W)`` label map -> ``size`` (h, w), nearest neighbour, int64."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()


def normalize(image: torch.Tensor, mean, std) -> torch.Tensor:
    """``(image - mean) / std`` per channel (channels first)."""
    shape = (-1, 1, 1)
    return (image - torch.tensor(mean, dtype=image.dtype).view(shape)) / torch.tensor(std, dtype=image.dtype).view(shape)


def to_label_tensor(label) -> torch.Tensor:
    """PIL label map (mode L/P/I), ``(H, W)`` array, nested list or tensor -> ``(H, W)`` int64.

    An RGB(A)-saved label map is accepted when its colour channels are equal (each carries the class
    index); channels that differ mean a colour-coded map, which is an error naming a pixel and its value
    rather than a silent read of the red channel."""
    if isinstance(label, torch.Tensor):
        t = label
    else:
        arr = np.asarray(label)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
            rgb = arr[..., :3]
            differ = (rgb != rgb[..., :1]).any(axis=-1)
            if differ.any():
                y, x = (int(v) for v in np.argwhere(differ)[0])
                raise ValueError(
                    f"label map has {arr.shape[-1]} channels that differ (pixel ({y}, {x}) is "
                    f"{tuple(int(v) for v in arr[y, x])}): expected one class index per pixel (PIL mode L, P or I, "
                    "or RGB with equal channels); convert a colour-coded label map to class indices first")
            arr = rgb[..., 0]
        t = torch.from_numpy(np.array(arr))
    if t.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {tuple(t.shape)}")
    return t.long()


@dataclass
class SegmentationTransform:
    """Turn one ``(image, label)`` pair into ``(pixel_values (3, S, S), labels (S, S))``.

    Training: random scale in ``scale_range`` of the shorter side relative to ``size``, random
    ``size x size`` crop (padding with 0 / ``ignore_index``), random horizontal flip. Evaluation, with
    ``resize="square"`` (the default): resize image and label to ``size x size``; with
    ``resize="shortest_side"`` (the field's benchmark protocol, detectron2's ``ResizeShortestEdge``):
    resize the image so its shorter side is ``size``, keeping the aspect ratio, the longer side capped
    at ``max_size`` (:func:`shortest_side_size`), and return the label map at its ORIGINAL size, never
    resized (the prediction is brought back to it; see ``OVSPreTrainedModel.predict_sliding``). Images
    are bilinear, labels nearest. ``label_ignore_index``, when set, is the
    dataset's own value for unlabelled pixels, mapped to ``ignore_index`` (the value losses and metrics
    skip). ``reduce_labels`` then maps 0 to ``ignore_index`` and subtracts 1 from the others (ADE20K's
    convention). With ``num_labels`` set, a label value outside ``[0, num_labels)`` other than
    ``ignore_index`` is an error naming the example and value.
    """

    size: int
    train: bool = False
    scale_range: tuple[float, float] = (0.75, 1.5)
    flip: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    ignore_index: int = 255
    reduce_labels: bool = False
    num_labels: int | None = None
    label_ignore_index: int | None = None
    resize: str = "square"
    max_size: int | None = None

    def __post_init__(self):
        if self.resize not in EVAL_RESIZE_MODES:
            raise ValueError(f"resize must be one of {EVAL_RESIZE_MODES}, got {self.resize!r}")
        if self.resize == "shortest_side" and self.train:
            raise ValueError("resize='shortest_side' is an evaluation mode; the training transform crops size x size")
        if self.max_size is not None and self.max_size < self.size:
            raise ValueError(f"max_size {self.max_size} is smaller than the shortest side {self.size}")

    def __call__(self, image, label=None, index: int | None = None, rng: random.Random | None = None):
        rng = rng or random
        img = to_image_tensor(image)
        lab = to_label_tensor(label) if label is not None else None
        if lab is not None:
            if lab.shape != img.shape[1:]:
                raise ValueError(f"example {index}: image is {tuple(img.shape[1:])} but its label map is {tuple(lab.shape)}")
            lab = self.convert_labels(lab)
            self.check_labels(lab, index)
        if self.train:
            img, lab = self._random_scale_crop_flip(img, lab, rng)
        elif self.resize == "shortest_side":  # the label keeps its original size
            img = resize_image(img, shortest_side_size(tuple(img.shape[1:]), self.size, self.max_size))
        else:
            img = resize_image(img, (self.size, self.size))
            lab = resize_labels(lab, (self.size, self.size)) if lab is not None else None
        return normalize(img, self.mean, self.std), lab

    def convert_labels(self, lab: torch.Tensor) -> torch.Tensor:
        """The dataset's label values -> training labels: its void value and (``reduce_labels``) 0 become
        ``ignore_index``, the others are shifted down by one with ``reduce_labels``."""
        void = lab == self.ignore_index
        if self.label_ignore_index is not None:
            void |= lab == self.label_ignore_index
        if self.reduce_labels:
            void |= lab == 0
            lab = lab - 1
        return torch.where(void, self.ignore_index, lab)

    def check_labels(self, lab: torch.Tensor, index: int | None) -> None:
        if self.num_labels is None:
            return
        bad = (lab != self.ignore_index) & ((lab < 0) | (lab >= self.num_labels))
        if bool(bad.any()):
            value = int(lab[bad][0])
            raise ValueError(
                f"example {index}: label value {value} is outside the {self.num_labels} classes "
                f"[0, {self.num_labels - 1}] and is not the ignore index {self.ignore_index}"
            )

    def _random_scale_crop_flip(self, img, lab, rng):
        h, w = img.shape[1:]
        scale = rng.uniform(*self.scale_range) * self.size / min(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        img = resize_image(img, (nh, nw))
        lab = resize_labels(lab, (nh, nw)) if lab is not None else None
        ph, pw = max(0, self.size - nh), max(0, self.size - nw)
        if ph or pw:
            img = F.pad(img, (0, pw, 0, ph), value=0.0)
            if lab is not None:
                lab = F.pad(lab, (0, pw, 0, ph), value=self.ignore_index)
        top = rng.randint(0, img.shape[1] - self.size)
        left = rng.randint(0, img.shape[2] - self.size)
        img = img[:, top : top + self.size, left : left + self.size]
        lab = lab[top : top + self.size, left : left + self.size] if lab is not None else None
        if self.flip and rng.random() < 0.5:
            img = img.flip(-1)
            lab = lab.flip(-1) if lab is not None else None
        return img.contiguous(), (lab.contiguous() if lab is not None else None)


def shortest_side_size(hw: tuple[int, int], shortest_side: int, max_size: int | None = None) -> tuple[int, int]:
    """``(h, w)`` scaled so the shorter side is ``shortest_side`` (aspect ratio kept), then, if the longer
    side exceeds ``max_size``, scaled down so it is ``max_size``; rounded half up. detectron2's
    ``ResizeShortestEdge.get_output_shape`` (FC-CLIP's test resize: 800 / 1333; Cityscapes 1024 / 2560)."""
    h, w = hw
    scale = shortest_side / min(h, w)
    newh, neww = (shortest_side, scale * w) if h < w else (scale * h, shortest_side)
    if max_size is not None and max(newh, neww) > max_size:
        scale = max_size / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return max(1, int(newh + 0.5)), max(1, int(neww + 0.5))


def collate_segmentation(batch):
    """``[(pixel_values, labels), ...]`` -> ``{"pixel_values": (B, 3, S, S), "labels": (B, S, S)}``."""
    pixel_values = torch.stack([b[0] for b in batch])
    if batch[0][1] is None:
        return {"pixel_values": pixel_values}
    return {"pixel_values": pixel_values, "labels": torch.stack([b[1] for b in batch])}
