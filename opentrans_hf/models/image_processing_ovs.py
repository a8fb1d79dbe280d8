"""The image processor of every OVS framework: images of any size and mode -> ``pixel_values``, label maps ->
``labels``, model outputs -> one label map per image (``post_process_semantic_segmentation``).

It follows transformers' ``CLIPImageProcessor`` / ``Mask2FormerImageProcessor`` conventions (``do_resize``,
``size``, ``resample``, ``do_rescale``, ``do_normalize``, ``image_mean`` / ``image_std``, ``do_convert_rgb``,
``do_reduce_labels``, ``ignore_index``) and is saved as ``preprocessor_config.json`` beside every model, so
``AutoImageProcessor.from_pretrained(model_dir)`` gives it back. The resizing, conversion and normalisation are
the data layer's (:mod:`opentrans_hf.data.transforms`): training, evaluation, ``model.predict`` and the
pipeline share one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor, get_size_dict
from transformers.image_utils import PILImageResampling, load_image

from opentrans_hf.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    normalize,
    resize_image,
    resize_labels,
    shortest_side_size,
    to_image_tensor,
    to_label_tensor,
)

_RESAMPLE = {PILImageResampling.NEAREST: "nearest", PILImageResampling.BILINEAR: "bilinear",
             PILImageResampling.BICUBIC: "bicubic"}
SCORE_CHUNK_ELEMENTS = 1 << 26
"""Upsampled class scores are computed this many floats at a time (256 MiB), a chunk of classes after another,
so a large image with many classes never holds ``K x H x W`` floats at once."""


class OVSImageProcessor(BaseImageProcessor):
    r"""Pre- and post-processing of images for the OVS frameworks.

    Args:
        do_resize: resize images (and label maps) to ``size``.
        size: ``{"height": h, "width": w}`` (the default, the model's square input, ``config.image_size``), or
            ``{"shortest_edge": s}`` with an optional ``"longest_edge"`` (aspect ratio kept; the field's
            evaluation resize, detectron2's ``ResizeShortestEdge``). An int ``n`` means ``n x n``.
        resample: ``PILImageResampling`` filter: BILINEAR (default) or BICUBIC, both antialiased as PIL's; NEAREST.
        do_rescale: scale integer pixel values by ``rescale_factor`` (1/255); float inputs are taken as
            already in [0, 1].
        do_normalize: subtract ``image_mean`` and divide by ``image_std`` (CLIP's by default).
        do_convert_rgb: turn every image into RGB first: grey, palette, RGBA (composited over white) and
            16-bit grey (``I;16``, scaled to 8 bits) inputs work. Without it an input must already be RGB.
        do_reduce_labels: label 0 becomes ``ignore_index`` and the others are shifted down by one (ADE20K's
            convention; also what the ``reduce_labels`` of transformers' segmentation processors does).
        ignore_index: the label value losses and metrics skip, and the value void pixels get in
            ``post_process_semantic_segmentation(..., allow_void=True)``.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, do_resize: bool = True, size: dict | int | None = None,
                 resample: int = PILImageResampling.BILINEAR, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, do_convert_rgb: bool = True, do_reduce_labels: bool = False,
                 ignore_index: int = 255, **kwargs):
        kwargs.pop("reduce_labels", None)  # transformers' older name, never silently different
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.size = _size_dict(size if size is not None else 224)
        self.resample = PILImageResampling(resample)
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be NEAREST, BILINEAR or BICUBIC, got {self.resample!r}")
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean if image_mean is not None else CLIP_MEAN)
        self.image_std = list(image_std if image_std is not None else CLIP_STD)
        self.do_convert_rgb = do_convert_rgb
        self.do_reduce_labels = do_reduce_labels
        self.ignore_index = int(ignore_index)

    @classmethod
    def from_model_config(cls, config, **kwargs) -> OVSImageProcessor:
        """The processor of a framework's config: its square input size and ignore index (CLIP's mean/std
        unless given)."""
        kwargs.setdefault("size", {"height": config.image_size, "width": config.image_size})
        kwargs.setdefault("ignore_index", config.ignore_index)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["resample"] = int(self.resample)
        return out

    # ----- pre-processing --------------------------------------------------------------------------
    def __call__(self, images, segmentation_maps=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, segmentation_maps=segmentation_maps, **kwargs)

    def preprocess(self, images, segmentation_maps=None, *, do_resize: bool | None = None, size=None,
                   resample=None, do_rescale: bool | None = None, do_normalize: bool | None = None,
                   image_mean=None, image_std=None, do_convert_rgb: bool | None = None,
                   do_reduce_labels: bool | None = None, return_tensors=None, **unused) -> BatchFeature:
        """``images``: one image or a list (PIL of any mode, ``(H, W[, C])`` / ``(C, H, W)`` arrays, uint8 or
        16-bit or float in [0, 1], tensors, file paths or URLs). ``segmentation_maps``: their label maps
        (PIL L/P/I, arrays, tensors), converted (``do_reduce_labels``, ``ignore_index``) and resized with the
        images (nearest). Returns ``pixel_values`` ``(B, 3, H, W)`` (and ``labels`` ``(B, H, W)`` int64);
        with a ``shortest_edge`` size images of different shapes come back as a list of ``(3, H, W)``
        tensors (``return_tensors="pt"`` then needs one image, or images of one shape)."""
        if unused:
            raise TypeError(f"OVSImageProcessor.preprocess got unexpected arguments {sorted(unused)}")
        opts = dict(do_resize=self.do_resize if do_resize is None else do_resize,
                    size=self.size if size is None else _size_dict(size),
                    resample=_RESAMPLE[PILImageResampling(self.resample if resample is None else resample)],
                    do_rescale=self.do_rescale if do_rescale is None else do_rescale,
                    do_normalize=self.do_normalize if do_normalize is None else do_normalize,
                    image_mean=self.image_mean if image_mean is None else image_mean,
                    image_std=self.image_std if image_std is None else image_std,
                    do_convert_rgb=self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb)
        reduce = self.do_reduce_labels if do_reduce_labels is None else do_reduce_labels
        images = _as_list(images)
        if not images:
            raise ValueError("no images given")
        maps = None if segmentation_maps is None else _as_list(segmentation_maps)
        if maps is not None and len(maps) != len(images):
            raise ValueError(f"{len(images)} images but {len(maps)} segmentation maps")
        pixels, labels = [], []
        for i, image in enumerate(images):
            try:
                x = self._image(image, opts)
                pixels.append(self._transform(x, opts))
                if maps is not None:
                    labels.append(self._labels(maps[i], tuple(x.shape[-2:]), tuple(pixels[-1].shape[-2:]), reduce))
            except ValueError as err:
                raise ValueError(f"images[{i}]: {err}") from err
        data = {"pixel_values": _stack_if_same(pixels)}
        if maps is not None:
            data["labels"] = _stack_if_same(labels)
        stacked = all(isinstance(v, torch.Tensor) for v in data.values())
        if return_tensors is not None and not stacked:
            raise ValueError("images resized to different shapes cannot be returned as one tensor: process them one "
                             "at a time, or use a square size")
        return BatchFeature(data=data, tensor_type=return_tensors if stacked else None)

    def _image(self, image, opts) -> torch.Tensor:
        if isinstance(image, str):
            image = load_image(image)  # a local path or an http(s) URL, as transformers' processors take
        if not opts["do_convert_rgb"] and getattr(image, "mode", "RGB") != "RGB":
            raise ValueError(f"the image is PIL mode {image.mode!r} and do_convert_rgb=False: convert it to RGB")
        x = to_image_tensor(image)
        if not opts["do_rescale"] and not (isinstance(image, torch.Tensor) and image.is_floating_point()):
            x = x * 255.0  # keep the raw integer scale
        elif opts["do_rescale"] and self.rescale_factor != 1 / 255 and not (
                isinstance(image, torch.Tensor) and image.is_floating_point()):
            x = x * (255.0 * self.rescale_factor)
        return x

    def target_size(self, hw: tuple[int, int], size: dict | None = None) -> tuple[int, int]:
        """The (h, w) an image of size ``hw`` is resized to."""
        size = self.size if size is None else _size_dict(size)
        if "height" in size:
            return int(size["height"]), int(size["width"])
        return shortest_side_size(hw, int(size["shortest_edge"]), size.get("longest_edge"))

    def _transform(self, x: torch.Tensor, opts) -> torch.Tensor:
        if opts["do_resize"]:
            x = resize_image(x, self.target_size(tuple(x.shape[-2:]), opts["size"]), opts["resample"])
        if opts["do_normalize"]:
            x = normalize(x, opts["image_mean"], opts["image_std"])
        return x.contiguous()

    def _labels(self, label, image_hw, out_hw, reduce: bool) -> torch.Tensor:
        lab = to_label_tensor(label)
        if tuple(lab.shape) != tuple(image_hw):
            raise ValueError(f"the image is {tuple(image_hw)} but its label map is {tuple(lab.shape)}")
        lab = self.convert_labels(lab, reduce)
        return resize_labels(lab, out_hw)

    def convert_labels(self, labels: torch.Tensor, reduce: bool | None = None) -> torch.Tensor:
        """A dataset's label values -> training labels (``do_reduce_labels``: 0 -> ``ignore_index``, others - 1)."""
        reduce = self.do_reduce_labels if reduce is None else reduce
        if not reduce:
            return labels
        void = (labels == 0) | (labels == self.ignore_index)
        return torch.where(void, self.ignore_index, labels - 1)

    # ----- post-processing -------------------------------------------------------------------------
    def post_process_semantic_segmentation(self, outputs, target_sizes=None, *, allow_void: bool = False,
                                           void_label: int | None = None,
                                           num_classes: int | None = None) -> list[torch.Tensor]:
        """One ``(H, W)`` int64 label map per image of a forward's ``outputs`` (values index the classes the
        forward was given), as transformers' Mask2Former image processor returns them: the class scores
        (``outputs.logits``, ``(B, K[+1], h, w)``) are upsampled bilinearly to ``target_sizes[i]`` (an
        ``(H, W)`` per image; default: the model's input size) and the best class taken per pixel.

        ``allow_void=False`` (default): every pixel gets one of the K classes. ``True``: a model with a void
        embedding (a (K+1)-th score channel) leaves the pixels it wins at ``void_label`` (default
        ``ignore_index``). ``num_classes``:
        K, when ``outputs`` carries no ``text_embeddings`` (e.g. a tuple's logits)."""
        logits = outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", outputs)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
            raise ValueError("outputs must carry logits of shape (batch, classes, height, width)")
        text = outputs.get("text_embeddings") if isinstance(outputs, dict) else getattr(outputs, "text_embeddings", None)
        k = int(num_classes if num_classes is not None else text.shape[0] if text is not None else logits.shape[1])
        if not 1 <= k <= logits.shape[1]:
            raise ValueError(f"num_classes {k} does not fit logits with {logits.shape[1]} channels")
        if target_sizes is not None and len(target_sizes) != logits.shape[0]:
            raise ValueError(f"{len(target_sizes)} target sizes for a batch of {logits.shape[0]}")
        out = []
        for b in range(logits.shape[0]):
            hw = tuple(int(v) for v in target_sizes[b]) if target_sizes is not None else tuple(logits.shape[-2:])
            out.append(self.label_map(logits[b], hw, k, allow_void, void_label))
        return out

    def label_map(self, scores: torch.Tensor, size: tuple[int, int], num_classes: int, allow_void: bool = False,
                  void_label: int | None = None):
        """``(K[+1], h, w)`` scores of one image -> the ``size`` (H, W) int64 label map (bilinear upsampling
        of the scores, then argmax; classes processed in chunks so memory stays bounded)."""
        scores = scores if allow_void else scores[:num_classes]
        if tuple(scores.shape[-2:]) == tuple(size):
            pred = scores.argmax(0)
        else:
            chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, size[0] * size[1]))
            best = pred = None
            for c in range(0, scores.shape[0], chunk):
                up = torch.nn.functional.interpolate(scores[None, c : c + chunk].float(), size=size, mode="bilinear",
                                                     align_corners=False)[0]
                value, index = up.max(0)
                if best is None:
                    best, pred = value, index
                else:
                    better = value > best
                    best = torch.where(better, value, best)
                    pred = torch.where(better, index + c, pred)
        if scores.shape[0] > num_classes:
            pred = torch.where(pred >= num_classes, self.ignore_index if void_label is None else void_label, pred)
        return pred.long()


def _size_dict(size) -> dict:
    if isinstance(size, dict) and "shortest_edge" in size:
        out = {"shortest_edge": int(size["shortest_edge"])}
        if size.get("longest_edge") is not None:
            out["longest_edge"] = int(size["longest_edge"])
        return out
    return dict(get_size_dict(size, default_to_square=True))


def _as_list(x) -> list:
    if isinstance(x, (list, tuple)):
        return list(x)
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return list(x)
    return [x]


def _stack_if_same(tensors: list[torch.Tensor]):
    if len({tuple(t.shape) for t in tensors}) == 1:
        return torch.stack(tensors)
    return tensors
