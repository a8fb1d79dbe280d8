"""The ``"open-vocabulary-segmentation"`` pipeline: any image, any class names, one mask per class present.

    from transformers import pipeline
    import opentrans_hf  # registers the task and the Auto classes
    pipe = pipeline("open-vocabulary-segmentation", model="runs/demo/train/model")
    pipe("photo.jpg", candidate_labels=["sky", "road|street", "car"])
    # [{"label": "sky", "score": None, "mask": <PIL.Image mode=L>}, ...]

transformers has no pipeline for this: its ``image-segmentation`` pipeline has a fixed label set, and its
zero-shot pipelines (``zero-shot-image-classification``, ``zero-shot-object-detection``) take
``candidate_labels``. This one takes ``candidate_labels`` too and returns what ``image-segmentation`` returns
for semantic segmentation: per image a list of ``{"label", "score", "mask"}``, one entry per class present,
the mask a PIL ``"L"`` image (255 = the class) at the image's own size; ``score`` is None, as transformers
gives it for semantic segmentation.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, Pipeline
from transformers.image_utils import load_image as load_url_image
from transformers.pipelines import PIPELINE_REGISTRY

from opentrans_hf.data.transforms import load_image
from opentrans_hf.models.classifier import check_class_names, display_name
from opentrans_hf.models.modeling_ovs import OVSPreTrainedModel, default_sliding_stride
from opentrans_hf.models.processing_ovs import OVSProcessor, parse_class_entry
from opentrans_hf.utils.modules import eval_mode

TASK = "open-vocabulary-segmentation"
VOID = -1
"""The value of void pixels in the label maps ``return_label_map=True`` gives (with ``allow_void=True``)."""


class OpenVocabularySegmentationPipeline(Pipeline):
    r"""Open-vocabulary semantic segmentation with an opentrans-hf OVS model (DeepLabV3-, Mask2Former- or
    FC-CLIP-style).

    ``pipe(images, candidate_labels=[...], **options)``; ``images``: one or a list of image paths, http(s) URLs,
    PIL images (any mode: grey, RGBA, palette, 16-bit) or arrays. ``candidate_labels``: the classes, each a
    name, a tuple of synonyms or a ``"road|street"`` string (synonyms; the class scores by the best of its
    names and is reported under its first).

    Options: ``allow_void`` (False: every pixel gets a class; True: pixels the model's void embedding wins get
    no class), ``sliding_window`` (True: resize the image so its shorter side is ``shortest_edge``, default the
    model's input size, and run windows of the model's input size every ``stride`` pixels, default 2/3 of it,
    averaging the scores: the field's protocol for large images), ``return_label_map`` (True: return the
    ``(H, W)`` int64 label map per image instead of masks; values index ``candidate_labels``, void = -1),
    ``timeout`` (for URLs). ``batch_size`` / ``device`` / ``dtype`` as for every pipeline.
    """

    # the model brings its processor (the tokenizer and image processor its from_pretrained loaded, the prompt
    # templates of its config), so a directory saved before processors were saved works too
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, OVSPreTrainedModel):
            raise ValueError(f"the {TASK} pipeline needs an opentrans-hf OVS model, got {type(self.model).__name__}")
        if not isinstance(self.processor, OVSProcessor):
            self.processor = self.model.processor
        self.image_processor = self.processor.image_processor
        self.tokenizer = self.processor.tokenizer

    def __call__(self, inputs=None, candidate_labels=None, **kwargs):
        if "images" in kwargs:
            inputs = kwargs.pop("images")
        if inputs is None:
            raise ValueError(f"the {TASK} pipeline needs images")
        if candidate_labels is None:
            raise ValueError(f"the {TASK} pipeline needs candidate_labels=[...] (the class names to segment into)")
        if kwargs.get("sliding_window"):
            kwargs["batch_size"] = 1  # images of different shapes; the windows of one image are batched inside
        return super().__call__(inputs, candidate_labels=candidate_labels, **kwargs)

    def _sanitize_parameters(self, candidate_labels=None, allow_void=None, sliding_window=None, shortest_edge=None,
                             stride=None, return_label_map=None, timeout=None, **kwargs):
        preprocess, forward, post = {}, {}, {}
        if timeout is not None:
            preprocess["timeout"] = timeout
        if sliding_window is not None:
            preprocess["sliding_window"] = forward["sliding_window"] = bool(sliding_window)
        if shortest_edge is not None:
            preprocess["shortest_edge"] = int(shortest_edge)
        if stride is not None:
            forward["stride"] = int(stride)
        if candidate_labels is not None:
            if isinstance(candidate_labels, str):
                candidate_labels = [c for c in candidate_labels.split(",")]
            classes = check_class_names([parse_class_entry(c) for c in candidate_labels])
            forward["classes"] = classes
            post["names"] = [display_name(c) for c in classes]
        if allow_void is not None:
            post["allow_void"] = bool(allow_void)
        if return_label_map is not None:
            post["return_label_map"] = bool(return_label_map)
        return preprocess, forward, post

    def preprocess(self, image, timeout=None, sliding_window: bool = False, shortest_edge: int | None = None):
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            image = load_url_image(image, timeout=timeout)
        image = load_image(image)  # RGB as meant to be seen: EXIF orientation, transparency over white, 16-bit
        size = None
        if sliding_window:
            size = {"shortest_edge": int(shortest_edge or self.model.config.image_size)}
        inputs = self.image_processor(image, size=size, return_tensors="pt")
        inputs["target_size"] = torch.tensor([[image.height, image.width]])
        return inputs

    def _class_inputs(self, classes) -> dict:
        """The classes' tensors: tokenized once per class list; their embeddings come from the model, whose
        cache serves them while its text tower is unchanged."""
        key = (tuple(classes), tuple(self.processor.prompt_templates), self.processor.name_aggregation)
        if getattr(self, "_tokens_key", None) != key:
            self._tokens, self._tokens_key = self.processor.encode_classes(classes), key
        enc = self._tokens
        device, _ = self.model.device_and_dtype()
        text, seen = self.model.encode_classes(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                               class_ids=enc["class_ids"], seen_classes=enc.get("seen_classes"))
        return {"class_embeddings": text.to(device), "seen_classes": None if seen is None else seen.to(device)}

    def _forward(self, model_inputs, classes=None, sliding_window: bool = False, stride: int | None = None):
        if classes is None:
            raise ValueError(f"the {TASK} pipeline needs candidate_labels=[...]")
        target = model_inputs.pop("target_size")
        _, dtype = self.model.device_and_dtype()
        pixels = model_inputs["pixel_values"].to(dtype)
        with eval_mode(self.model):
            class_inputs = self._class_inputs(classes)
            if sliding_window:
                window = self.model.config.image_size
                logits = torch.stack([self.model.sliding_scores(x, window=window,
                                                                stride=stride or default_sliding_stride(window),
                                                                **class_inputs) for x in pixels])
            else:
                out = self.model(pixel_values=pixels, **class_inputs)
                logits = self.model.semantic_scores(out, len(classes))
        return {"logits": logits, "target_size": target, "num_classes": torch.full((logits.shape[0],), len(classes))}

    def postprocess(self, model_outputs, names=None, allow_void: bool = False, return_label_map: bool = False):
        logits = model_outputs["logits"]
        k = int(model_outputs["num_classes"].reshape(-1)[0])
        sizes = [tuple(int(v) for v in hw) for hw in model_outputs["target_size"].reshape(-1, 2)]
        label_map = self.image_processor.post_process_semantic_segmentation(
            {"logits": logits.float()}, sizes, allow_void=allow_void, void_label=VOID, num_classes=k)[0].cpu()
        if return_label_map:
            return label_map
        segmentation = label_map.numpy()
        annotation = []
        for value in np.unique(segmentation):
            if value == VOID:
                continue
            mask = Image.fromarray(((segmentation == value) * 255).astype(np.uint8), mode="L")
            annotation.append({"score": None, "label": names[int(value)], "mask": mask})
        return annotation


def segmentation_pipeline(model, *, device=None, batch_size: int = 1) -> OpenVocabularySegmentationPipeline:
    """The pipeline around a loaded OVS model (its processor as it is now: templates set with
    ``set_prompt_templates`` included), on the model's device unless ``device`` says otherwise."""
    device = next(model.parameters()).device if device is None else device
    return OpenVocabularySegmentationPipeline(model=model, processor=model.processor, task=TASK, device=device,
                                              batch_size=batch_size)


def register_pipeline() -> None:
    """Register the ``"open-vocabulary-segmentation"`` task with transformers' ``pipeline()`` (idempotent)."""
    if TASK not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=OpenVocabularySegmentationPipeline, pt_model=AutoModel,
                                            type="multimodal")
