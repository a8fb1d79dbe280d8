"""What every OVS framework shares: the CLIP inside, the open-vocabulary classifier, the tokenizer,
``from_clip``, ``predict``, input checks, and save/load with the tokenizer."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, CLIPModel, PreTrainedModel
from transformers.image_processing_base import ImageProcessingMixin
from transformers import initialization as init
from transformers.utils import ModelOutput

from opentrans_hf.methods.base import CONFIG_NAME as MASK_CONFIG_NAME
from opentrans_hf.methods.sparse_mask.compact import shrink_to_structure
from opentrans_hf.methods.sparse_mask.mask import MASK_SUBFOLDER, SparseMask
from opentrans_hf.methods.sparse_mask.storage import (
    SPARSE_WEIGHTS,
    is_sparse_checkpoint,
    load_sparse_pretrained,
    save_sparse_pretrained,
)
from opentrans_hf.models.backbone import check_pixel_values
from opentrans_hf.models.classifier import OpenVocabClassifier, check_class_names, seen_class_flags
from opentrans_hf.models.configuration_ovs import OVSConfig, resolve_prompt_templates
from opentrans_hf.models.image_processing_ovs import OVSImageProcessor
from opentrans_hf.models.processing_ovs import OVSProcessor
from opentrans_hf.utils.hub import check_can_push, load_or_explain
from opentrans_hf.utils.modules import eval_mode
from opentrans_hf.utils.naming import CLIP_VISION_ENCODER_TARGETS, vision_encoder_targets

ENCODER_TARGET_MODULES = CLIP_VISION_ENCODER_TARGETS
"""``target_modules`` (a PEFT regex) selecting every Linear/Conv of the CLIP image encoder inside a
framework or a ``CLIPModel`` (anything holding the tower under ``vision_model``; a bare
``CLIPVisionModel`` in transformers 5 has no such prefix): what spectral tuning decides on."""


@dataclass
class OVSSegmentationOutput(ModelOutput):
    """Output of every framework.

    Args:
        loss: training loss (when ``labels`` are given).
        logits: ``(B, K, H, W)`` per-class scores at the input resolution (DeepLabV3: cosine logits,
            plus a void channel last when the model has a void embedding; Mask2Former/FC-CLIP: the
            semantic-inference scores sum_q p(class|q) * sigmoid(mask_q)).
        class_queries_logits: Mask2Former-style: ``(B, Q, K + 1)`` per-query class logits (void last).
        masks_queries_logits: Mask2Former-style: ``(B, Q, H/4', W/4')`` per-query mask logits.
        text_embeddings: ``(K, D)`` class text embeddings used.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    class_queries_logits: torch.Tensor | None = None
    masks_queries_logits: torch.Tensor | None = None
    text_embeddings: torch.Tensor | None = None


class OVSPreTrainedModel(PreTrainedModel):
    """Base of the OVS frameworks: ``self.clip`` is a full ``CLIPModel`` (its vision tower keeps its
    names, ``clip.vision_model.encoder.layers.N...``, so masks and spectral configs resolve) and
    ``self.classifier`` scores embeddings against class names given at call time.

    Parameters that never receive a gradient are frozen at construction (DDP's unused-parameter
    failure): the text tower when ``freeze_text_encoder``, CLIP's own logit scale, the vision
    ``post_layernorm`` and ``visual_projection`` (used, if at all, without gradient), and encoder
    layers after the last one read.
    """

    config_class = OVSConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False

    def __init__(self, config: OVSConfig, tokenizer=None, image_processor: OVSImageProcessor | None = None):
        super().__init__(config)
        self.clip = CLIPModel(config.clip)
        if getattr(config, "compact_structure", None):  # compacted (SparseMask.compact): build with its shapes
            shrink_to_structure(self.clip, config.compact_structure)
        self.classifier = OpenVocabClassifier(
            config.prompt_templates, config.clip.projection_dim, config.logit_scale_init, config.learn_void_embedding,
            name_aggregation=config.class_name_aggregation,
        )
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @property
    def processor(self) -> OVSProcessor:
        """The model's :class:`OVSProcessor` (its image processor, tokenizer, prompt templates, name aggregation
        and seen classes), as ``save_pretrained`` writes it and ``AutoProcessor.from_pretrained`` reads it."""
        return OVSProcessor.from_model_config(self.config, self.tokenizer, self.get_image_processor())

    def get_image_processor(self) -> OVSImageProcessor:
        """The model's :class:`OVSImageProcessor`: the one it was loaded or built with, else the default for
        its config (square ``image_size`` input, CLIP's mean and std)."""
        if self.image_processor is None:
            self.image_processor = OVSImageProcessor.from_model_config(self.config)
        return self.image_processor

    def get_input_embeddings(self) -> nn.Module:
        """The module that embeds the model's input, the CLIP image encoder's patch embedding (as
        ``CLIPVisionModel``'s); Accelerate's FSDP2 asks for it to shard it as a unit of its own."""
        return self.clip.vision_model.embeddings.patch_embedding

    # ----- construction ---------------------------------------------------------------------------
    def post_init(self):
        super().post_init()
        self.freeze_unused_clip_parameters()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=1.0)
        elif isinstance(module, OpenVocabClassifier):
            init.constant_(module.logit_scale, self.config.logit_scale_init)
            if module.void_embedding is not None:
                init.normal_(module.void_embedding, std=1 / math.sqrt(module.embed_dim))

    @property
    def vision_layers_used(self) -> list[int]:
        """0-based encoder layers whose output some head reads (``hidden_states`` index - 1)."""
        return sorted({i - 1 for i in self.hidden_state_indices()})

    def hidden_state_indices(self) -> list[int]:
        n = self.config.clip.vision_config.num_hidden_layers
        return [i if i > 0 else n + 1 + i for i in self.config.feature_layers]

    def encoder_target_modules(self) -> str:
        """:data:`ENCODER_TARGET_MODULES` restricted to the encoder layers the heads train through
        (layers after the last one read are frozen and must stay so under DDP)."""
        return vision_encoder_targets("|".join(str(i) for i in range(max(self.vision_layers_used) + 1)))

    def freeze_unused_clip_parameters(self) -> list[str]:
        """Freeze the CLIP parameters no head trains through; returns their names."""
        c = self.clip
        frozen = [c.logit_scale, *c.vision_model.post_layernorm.parameters(), *c.visual_projection.parameters()]
        if self.config.freeze_text_encoder:
            frozen += [*c.text_model.parameters(), *c.text_projection.parameters()]
        last = max(self.vision_layers_used)
        for layer in c.vision_model.encoder.layers[last + 1 :]:
            frozen += list(layer.parameters())
        ids = {id(p) for p in frozen}
        for p in frozen:
            p.requires_grad_(False)
        return [n for n, p in self.named_parameters() if id(p) in ids]

    @classmethod
    def from_clip(cls, clip_name_or_path: str | os.PathLike, *, revision: str | None = None, tokenizer=None,
                  token=None, **config_overrides):
        """Build the framework around a ``CLIPModel`` checkpoint (Hub id or local dir with its tokenizer);
        the heads are newly initialised, the CLIP weights are the checkpoint's."""
        name = str(clip_name_or_path)
        clip = load_or_explain(name, lambda: CLIPModel.from_pretrained(name, revision=revision, token=token,
                                                                    use_safetensors=True), "CLIP model")
        if tokenizer is None:
            tokenizer = load_or_explain(
                name, lambda: AutoTokenizer.from_pretrained(name, revision=revision, token=token), "CLIP tokenizer")
        config = cls.config_class(clip_config=clip.config.to_dict(), clip_name_or_path=name, **config_overrides)
        model = cls(config, tokenizer=tokenizer,
                    image_processor=OVSImageProcessor.from_model_config(config, **_clip_normalisation(name, revision, token)))
        missing, unexpected = model.clip.load_state_dict(clip.state_dict(), strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise ValueError(f"CLIP checkpoint {name} does not fit: missing {missing}, unexpected {unexpected}")
        model.classifier.clear_cache()
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, tokenizer=None, check_mask: bool = True, **kwargs):
        """``PreTrainedModel.from_pretrained``, plus the tokenizer saved beside the model. Weights come from
        safetensors files only (a directory with only ``pytorch_model.bin`` or another pickle is refused, naming
        it). A directory saved with its sparse mask (``mask_adapter/``, as a training run writes it) must hold
        zeros wherever the mask prunes: weights that contradict it are refused, naming the layer and the count
        (``check_mask=False`` loads them as they are, e.g. to apply the mask again and save)."""
        name = str(pretrained_model_name_or_path)
        if kwargs.get("use_safetensors") is False:
            raise ValueError(f"{cls.__name__}.from_pretrained({name!r}, use_safetensors=False): opentrans-hf loads model "
                             "weights only from safetensors files, never from pickles")
        kwargs["use_safetensors"] = True
        if is_sparse_checkpoint(name):  # save_pretrained(..., sparse_storage=True): values + bit masks, local only
            model = load_sparse_pretrained(cls, name)
        else:
            model = load_or_explain(name, lambda: super(OVSPreTrainedModel, cls).from_pretrained(name, *args, **kwargs),
                                    cls.__name__)
        if check_mask:
            check_saved_mask(model, name)
        if tokenizer is None:
            tok_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
            try:
                tokenizer = AutoTokenizer.from_pretrained(name, **tok_kwargs)
            except (OSError, ValueError):
                tokenizer = None  # class_embeddings() explains what to do when names must be encoded
        model.tokenizer = tokenizer
        model.image_processor = _saved_image_processor(name, tok_kwargs)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        if isinstance(dtype, torch.dtype):  # the CLIP's towers too (their sub-configs record their own dtype)
            model.to(dtype)
        model.freeze_unused_clip_parameters()  # loading makes fresh Parameters (requires_grad=True)
        return model

    def save_pretrained(self, save_directory, *args, sparse_storage: bool = False, sparse_mask=None, **kwargs):
        """``PreTrainedModel.save_pretrained`` plus the tokenizer, so ``from_pretrained`` gets both.
        ``sparse_storage=True``: the masked weights (``sparse_mask``, default the applied masks) as kept values + bit
        masks, about 7x smaller at 90% (:func:`opentrans_hf.methods.sparse_mask.storage.save_sparse_pretrained`)."""
        if sparse_storage:
            if args or set(kwargs) - {"is_main_process"}:
                raise TypeError(f"save_pretrained(sparse_storage=True) takes only sparse_mask= and is_main_process=, got "
                                f"{sorted(kwargs) or list(args)}")
            return save_sparse_pretrained(self, save_directory, mask=sparse_mask, **kwargs)
        if sparse_mask is not None:
            raise ValueError("sparse_mask= is for sparse_storage=True (a dense save stores the weights as they are)")
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.save_processor(save_directory)
        return out

    def save_processor(self, save_directory) -> None:
        """Write the processor beside the weights: ``preprocessor_config.json`` (the image processor), and with a
        tokenizer its files and ``processor_config.json`` (the :class:`OVSProcessor`)."""
        if self.tokenizer is not None:
            self.processor.save_pretrained(save_directory)
        self.get_image_processor().save_pretrained(save_directory)

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        """transformers' ``push_to_hub``: what ``save_pretrained`` writes (weights, config, and the processor:
        ``preprocessor_config.json``, the tokenizer files, ``processor_config.json``) and a model card, in one
        commit; ``revision`` is a branch (created if missing), ``private`` applies to a new repo, ``token`` None
        is the logged-in token. Offline (``HF_HUB_OFFLINE`` set now): an ``OSError`` before anything is saved
        or sent, as for every push of this library."""
        check_can_push(repo_id)
        return super().push_to_hub(repo_id, *args, **kwargs)

    # ----- running --------------------------------------------------------------------------------
    def text_embeddings(self, class_names: list[str]) -> torch.Tensor:
        trainable = not self.config.freeze_text_encoder and self.training
        return self.classifier.class_embeddings(self.clip, self.tokenizer, class_names, trainable=trainable)

    def seen_classes(self, class_names) -> torch.Tensor:
        """``(K,)`` bool: which classes are training classes (one of their names is in ``config.seen_class_names``)."""
        return seen_class_flags(class_names, self.config.seen_class_names)

    def encode_classes(self, class_names=None, input_ids=None, attention_mask=None, class_ids=None,
                       class_embeddings=None, seen_classes=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The classes of a forward, given one of three ways, -> ``(text embeddings (K, D) or (K, M, D), seen
        (K,) bool or None)``: ``class_names`` (strings, tokenized here), ``input_ids`` / ``attention_mask`` /
        ``class_ids`` (what :class:`OVSProcessor` returns for ``text=``), or ``class_embeddings`` computed before."""
        given = [n for n, v in (("class_names", class_names), ("input_ids", input_ids),
                                ("class_embeddings", class_embeddings)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"{type(self).__name__} needs the classes as exactly one of class_names=[...], input_ids= "
                             f"(+ class_ids=, from OVSProcessor(text=...)) or class_embeddings=; got "
                             f"{given or 'none'} (the label values index the classes)")
        if class_names is not None:
            names = check_class_names(class_names)
            return self.text_embeddings(names), (self.seen_classes(names) if seen_classes is None else seen_classes)
        if input_ids is not None:
            if class_ids is None:
                raise ValueError("input_ids need class_ids= (the class of each tokenized name), as OVSProcessor returns")
            trainable = not self.config.freeze_text_encoder and self.training
            text = self.classifier.embed_prompts(self.clip, input_ids, attention_mask, class_ids, trainable=trainable)
            return text, seen_classes
        if class_embeddings.dim() not in (2, 3) or class_embeddings.shape[-1] != self.config.clip.projection_dim:
            raise ValueError(f"class_embeddings must be (K, {self.config.clip.projection_dim}) or (K, M, "
                             f"{self.config.clip.projection_dim}), got {tuple(class_embeddings.shape)}")
        return class_embeddings, seen_classes

    def set_prompt_templates(self, templates) -> None:
        """Score class names with other prompt templates from now on (a set name such as ``"fcclip"``, or a
        list with ``{}`` each); recorded in the config, so ``save_pretrained`` keeps them."""
        self.config.prompt_templates = resolve_prompt_templates(templates)
        self.classifier.templates = list(self.config.prompt_templates)
        self.classifier.clear_cache()

    def check_labels(self, labels: torch.Tensor, pixel_values: torch.Tensor, num_classes: int) -> torch.Tensor:
        if labels.dim() != 3 or labels.shape[0] != pixel_values.shape[0] or labels.shape[-2:] != pixel_values.shape[-2:]:
            raise ValueError(f"labels must have shape (batch, height, width) = {(pixel_values.shape[0], *pixel_values.shape[-2:])}"
                             f" matching pixel_values, got {tuple(labels.shape)}")
        labels = labels.long()
        bad = (labels != self.config.ignore_index) & ((labels < 0) | (labels >= num_classes))
        if bad.any():
            b = int(bad.flatten(1).any(1).nonzero()[0])
            value = int(labels[b][bad[b]][0])
            raise ValueError(f"labels of batch example {b} contain the value {value}, outside the {num_classes} classes "
                             f"[0, {num_classes}) and not the ignore index {self.config.ignore_index}")
        return labels

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                class_names: list[str] | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, class_ids: torch.Tensor | None = None,
                class_embeddings: torch.Tensor | None = None, seen_classes: torch.Tensor | None = None,
                return_dict: bool = True, **kwargs) -> OVSSegmentationOutput:
        """Scores for the classes (any names: open vocabulary) and, with ``labels`` (B, H, W; values index the
        classes, ``ignore_index`` ignored), the training loss.

        The classes come as exactly one of: ``class_names`` (a list of names or tuples of synonyms);
        ``input_ids`` + ``attention_mask`` + ``class_ids`` (+ ``seen_classes``), the tensors
        ``OVSProcessor(text=...)`` returns, so ``model(**processor(images=..., text=..., return_tensors="pt"))``
        runs on tensors only; or ``class_embeddings`` ``(K, D)`` / ``(K, M, D)`` computed before
        (``model.encode_classes``). ``seen_classes`` (``(K,)`` bool) tells FC-CLIP's ensemble which classes
        were trained on (from ``config.seen_class_names`` when the names are given)."""
        check_pixel_values(pixel_values, self.config.clip.vision_config.num_channels)
        text, seen = self.encode_classes(class_names, input_ids, attention_mask, class_ids, class_embeddings,
                                         seen_classes)
        if seen is not None:
            seen = torch.as_tensor(seen, dtype=torch.bool, device=pixel_values.device).reshape(-1)
            if seen.numel() != text.shape[0]:
                raise ValueError(f"seen_classes has {seen.numel()} entries for {text.shape[0]} classes")
        if labels is not None:
            labels = self.check_labels(labels, pixel_values, text.shape[0])
        out = self.forward_with_text(pixel_values, text, labels, seen)
        out.text_embeddings = text
        return out if return_dict else out.to_tuple()

    def forward_with_text(self, pixel_values, text, labels, seen_classes) -> OVSSegmentationOutput:
        """The framework's forward given the class embeddings ``text`` (K classes) and ``seen_classes``
        ((K,) bool or None)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_with_text")

    def semantic_scores(self, output: OVSSegmentationOutput, num_classes: int) -> torch.Tensor:
        """(B, K', H, W) scores to take the argmax of; K' = K, or K + 1 with a void channel last."""
        return output.logits

    def _class_kwargs(self, class_names) -> dict:
        """Class embeddings computed once for many forwards (eval mode: the cache serves them)."""
        names = check_class_names(class_names)
        text, seen = self.encode_classes(names)
        return {"class_embeddings": text, "seen_classes": seen}

    @torch.no_grad()
    def predict(self, images, class_names: list[str], *, batch_size: int = 8, allow_void: bool = True) -> list[torch.Tensor]:
        """One (H, W) int64 label map per image, values indexing ``class_names`` (any names, also ones
        never seen in training); pixels the void/background embedding wins get ``ignore_index``
        (with ``allow_void=False`` every pixel gets one of the classes, as benchmark evaluation expects).

        ``images``: a (B, 3, H, W) or (3, H, W) tensor of normalised pixel values (as the training
        transform makes; maps at that size), or a list of raw images (PIL of any mode, arrays, (3, H, W)
        tensors in [0, 1]) which go through the model's image processor and come back at their own size
        (``post_process_semantic_segmentation``: the scores upsampled to the image, then the best class):
        the same path as the ``open-vocabulary-segmentation`` pipeline.
        """
        names = check_class_names(class_names)
        if isinstance(images, torch.Tensor):
            x = images[None] if images.dim() == 3 else images
            check_pixel_values(x, self.config.clip.vision_config.num_channels)
            batches, sizes = [x[s : s + batch_size] for s in range(0, x.shape[0], batch_size)], None
        else:
            if not isinstance(images, (list, tuple)) or not images:
                raise ValueError("images must be a (B, 3, H, W) tensor or a non-empty list of images")
            processor = self.get_image_processor()
            batches, sizes = [], []
            for s in range(0, len(images), batch_size):
                chunk = list(images[s : s + batch_size])
                batches.append(processor(chunk, return_tensors="pt")["pixel_values"])
                sizes.extend(_image_hw(im) for im in chunk)
        preds = []
        with eval_mode(self):
            device, dtype = self.device_and_dtype()
            kw = self._class_kwargs(names)
            for x in batches:
                out = self(pixel_values=x.to(device=device, dtype=dtype), **kw)
                targets = sizes[len(preds) : len(preds) + x.shape[0]] if sizes is not None else None
                maps = self.get_image_processor().post_process_semantic_segmentation(
                    {"logits": self.semantic_scores(out, len(names))}, targets, allow_void=allow_void,
                    num_classes=len(names), void_label=self.config.ignore_index)
                preds.extend(m.cpu() for m in maps)
        return preds

    def device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        return next(self.parameters()).device, next(self.clip.vision_model.parameters()).dtype

    @torch.no_grad()
    def predict_sliding(self, pixel_values: torch.Tensor, class_names: list, *, window: int | None = None,
                        stride: int | None = None, batch_size: int = 8, allow_void: bool = False) -> torch.Tensor:
        """The (H, W) int64 label map of one image of any size by sliding-window inference
        (mmsegmentation's ``slide`` mode), the field's protocol for images larger than the model's input.

        ``pixel_values``: one normalised image, ``(3, H, W)`` (or ``(1, 3, H, W)``), e.g. resized to a
        shortest side by ``SegmentationTransform(resize="shortest_side")``. Windows are ``window x window``
        (default ``config.image_size``) every ``stride`` pixels (default 2/3 of the window,
        :func:`default_sliding_stride`), the last window of a row/column ending at the image's edge
        (:func:`sliding_window_starts`); an image smaller than the window is zero-padded (bottom/right)
        to it. Windows run ``batch_size`` at a time; their scores (``semantic_scores``, void channel
        dropped unless ``allow_void``) are summed into one ``(K, H, W)`` float buffer and divided by the
        number of windows covering each pixel (:meth:`sliding_scores`), then argmax. Memory: that buffer plus
        one batch of windows. Values index ``class_names`` (each a name or a tuple of synonyms); with
        ``allow_void`` pixels the void embedding wins get ``ignore_index``. Default ``allow_void=False``: every
        pixel gets a class, as benchmark evaluation expects."""
        names = check_class_names(class_names)
        k = len(names)
        total = self.sliding_scores(pixel_values, window=window, stride=stride, batch_size=batch_size,
                                    **self._class_kwargs(names))
        if not allow_void:
            total = total[:k]
        pred = total.argmax(0)
        if total.shape[0] > k:
            pred[pred >= k] = self.config.ignore_index
        return pred.cpu()

    @torch.no_grad()
    def sliding_scores(self, pixel_values: torch.Tensor, *, window: int | None = None, stride: int | None = None,
                       batch_size: int = 8, **classes) -> torch.Tensor:
        """The ``(K[+1], H, W)`` class scores of one image of any size, averaged over the sliding windows that
        cover each pixel (see :meth:`predict_sliding`); ``classes``: the forward's class arguments
        (``class_names=``, the processor's tensors, or ``class_embeddings=``)."""
        x = pixel_values[0] if pixel_values.dim() == 4 and pixel_values.shape[0] == 1 else pixel_values
        if x.dim() != 3:
            raise ValueError(f"sliding-window inference takes one image, (3, H, W) or (1, 3, H, W); got shape "
                             f"{tuple(pixel_values.shape)}")
        check_pixel_values(x[None], self.config.clip.vision_config.num_channels)
        window = int(window or self.config.image_size)
        stride = int(stride or default_sliding_stride(window))
        if not 1 <= stride <= window:
            raise ValueError(f"sliding stride must be in [1, window = {window}] (a larger one leaves pixels without a "
                             f"window); got {stride}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        h, w = x.shape[-2:]
        ph, pw = max(h, window), max(w, window)
        with eval_mode(self):
            device, dtype = self.device_and_dtype()
            if "class_names" in classes:
                classes = self._class_kwargs(classes.pop("class_names")) | classes
            x = x.to(device=device, dtype=dtype)
            if (ph, pw) != (h, w):
                x = F.pad(x, (0, pw - w, 0, ph - h), value=0.0)
            boxes = sliding_windows(ph, pw, window, stride)
            total, count = None, torch.zeros(ph, pw, device=device)
            for s in range(0, len(boxes), batch_size):
                chunk = boxes[s : s + batch_size]
                crops = torch.stack([x[:, t : t + window, left : left + window] for t, left in chunk])
                out = self(pixel_values=crops, **classes)
                scores = upsample(self.semantic_scores(out, out.text_embeddings.shape[0]).float(), (window, window))
                if total is None:
                    total = torch.zeros(scores.shape[1], ph, pw, device=device)
                for (t, left), sc in zip(chunk, scores):
                    total[:, t : t + window, left : left + window] += sc
                    count[t : t + window, left : left + window] += 1
        return total[:, :h, :w].div_(count[:h, :w])


def default_sliding_stride(window: int) -> int:
    """2/3 of the window, rounded down: mmsegmentation's slide-mode configs (512 -> 341, 640 -> 426)."""
    return max(1, window * 2 // 3)


def sliding_window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis of ``length`` pixels (mmsegmentation's ``slide_inference``):
    ``ceil((length - window) / stride) + 1`` windows ``stride`` apart, the last one moved back to end at
    the edge; one window at 0 when ``length <= window`` (the image is then padded to the window)."""
    if length <= window:
        return [0]
    n = (length - window + stride - 1) // stride + 1
    return [min(i * stride, length - window) for i in range(n)]


def sliding_windows(height: int, width: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``(top, left)`` of every window over a ``height x width`` image (see :func:`sliding_window_starts`),
    row by row; ``len()`` is the number of forward passes per image."""
    return [(t, left) for t in sliding_window_starts(height, window, stride)
            for left in sliding_window_starts(width, window, stride)]


def _image_hw(image) -> tuple[int, int]:
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[-2:])
    if hasattr(image, "size") and not hasattr(image, "shape"):  # PIL: (W, H)
        return (image.size[1], image.size[0])
    return tuple(image.shape[:2])


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _clip_normalisation(name: str, revision: str | None, token) -> dict:
    """``image_mean`` / ``image_std`` of a CLIP checkpoint's own image processor config, when it has one
    (CLIP's defaults otherwise)."""
    try:
        config, _ = ImageProcessingMixin.get_image_processor_dict(name, revision=revision, token=token)
    except (OSError, ValueError):
        return {}
    return {k: config[k] for k in ("image_mean", "image_std") if config.get(k) is not None}


def check_saved_mask(model: nn.Module, directory: str | os.PathLike) -> None:
    """Refuse (``ValueError``) a ``model`` loaded from local ``directory`` whose weights contradict the sparse
    mask saved with it (``directory/mask_adapter``): a pruned weight that is not zero, or a mask that does not
    fit the model. Nothing to check for a directory without a mask, or a Hub id."""
    d = Path(directory)
    mask_dir = d / MASK_SUBFOLDER
    if not (mask_dir / MASK_CONFIG_NAME).is_file():
        return
    mask = SparseMask.from_pretrained(mask_dir)
    try:
        mask.resolve(model, strict=True)
    except (KeyError, ValueError) as err:
        raise ValueError(f"the mask {mask_dir} does not fit the model in {d}: {err.args[0]}") from None
    weights = next((d / f for f in ("model.safetensors", "model.safetensors.index.json", SPARSE_WEIGHTS)
                    if (d / f).is_file()), d)
    try:
        mask.check_weights(model, str(mask_dir))
    except ValueError as err:
        raise ValueError(
            f"refused: {weights} contradicts the mask it was saved with: {err}. A model saved with its mask keeps "
            f"the pruned weights at zero; if the dense weights are what you mean, remove {mask_dir}; to prune them as "
            f"the mask says, load with from_pretrained(..., check_mask=False), apply "
            f"SparseMask.from_pretrained('{mask_dir}') and save again") from None


def _saved_image_processor(name: str, kwargs: dict) -> OVSImageProcessor | None:
    """The image processor saved beside a model (``preprocessor_config.json``), or None for a directory saved
    before there was one (the config's default is used then)."""
    try:
        return OVSImageProcessor.from_pretrained(name, **kwargs)
    except OSError:
        return None
