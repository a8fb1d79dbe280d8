"""``SpectralTuningConfig``: a PEFT-style configuration for spectral tuning (OpenTrans step 2)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from opentrans_hf.methods import base as adapters
from opentrans_hf.methods.spectral_tuning.peft_format import (
    LEGACY_PEFT_TYPE,
    PEFT_FORMAT_TYPE,
    SECTION,
    split_adapter_config,
)
from opentrans_hf.utils.hub import read_safetensors, resolve_pretrained_dir
from opentrans_hf.utils.io import is_integer, is_number
from opentrans_hf.utils.matching import normalize_patterns
from opentrans_hf.utils.naming import canonical_names, vision_prefix_regex
from opentrans_hf.utils.version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = LEGACY_PEFT_TYPE  # the config's own type; a saved adapter is a PEFT LN_TUNING adapter (peft_format)
ADAPTER_PEFT_TYPES = (PEFT_FORMAT_TYPE, LEGACY_PEFT_TYPE)
FREEZE_RULES = ("median", "ratio", "threshold", "top_k", "random")
GRANULARITIES = ("layer", "block")
ESTIMATORS = ("opentrans", "ww")
INVALID_ALPHA = ("train", "freeze", "error")


def _bad(name: str, expected: str, value):
    raise ValueError(f"SpectralTuningConfig.{name} must be {expected}, got {value!r} ({type(value).__name__})")


@dataclass
class SpectralTuningConfig:
    """Which layers to fine-tune, decided by the heavy-tail exponent alpha of their weights.

    Well-trained layers (small alpha, heavy-tailed spectrum) are frozen, the others are fine-tuned.
    The default is the OpenTrans paper's rule: alpha from the ``opentrans`` estimator, computed once on
    the loaded backbone; every analysed layer with alpha below the median is frozen; normalisation
    layers and everything that is not analysed stay as they are (trainable), except on a model holding
    both CLIP towers (``CLIPModel``): only its image encoder is analysed and trained by default; the text
    tower, ``text_projection``, ``visual_projection`` and ``logit_scale`` are frozen unless targeted.
    """

    peft_type: str = field(default=PEFT_TYPE, metadata={"help": "always 'SPECTRAL_TUNING'"})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "the base model this adapter was made on"})
    revision: str | None = field(default=None, metadata={"help": "revision of the base model"})
    inference_mode: bool = field(default=False, metadata={"help": "freeze every parameter (loading for inference)"})
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={"help": "layers spectral tuning decides on: a full-match regex or a list of exact names / dotted "
                          "suffixes (PEFT's rules), on the model's own names. None: the CLIP image encoder (patch "
                          "embedding and encoder blocks) when the model has a CLIP vision tower (an OVS framework: "
                          "the encoder layers its heads train through, encoder_target_modules()); the text tower "
                          "is never a default target, and on a CLIPModel it, both projections and logit_scale are "
                          "frozen unless targeted here or in modules_to_save. Other models: every Linear/Conv layer"},
    )
    exclude_modules: str | list[str] | None = field(default=None, metadata={"help": "layers never analysed (same rules)"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "modules (or parameters, e.g. logit_scale) always trainable and saved in the "
                                        "adapter, e.g. a segmentation head"}
    )
    estimator: str = field(default="opentrans", metadata={"help": f"alpha estimator: one of {ESTIMATORS}"})
    freeze_rule: str = field(
        default="median",
        metadata={"help": "median: freeze alpha < median (the paper); ratio: freeze the freeze_ratio share with the "
                          "smallest alpha; threshold: freeze alpha < alpha_threshold; top_k: train only the k largest-alpha; "
                          "random: freeze as many layers (or blocks) as median would, drawn at random by seed (the "
                          "paper's Random baseline)"},
    )
    freeze_ratio: float = field(default=0.5, metadata={"help": "share of layers frozen by the 'ratio' rule, in [0, 1]"})
    alpha_threshold: float | None = field(default=None, metadata={"help": "alpha below which the 'threshold' rule freezes"})
    k: int | None = field(default=None, metadata={"help": "number of layers (or blocks) the 'top_k' rule trains"})
    seed: int = field(default=0, metadata={"help": "seed of the 'random' rule's draw (the same seed, the same layers)"})
    granularity: str = field(
        default="layer",
        metadata={"help": "layer: decide per layer; block: mean alpha per transformer block / residual stage, decided per block"},
    )
    train_norms: bool = field(default=True, metadata={"help": "keep normalisation layers trainable (the paper does)"})
    train_biases: bool = field(default=False, metadata={"help": "keep the biases of frozen layers trainable"})
    invalid_alpha: str = field(
        default="train",
        metadata={"help": "what happens to analysed layers without a valid alpha (status 'invalid': NaN/Inf weights "
                          "or a failed eigensolver; 'degenerate': all-zero, rank <= 1 or flat spectrum): 'train' "
                          "(default: no evidence that the layer is well trained, so it is fine-tuned), 'freeze', or "
                          "'error' (refuse, naming the layers). They are listed in invalid_layers"},
    )
    layer_alphas: dict[str, float] | None = field(
        default=None, metadata={"help": "filled by get_spectral_model: alpha per analysed layer (no re-analysis when set)"}
    )
    trainable_layers: list[str] | None = field(
        default=None, metadata={"help": "filled by get_spectral_model: the analysed layers that are fine-tuned"}
    )
    invalid_layers: dict[str, str] | None = field(
        default=None,
        metadata={"help": "filled by get_spectral_model: analysed layers without a valid alpha -> why (status and "
                          "reason); invalid_alpha decided on them, and trainable_layers lists them if trained"},
    )
    library_version: str | None = field(default=None, metadata={"help": "opentrans-hf version that wrote this"})

    def __post_init__(self):
        self._check_settings()
        self._normalise_name_lists()
        self._check_layer_maps()
        self._canonicalise_layer_names()
        self._check_trainable_layers_analysed()

    def _check_settings(self) -> None:
        """The scalar settings: types, choices, ranges and what a freeze rule needs."""
        if self.peft_type != PEFT_TYPE:
            raise ValueError(f"peft_type must be {PEFT_TYPE!r}, got {self.peft_type!r}")
        for name in ("base_model_name_or_path", "revision", "library_version"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                _bad(name, "a string or None", getattr(self, name))
        for name in ("inference_mode", "train_norms", "train_biases"):
            if not isinstance(getattr(self, name), bool):
                _bad(name, "a bool (true or false)", getattr(self, name))
        for name, choices in (("estimator", ESTIMATORS), ("freeze_rule", FREEZE_RULES), ("granularity", GRANULARITIES),
                              ("invalid_alpha", INVALID_ALPHA)):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {choices}")
        if not is_number(self.freeze_ratio):
            _bad("freeze_ratio", "a number in [0, 1]", self.freeze_ratio)
        if not 0.0 <= self.freeze_ratio <= 1.0:
            raise ValueError(f"freeze_ratio must be in [0, 1], got {self.freeze_ratio}")
        if self.alpha_threshold is not None and not (is_number(self.alpha_threshold) and math.isfinite(self.alpha_threshold)):
            _bad("alpha_threshold", "a finite number or None", self.alpha_threshold)
        if self.k is not None and not is_integer(self.k):
            _bad("k", "an integer or None", self.k)
        if not is_integer(self.seed):
            _bad("seed", "an integer", self.seed)
        if self.freeze_rule == "threshold" and self.alpha_threshold is None:
            raise ValueError("freeze_rule='threshold' needs alpha_threshold (e.g. 4.0)")
        if self.freeze_rule == "top_k" and (self.k is None or self.k < 0):
            raise ValueError(f"freeze_rule='top_k' needs k >= 0, got k={self.k}")

    def _normalise_name_lists(self) -> None:
        """``target_modules``/``exclude_modules`` as PEFT patterns; ``modules_to_save``/``trainable_layers`` as lists."""
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list, tuple)):
                _bad(name, "a regex string, a list of module names or None", value)
            try:
                setattr(self, name, normalize_patterns(value))
            except (ValueError, TypeError) as err:
                raise ValueError(f"SpectralTuningConfig.{name}: {err}") from None
        for name in ("modules_to_save", "trainable_layers"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    hint = f" (did you mean [{value!r}]?)" if isinstance(value, str) else ""
                    _bad(name, "a list of module names or None" + hint, value)
                setattr(self, name, list(value))

    def _check_layer_maps(self) -> None:
        """``layer_alphas`` maps names to finite positive numbers (an alpha is > 0), ``invalid_layers`` names
        to reasons."""
        if self.layer_alphas is not None:
            if not isinstance(self.layer_alphas, dict):
                _bad("layer_alphas", "a mapping of layer names to alphas, or None", self.layer_alphas)
            bad = [f"{k!r}: {v!r}" for k, v in self.layer_alphas.items()
                   if not (isinstance(k, str) and is_number(v) and math.isfinite(v) and v > 0)]
            if bad:
                raise ValueError(f"SpectralTuningConfig.layer_alphas must map layer names to finite numbers > 0; "
                                 f"{len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not: {', '.join(bad[:3])}"
                                 + (", ..." if len(bad) > 3 else ""))
        if self.invalid_layers is not None and not (
                isinstance(self.invalid_layers, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in self.invalid_layers.items())):
            _bad("invalid_layers", "a mapping of layer names to reasons (strings), or None", self.invalid_layers)

    def _check_trainable_layers_analysed(self) -> None:
        """With ``layer_alphas``, every one of ``trainable_layers`` is a layer it (or ``invalid_layers``) decided."""
        if self.layer_alphas is None or self.trainable_layers is None:
            return
        decided = [*self.layer_alphas, *(self.invalid_layers or {})]
        analysed = set(decided) | {n[:-2] for n in decided if n[-2:] in ("_q", "_k", "_v")}
        unknown = [n for n in self.trainable_layers if n not in analysed]
        if unknown:
            raise ValueError(f"SpectralTuningConfig.trainable_layers names {len(unknown)} layer(s) that "
                             f"layer_alphas does not have, e.g. {unknown[:3]}")

    def _canonicalise_layer_names(self) -> None:
        """Names in ``layer_alphas``, ``invalid_layers`` and ``trainable_layers`` relative to the CLIP vision
        tower (``vision_model.encoder...`` and ``clip.vision_model.encoder...`` -> ``encoder...``), as sparse
        masks store them, so that one config applies to every model holding that tower; configs written with
        the model's own names (earlier versions) are converted here. Names outside the vision tower stay as
        they are; so do all names if two of them would become one (e.g. a model with two vision towers)."""
        keys = [*(self.layer_alphas or {}), *(self.invalid_layers or {}), *(self.trainable_layers or ())]
        canon = canonical_names(set(keys))
        if canon is None or all(k == v for k, v in canon.items()):
            return
        if self.layer_alphas is not None:
            self.layer_alphas = {canon[k]: v for k, v in self.layer_alphas.items()}
        if self.invalid_layers is not None:
            self.invalid_layers = {canon[k]: v for k, v in self.invalid_layers.items()}
        if self.trainable_layers is not None:
            self.trainable_layers = [canon[k] for k in self.trainable_layers]

    # ---- what PEFT's functions read from ``peft_model.peft_config[name]`` ------------------------
    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    # ---- PEFT-style I/O ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``adapter_config.json`` (atomically) into ``save_directory``."""
        self.library_version = __version__
        return adapters.write_adapter_config(save_directory, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> SpectralTuningConfig:
        """Build a config from a dict (e.g. a parsed ``adapter_config.json``: a saved adapter's, whose
        config is its ``spectral_tuning`` entry, or an earlier version's); every error names ``where``."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}a SpectralTuningConfig must be a JSON object, got {type(data).__name__}")
        if data.get("peft_type") == PEFT_FORMAT_TYPE or SECTION in data:
            data, _ = split_adapter_config(data, where)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}unknown SpectralTuningConfig field(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{where}{err}") from None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None, token=None) -> SpectralTuningConfig:
        """From a directory or a Hub repo holding ``adapter_config.json`` (or the JSON file itself).

        When ``adapter_model.safetensors`` lies beside it (a saved adapter), its tensors must be exactly
        those the config lists as trained (missing or extra ones: an error naming the file and them),
        though only the config is returned."""
        p = Path(name_or_path)
        if p.is_file():
            cfg_path = p
        else:
            cfg_path = resolve_pretrained_dir(name_or_path, [CONFIG_NAME], revision=revision, token=token,
                                              what="spectral adapter") / CONFIG_NAME
        data = adapters.read_adapter_config(cfg_path, ADAPTER_PEFT_TYPES, "spectral tuning adapter")
        config_data, layout = split_adapter_config(data, f"{cfg_path}: ")
        weights = cfg_path.parent / WEIGHTS_NAME
        if layout is not None and cfg_path.name == CONFIG_NAME and weights.is_file():
            layout.to_model_names(read_safetensors(weights, "spectral tuning adapter"), weights)
        return cls.from_dict(config_data, where=f"{cfg_path}: ")

    # ---- beyond the paper ---------------------------------------------------------------------
    def to_lora_config(self, r: int = 8, lora_alpha: int | None = None, lora_dropout: float = 0.0, **kwargs):
        """A ``peft.LoraConfig`` whose ``target_modules`` are exactly the layers this rule trains, as a
        full-match regex of their names (a name relative to the CLIP vision tower matches under any
        ``*vision_model.`` prefix, so the LoRA config fits every model holding that tower)
        (alpha-guided LoRA). Needs ``trainable_layers`` (call :func:`get_spectral_model` first, or load a
        saved adapter config). ``modules_to_save`` carries over; other kwargs go to ``LoraConfig``."""
        from peft import LoraConfig

        if self.trainable_layers is None:
            raise ValueError("to_lora_config needs trainable_layers: run get_spectral_model(model, config) first")
        if not self.trainable_layers:
            raise ValueError("the freeze rule trains no analysed layer: there is nothing for LoRA to target")
        kwargs.setdefault("modules_to_save", self.modules_to_save)
        return LoraConfig(
            r=r, lora_alpha=lora_alpha if lora_alpha is not None else 2 * r, lora_dropout=lora_dropout,
            target_modules="|".join(vision_prefix_regex(n) for n in self.trainable_layers), **kwargs,  # exact names
        )
