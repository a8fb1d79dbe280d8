"""Configurations of the open-vocabulary segmentation frameworks (transformers ``PretrainedConfig``s)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from transformers import CLIPConfig, PretrainedConfig

from opentrans_hf.methods.sparse_mask.structured import check_structure
from opentrans_hf.models.classifier import NAME_AGGREGATIONS

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
            check_structure(compact_structure, "compact_structure")
        self.compact_structure = compact_structure
        super().__init__(**kwargs)

    @property
    def clip(self) -> CLIPConfig:
        return CLIPConfig(**self.clip_config)
