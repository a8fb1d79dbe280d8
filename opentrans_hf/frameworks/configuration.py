"""Configurations of the open-vocabulary segmentation frameworks (transformers ``PretrainedConfig``s)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from transformers import CLIPConfig, PretrainedConfig

DEFAULT_TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "there is a {} in the scene.", "a photo of many {}."]

FCCLIP_TEMPLATES = [
    "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene", "There is the {} in the scene",
    "a photo of a {} in the scene", "a photo of a small {}.", "a photo of a medium {}.", "a photo of a large {}.",
    "This is a photo of a small {}.", "This is a photo of a medium {}.", "This is a photo of a large {}.",
    "There is a small {} in the scene.", "There is a medium {} in the scene.", "There is a large {} in the scene.",
]
"""The 14 prompt templates FC-CLIP evaluates with (ViLD's)."""

PROMPT_TEMPLATE_SETS = {"default": DEFAULT_TEMPLATES, "fcclip": FCCLIP_TEMPLATES}
"""Prompt-template sets by name: ``prompt_templates="fcclip"`` in a framework config (or ``--prompt_templates
fcclip`` on evaluate / predict) selects FC-CLIP's evaluation set."""


def resolve_prompt_templates(templates) -> list[str]:
    """A template list from a set name (:data:`PROMPT_TEMPLATE_SETS`) or a list, checked: each has a ``{}``."""
    if templates is None:
        return list(DEFAULT_TEMPLATES)
    if isinstance(templates, str):
        if templates not in PROMPT_TEMPLATE_SETS:
            raise ValueError(f"unknown prompt template set {templates!r}; the sets are {sorted(PROMPT_TEMPLATE_SETS)} "
                             "(or give a list of templates, each with a '{}' for the class name)")
        return list(PROMPT_TEMPLATE_SETS[templates])
    out = list(templates)
    if not out or any(not isinstance(t, str) or "{}" not in t for t in out):
        raise ValueError(f"every prompt template needs a '{{}}' for the class name; got {out}")
    return out


SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
             "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
"""Learning-rate schedules a solver can name: transformers' ``get_scheduler`` names that need nothing but the step
count; ``polynomial`` decays to 0 with ``SolverConfig.poly_power`` (detectron2's ``WarmupPolyLR``)."""


@dataclass(frozen=True)
class SolverConfig:
    """How a framework is trained, as a detectron2 config's ``SOLVER`` section: every framework config class
    carries its defaults (``config_class.solver``), the train job's flags override them one by one.

    Args:
        learning_rate: AdamW learning rate of the heads (detectron2's ``BASE_LR``).
        backbone_multiplier: the CLIP's parameters (image encoder, and the text tower when trained) get
            ``learning_rate * backbone_multiplier`` (``BACKBONE_MULTIPLIER``).
        weight_decay: AdamW weight decay of every other parameter (``WEIGHT_DECAY``).
        weight_decay_norm: weight decay of normalisation layers' parameters (``WEIGHT_DECAY_NORM``).
        weight_decay_embed: weight decay of embeddings: ``nn.Embedding`` weights (queries, level and position
            embeddings), scalar parameters (logit scales) and the learned void embedding (``WEIGHT_DECAY_EMBED``).
        lr_scheduler_type: one of :data:`SCHEDULES`, after a linear warm-up.
        warmup_steps: optimizer steps of linear warm-up from 0.
        poly_power: exponent of the ``polynomial`` schedule (``POLY_LR_POWER``).
        max_grad_norm: clip the gradient of all trainable parameters together to this L2 norm
            (``CLIP_GRADIENTS`` of type ``full_model``); ``None``: no clipping.
    """

    learning_rate: float = 1e-4
    backbone_multiplier: float = 1.0
    weight_decay: float = 0.01
    weight_decay_norm: float = 0.01
    weight_decay_embed: float = 0.01
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    poly_power: float = 0.9
    max_grad_norm: float | None = None

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"solver learning_rate must be > 0, got {self.learning_rate!r}")
        for name in ("backbone_multiplier", "weight_decay", "weight_decay_norm", "weight_decay_embed", "poly_power"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"solver {name} must be >= 0, got {getattr(self, name)!r}")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"solver lr_scheduler_type must be one of {SCHEDULES}, got {self.lr_scheduler_type!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"solver warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"solver max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")

    def replace(self, **changes) -> "SolverConfig":
        """A copy with the given fields changed; ``None`` values leave a field as it is (unset flags)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown solver setting(s) {unknown}; a solver has {sorted(known)}")
        return SolverConfig(**{**asdict(self), **{k: v for k, v in changes.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)


def _saved_default(kwargs: dict, name: str, new, old):
    """A setting's default: ``new`` for a config made now, ``old`` for one read from a ``config.json`` written
    before the setting existed (it carries ``transformers_version`` but not the key): such a model loads as it
    was trained."""
    if name in kwargs:
        return kwargs.pop(name)
    return old if "transformers_version" in kwargs else new


class OVSConfig(PretrainedConfig):
    """What every framework shares: the CLIP it is built on and the open-vocabulary classifier.

    Args:
        clip_config: the ``CLIPConfig`` (as a dict) of the CLIP model inside, so that
            ``from_pretrained`` rebuilds without the original checkpoint.
        clip_name_or_path: where the CLIP came from (informative).
        prompt_templates: prompt ensemble for the class text embeddings: a list of templates with a ``{}``,
            or the name of a set (``"default"``, ``"fcclip"``: FC-CLIP's 14 evaluation templates).
        class_name_aggregation: how a class with several names (synonyms) is scored: ``"max"`` over its
            names (FC-CLIP's and OpenSeg's rule, default), ``"mean"`` of the names' embeddings, or
            ``"first"`` name only.
        feature_layers: which ViT layers' patch tokens feed the simple feature pyramid, one per level
            (strides 4/8/16/32 for a patch-16 ViT; index into ``hidden_states``, 1 = first layer,
            negative from the end). Default: the layers at 1/4, 1/2, 3/4 and the end of the encoder.
            DeepLabV3 uses the last entry only (its stride-16 map).
        fpn_channels: channels of every level of the simple feature pyramid.
        logit_scale_init: initial log of the learned logit scale of the cosine classifier (ln(1/0.07)).
        learn_void_embedding: learn a "void/background" embedding scored like a class (Mask2Former's
            "no object"; always on for the Mask2Former and FC-CLIP frameworks).
        freeze_text_encoder: keep the CLIP text tower frozen (its embeddings are then cached per class list).
        image_size: input resolution (default: CLIP's).
        ignore_index: label value ignored by the loss and the metrics.
        seen_class_names: the classes of the training set (set by the trainer): the others count as
            unseen in FC-CLIP's ensemble and in the seen/unseen mIoU of evaluations.
        compact_structure: the kept attention heads and MLP neurons of a compacted vision tower
            (written by ``SparseMask.compact``; ``{"encoder.layers.3": {"heads": [...], "num_heads": H,
            "neurons": [...], "intermediate_size": I}}``): the model is built with those shapes.
    """

    model_type = "opentrans_ovs"
    solver = SolverConfig()
    """The framework's training defaults (:class:`SolverConfig`); the train job's flags override them."""

    def __init__(self, clip_config: dict | None = None, clip_name_or_path: str | None = None,
                 prompt_templates: list[str] | None = None, feature_layers: list[int] | None = None, fpn_channels: int = 64,
                 logit_scale_init: float = 2.6592600,
                 learn_void_embedding: bool = False, freeze_text_encoder: bool = True, image_size: int | None = None,
                 ignore_index: int = 255, seen_class_names: list[str] | None = None,
                 class_name_aggregation: str = "max", compact_structure: dict | None = None, **kwargs):
        if isinstance(clip_config, CLIPConfig):
            clip_config = clip_config.to_dict()
        self.clip_config = clip_config if clip_config is not None else CLIPConfig().to_dict()
        self.clip_name_or_path = clip_name_or_path
        self.prompt_templates = resolve_prompt_templates(prompt_templates or None)
        from .classifier import NAME_AGGREGATIONS

        if class_name_aggregation not in NAME_AGGREGATIONS:
            raise ValueError(f"class_name_aggregation must be one of {NAME_AGGREGATIONS}, got {class_name_aggregation!r}")
        self.class_name_aggregation = class_name_aggregation
        num_layers = CLIPConfig(**self.clip_config).vision_config.num_hidden_layers
        if feature_layers is None:
            feature_layers = [max(1, round(num_layers * q)) for q in (0.25, 0.5, 0.75, 1.0)]
        feature_layers = [int(i) for i in feature_layers]
        if len(feature_layers) != 4:
            raise ValueError(f"feature_layers needs 4 entries (one per pyramid level), got {feature_layers}")
        for i in feature_layers:
            if not (1 <= i <= num_layers or -num_layers <= i <= -1):
                raise ValueError(f"feature_layers entry {i} is not a layer of the {num_layers}-layer vision encoder "
                                 f"(use 1..{num_layers} or -1..-{num_layers})")
        self.feature_layers = feature_layers
        self.logit_scale_init = float(logit_scale_init)
        self.fpn_channels = fpn_channels
        self.learn_void_embedding = learn_void_embedding
        self.freeze_text_encoder = freeze_text_encoder
        self.image_size = image_size or CLIPConfig(**self.clip_config).vision_config.image_size
        self.ignore_index = ignore_index
        self.seen_class_names = list(seen_class_names or [])
        if compact_structure is not None:
            from ..pruning.structured import check_structure

            check_structure(compact_structure, "compact_structure")
        self.compact_structure = compact_structure
        super().__init__(**kwargs)

    @property
    def clip(self) -> CLIPConfig:
        return CLIPConfig(**self.clip_config)


class CLIPDeepLabV3Config(OVSConfig):
    """DeepLabV3-style: ASPP on the stride-16 map, per-pixel embeddings scored against class texts."""

    model_type = "opentrans_clip_deeplabv3"
    solver = SolverConfig(learning_rate=1e-3, backbone_multiplier=1.0, weight_decay=0.01, weight_decay_norm=0.01,
                          weight_decay_embed=0.01, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=None)
    """AdamW 1e-3 for head and encoder, linear decay: measured on the embedded benchmark (the dense CLIP's own
    classifier is the starting point, ``clip_residual``), where it reaches the dense CLIP's zero-shot."""

    def __init__(self, aspp_channels: int = 64, atrous_rates: tuple[int, ...] = (2, 4, 6), clip_residual: bool = False,
                 **kwargs):
        """``clip_residual``: the per-pixel embedding is CLIP's own dense embedding of the last layer
        (``visual_projection(post_layernorm(tokens))``, CLIP's weights, frozen) plus the ASPP branch, whose
        last projection starts at zero: the untrained model is the training-free dense zero-shot CLIP, and
        training on the seen classes corrects it instead of learning a map to the text space from scratch
        (which keeps a pretrained CLIP's knowledge of the unseen classes)."""
        self.aspp_channels = aspp_channels
        self.atrous_rates = list(atrous_rates)
        self.clip_residual = bool(clip_residual)
        super().__init__(**kwargs)


MASK_LOSS_IGNORED = ("exclude", "background")
"""What the mask loss does with pixels labelled ``ignore_index``: ``exclude`` them (no mask is supervised
there), or count them as ``background`` of every matched query's mask (Mask2Former's reference, which has no
ignored pixels inside its targets' images)."""


class CLIPMask2FormerConfig(OVSConfig):
    """Mask2Former-style: transformers' Mask2Former pixel decoder, transformer decoder and loss.

    Args:
        mask_loss_ignored: pixels labelled ``ignore_index`` in the mask loss (and the matching cost):
            ``"exclude"`` (default) or ``"background"`` (see :data:`MASK_LOSS_IGNORED`). On a benchmark with
            held-out classes, their pixels are ignored in training; as background they teach every mask to
            avoid the unseen classes, which then fall with longer training.
        (the other settings size transformers' Mask2Former blocks and weigh its loss terms.)
    """

    model_type = "opentrans_clip_mask2former"
    solver = SolverConfig(learning_rate=1e-4, backbone_multiplier=0.1, weight_decay=0.05, weight_decay_norm=0.0,
                          weight_decay_embed=0.0, lr_scheduler_type="polynomial", warmup_steps=10, poly_power=0.9,
                          max_grad_norm=0.01)
    """Mask2Former's solver (its detectron2 configs): AdamW 1e-4, backbone x 0.1, weight decay 0.05 (0 for norms and
    embeddings), poly schedule (power 0.9) after a short warm-up, full-model gradient clipping at 0.01."""

    def __init__(self, num_queries: int = 16, hidden_dim: int = 64, mask_feature_size: int = 64,
                 encoder_layers: int = 1, decoder_layers: int = 3, num_attention_heads: int = 4,
                 dim_feedforward: int = 128, train_num_points: int = 1024, no_object_weight: float = 0.1,
                 class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 mask_loss_ignored: str = "exclude", **kwargs):
        if mask_loss_ignored not in MASK_LOSS_IGNORED:
            raise ValueError(f"mask_loss_ignored must be one of {MASK_LOSS_IGNORED}, got {mask_loss_ignored!r}")
        self.mask_loss_ignored = mask_loss_ignored
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        self.mask_feature_size = mask_feature_size
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.num_attention_heads = num_attention_heads
        self.dim_feedforward = dim_feedforward
        self.train_num_points = train_num_points
        self.no_object_weight = no_object_weight
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        if kwargs.get("learn_void_embedding") is False:
            raise ValueError("Mask2Former-style frameworks need the void ('no object') embedding: "
                             "learn_void_embedding cannot be False")
        kwargs["learn_void_embedding"] = True
        super().__init__(**kwargs)

    def mask2former_config(self, num_labels: int):
        """The ``Mask2FormerConfig`` for transformers' building blocks (sizes from this config)."""
        from transformers import Mask2FormerConfig

        if self.fpn_channels % 32 or self.hidden_dim % 32:
            raise ValueError(f"fpn_channels ({self.fpn_channels}) and hidden_dim ({self.hidden_dim}) must be multiples "
                             "of 32 (Mask2Former's GroupNorm(32, ...))")
        strides = self.feature_strides
        return Mask2FormerConfig(
            feature_size=self.fpn_channels, mask_feature_size=self.mask_feature_size, hidden_dim=self.hidden_dim,
            encoder_feedforward_dim=self.dim_feedforward, encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers, num_attention_heads=self.num_attention_heads,
            dim_feedforward=self.dim_feedforward, num_queries=self.num_queries, num_labels=num_labels,
            train_num_points=self.train_num_points, no_object_weight=self.no_object_weight,
            class_weight=self.class_weight, mask_weight=self.mask_weight, dice_weight=self.dice_weight,
            ignore_value=self.ignore_index, feature_strides=strides, common_stride=strides[0], use_auxiliary_loss=True,
        )

    @property
    def feature_strides(self) -> list[int]:
        """Strides of the simple feature pyramid's levels in pixels: patch/4, patch/2, patch, 2 x patch (4/8/16/32
        for a patch-16 ViT, 2/4/8/16 for patch 8). transformers takes whole strides only; where patch/4 is not
        whole (patch 14, or the tests' patch 2) the same ratios from 1 (1/2/4/8), which builds the same blocks
        (only the ratios decide the pixel decoder's levels)."""
        from .backbone import PYRAMID_SCALES

        patch = self.clip.vision_config.patch_size
        strides = [patch / s for s in PYRAMID_SCALES]
        if all(float(x).is_integer() for x in strides):
            return [int(x) for x in strides]
        return [int(round(x / strides[0])) for x in strides]


CLASS_HEADS = ("mlp", "linear")
MASK_POOLINGS = ("binary", "soft")


class CLIPFCCLIPConfig(CLIPMask2FormerConfig):
    """FC-CLIP-style: the Mask2Former variant plus the out-of-vocabulary branch and geometric ensemble.

    Args:
        ensemble_alpha: weight of the out-of-vocabulary probability for classes seen in training (0.4).
        ensemble_beta: its weight for unseen classes (0.8).
        freeze_clip_encoder: keep the whole CLIP image encoder frozen (FC-CLIP's design, default True): the
            out-of-vocabulary branch works because the frozen features stay aligned with the text
            embeddings; trained on the seen classes they drift out of the text space. The heads train on
            the frozen features (a sparse mask applied to the encoder stays in force).
        class_head: ``"mlp"`` (FC-CLIP's, default): a 3-layer MLP on the query embedding plus the query's
            mask-pooled pixel features (``LayerNorm`` + ``Linear``), per decoder layer; ``"linear"``: one Linear
            on the query embedding (the Mask2Former variant's head).
        mask_pooling: how the out-of-vocabulary branch pools the CLIP's dense features under each query's
            mask: ``"binary"`` (FC-CLIP's: mask logits > 0, average; a query with an empty mask gets no
            out-of-vocabulary term, its in-vocabulary scores stand) or ``"soft"`` (sigmoid-weighted average).
        (``seen_class_names``, from :class:`OVSConfig`, decide which classes count as seen.)
    """

    model_type = "opentrans_clip_fcclip"
    # solver: inherited, Mask2Former's (FC-CLIP's configs inherit it); with the frozen encoder the multiplier is moot

    def __init__(self, ensemble_alpha: float = 0.4, ensemble_beta: float = 0.8, **kwargs):
        for name, v in (("ensemble_alpha", ensemble_alpha), ("ensemble_beta", ensemble_beta)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        self.ensemble_alpha = ensemble_alpha
        self.ensemble_beta = ensemble_beta
        # FC-CLIP's design; a config.json written before these settings existed loads as it was trained
        self.freeze_clip_encoder = bool(_saved_default(kwargs, "freeze_clip_encoder", True, False))
        self.class_head = _saved_default(kwargs, "class_head", "mlp", "linear")
        self.mask_pooling = _saved_default(kwargs, "mask_pooling", "binary", "soft")
        if self.class_head not in CLASS_HEADS:
            raise ValueError(f"class_head must be one of {CLASS_HEADS}, got {self.class_head!r}")
        if self.mask_pooling not in MASK_POOLINGS:
            raise ValueError(f"mask_pooling must be one of {MASK_POOLINGS}, got {self.mask_pooling!r}")
        super().__init__(**kwargs)
