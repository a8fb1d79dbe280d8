"""``get_spectral_model`` and ``SpectralModel``: spectral tuning applied to a model, PEFT-style."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from peft import PEFT_TYPE_TO_TUNER_MAPPING, PeftModel
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from opentrans_hf.methods import base as adapters
from opentrans_hf.methods.base import AdapterHubMixin
from opentrans_hf.methods.spectral_tuning.config import (
    ADAPTER_PEFT_TYPES,
    CONFIG_NAME,
    PEFT_TYPE,
    WEIGHTS_NAME,
    SpectralTuningConfig,
)
from opentrans_hf.methods.spectral_tuning.peft_format import (
    AdapterLayout,
    is_norm,
    peft_config_dict,
    plan_layout,
    split_adapter_config,
)
from opentrans_hf.methods.spectral_tuning.selection import frozen_units, module_of, units_and_alphas
from opentrans_hf.spectral import LayerSpectrum, SpectralReport, analyze_spectra
from opentrans_hf.utils.logging import get_logger
from opentrans_hf.utils.matching import name_matches
from opentrans_hf.utils.naming import CLIP_VISION_ENCODER_TARGETS, canonical_name, resolve_name
from opentrans_hf.utils.version import __version__

logger = get_logger(__name__)

ADAPTER_NAME = "default"  # PEFT's name of the one adapter


def get_spectral_model(model: nn.Module, config: SpectralTuningConfig, *, device=None, progress: bool = False) -> SpectralModel:
    """Apply spectral tuning to ``model``: measure alpha (or reuse ``config.layer_alphas``), freeze the
    analysed layers the rule picks, and return a :class:`SpectralModel` wrapping the same module.

    Only ``requires_grad`` changes; no weight is copied or modified. Parameters that are not in an
    analysed layer keep their ``requires_grad`` (normalisation layers are frozen only with
    ``train_norms=False``), except on a model holding both CLIP towers (``CLIPModel``, CLIPSeg): there
    the text tower, ``text_projection``, ``visual_projection`` and ``logit_scale`` are frozen unless
    targeted (an analysed layer lies in them, or ``modules_to_save`` names them), see
    :func:`untargeted_clip_parameters`; ``modules_to_save`` (modules or parameters) are made trainable.
    ``config`` is filled in place with
    ``layer_alphas``, ``invalid_layers`` and ``trainable_layers`` so that it states exactly what was
    measured and trained.
    Call this before ``accelerator.prepare`` (DDP needs the final ``requires_grad`` at wrap time).

    The analysis covers ``config.target_modules``; None means the CLIP image encoder when the model
    has a CLIP vision tower (a framework: the encoder layers its heads train through; never the text
    tower, which stays frozen unless targeted), else every Linear/Conv layer. Layers are
    named in the config relative to the CLIP vision tower (``encoder.layers.0.mlp.fc1``), as sparse
    masks are: one config made on ``CLIPVisionModel``, ``CLIPModel``, CLIPSeg or a framework applies
    to each of them and freezes the same encoder layers; names outside the vision tower (a head, the
    text tower) stay the model's own. On a framework, encoder layers no head reads stay frozen.
    Layers without a valid alpha (invalid or degenerate weights) follow ``config.invalid_alpha``.
    """
    if isinstance(model, SpectralModel):
        raise TypeError("the model is already a SpectralModel; pass its base_model to apply another config")
    if not isinstance(config, SpectralTuningConfig):
        raise TypeError(f"config must be a SpectralTuningConfig, got {type(config).__name__}")
    module_names = {n for n, _ in model.named_modules()}
    report = None
    if config.layer_alphas is None:
        target_modules = config.target_modules if config.target_modules is not None else default_target_modules(model)
        report = analyze_spectra(model, estimator=config.estimator, target_modules=target_modules,
                                 exclude_modules=config.exclude_modules, device=device, progress=progress)
        invalid = _invalid_reasons(report)
        if invalid and config.invalid_alpha == "error":
            raise ValueError(
                f"{len(invalid)} layer(s) of {type(model).__name__} have no valid alpha (invalid_alpha='error'): "
                + "; ".join(f"{n}: {why}" for n, why in list(invalid.items())[:5]) + ("; ..." if len(invalid) > 5 else "")
                + ". Set invalid_alpha='train' or 'freeze' to decide on them, or exclude_modules to leave them out")
        if not report.alphas:
            raise ValueError(f"no layer of {type(model).__name__} got a valid alpha: {report.counts()}")
        config.layer_alphas = dict(report.alphas)
        config.invalid_layers = invalid
        config._canonicalise_layer_names()
    else:
        names = {**config.layer_alphas, **dict.fromkeys(config.invalid_layers or {})}
        hosts = {n: _host_layer_name(n, module_names) for n in names}
        report = SpectralReport(
            [LayerSpectrum(hosts[n], "linear", (), alpha=a) for n, a in config.layer_alphas.items()]
            + [LayerSpectrum(hosts[n], "linear", (), status=_status_of(why), warning=why)
               for n, why in (config.invalid_layers or {}).items()],
            config.estimator, type(model).__name__)
    check_config_layers(config, model, module_names)
    if config.trainable_layers is None:
        config.trainable_layers = select_trainable_layers(config, module_names)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    wrapped = SpectralModel(model, config, report)
    wrapped._apply_requires_grad()
    if callable(getattr(model, "freeze_unused_clip_parameters", None)):
        model.freeze_unused_clip_parameters()  # a config made on another model must not unfreeze what no head uses
    return wrapped


def check_config_layers(config: SpectralTuningConfig, model: nn.Module, module_names: set[str], where: str = "") -> None:
    """The layers a filled-in config names (``layer_alphas``, ``trainable_layers``) must be modules of ``model``."""
    missing = [n for n in config.layer_alphas if not _resolvable(n, module_names)]
    if missing:
        raise ValueError(
            f"{where}config.layer_alphas names layers that {type(model).__name__} does not have, e.g. {missing[:3]} "
            "(was the adapter made for another model?)"
        )
    missing = [n for n in (*(config.invalid_layers or ()), *(config.trainable_layers or ()))
               if not _resolvable(n, module_names)]
    if missing:
        raise ValueError(f"{where}config.trainable_layers names modules {type(model).__name__} does not have: {missing[:3]}")
    if config.modules_to_save and not any(name_matches(n, config.modules_to_save)
                                          for n in module_names | {n for n, _ in model.named_parameters()}):
        raise ValueError(f"{where}modules_to_save={config.modules_to_save!r} matches no module or parameter of "
                         f"{type(model).__name__}")


def adapter_tensor_names(model: nn.Module, config: SpectralTuningConfig) -> tuple[set[str], set[str]]:
    """(required, forbidden) parameter names of an adapter file for ``config`` (filled in) on ``model``.

    Required: every parameter of ``trainable_layers`` and ``modules_to_save`` (and the frozen layers'
    biases with ``train_biases``). Forbidden: the frozen analysed layers' parameters, and normalisation
    layers with ``train_norms=False``. Other parameters keep the ``requires_grad`` they had, so the
    adapter may hold them or not (the untargeted CLIP text tower too: adapters of earlier versions,
    which left it trainable, hold it)."""
    modules = dict(model.named_modules())
    params = {n for n, _ in model.named_parameters()}

    def own(name: str, recurse: bool = False) -> set[str]:
        return {f"{name}.{p}" if name else p for p, _ in modules[name].named_parameters(recurse=recurse)}

    trainable = set(host_layers(config.trainable_layers, model))
    required: set[str] = set()
    forbidden: set[str] = set()
    for m in host_layers(decided_layers(config), model):
        if m in trainable:
            required |= own(m)
        else:
            for n in own(m):
                (required if config.train_biases and n.rpartition(".")[2] == "bias" else forbidden).add(n)
    for name in modules:
        if config.modules_to_save and name_matches(name, config.modules_to_save):
            required |= own(name, recurse=True)
        elif not config.train_norms and is_norm(modules[name]):
            forbidden |= own(name)
    if config.modules_to_save:
        required |= {n for n in params if name_matches(n, config.modules_to_save)}
    return required & params, (forbidden - required) & params


def check_adapter_tensors(model: nn.Module, config: SpectralTuningConfig, tensors: dict[str, torch.Tensor],
                          where: str | os.PathLike) -> None:
    """An adapter file (``where``) must hold exactly the tensors ``config`` says were trained on ``model``
    (see :func:`adapter_tensor_names`), with the parameters' shapes, a floating dtype and finite values."""
    cls = type(model).__name__
    params = dict(model.named_parameters())
    unknown = [n for n in tensors if n not in params]
    if unknown:
        raise ValueError(f"{where} holds tensors {cls} does not have: {_some(unknown)}")
    checks = (
        ("have a shape other than the model's", lambda n, t: tuple(t.shape) != tuple(params[n].shape),
         lambda n, t: f"{n} {tuple(t.shape)} vs {tuple(params[n].shape)}"),
        ("are not floating point like the model's parameters", lambda n, t: not t.is_floating_point(),
         lambda n, t: f"{n} {t.dtype}"),
        ("hold NaN or Inf values", lambda n, t: not bool(torch.isfinite(t).all()), lambda n, t: n),
    )
    for what, bad, show in checks:
        found = [show(n, t) for n, t in tensors.items() if bad(n, t)]
        if found:
            raise ValueError(f"{where}: {_some(found)} {what}")
    check_config_layers(config, model, set(dict(model.named_modules())), where=f"{where}: ")
    required, forbidden = adapter_tensor_names(model, config)
    missing = required - set(tensors)
    if missing:
        raise ValueError(f"{where} lacks {_some(missing)} that {CONFIG_NAME} says were trained "
                         "(trainable_layers, modules_to_save)")
    frozen = forbidden & set(tensors)
    if frozen:
        raise ValueError(f"{where} holds {_some(frozen)} of layers that {CONFIG_NAME} says were frozen")


def _some(names) -> str:
    """A count and a few examples: ``2 tensor(s) (a, b)``, ``47 tensor(s) (a, b, c, ...)``."""
    names = sorted(names)
    return f"{len(names)} tensor(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def _resolvable(layer: str, module_names: set[str]) -> bool:
    try:
        module_of(layer, module_names)
        return True
    except KeyError:
        return False


def host_tensor_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter file's tensors under ``model``'s own parameter names: a name the model lacks is taken
    relative to the CLIP vision tower and resolved (``vision_model.encoder...`` saved on a ``CLIPModel``
    -> ``clip.vision_model.encoder...`` in a framework); names that resolve to nothing stay as they are
    (and are refused by :func:`check_adapter_tensors`, naming them)."""
    params = {n for n, _ in model.named_parameters()} | set(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        target = name if name in params else resolve_name(canonical_name(name), params, what="adapter tensor",
                                                           owner=f"{type(model).__name__}'s parameters")
        target = target or name
        if target in out:
            raise ValueError(f"adapter tensors {name!r} and another one both stand for {type(model).__name__}.{target}")
        out[target] = t
    return out


def decided_layers(config: SpectralTuningConfig) -> list[str]:
    """The config's analysed layers: those with an alpha, then those without a valid one."""
    return [*(config.layer_alphas or {}), *(config.invalid_layers or {})]


def host_layers(layers, model: nn.Module) -> list[str]:
    """The model's own module names for config ``layers`` (names relative to the CLIP vision tower are
    resolved, fused ``_q/_k/_v`` parts give their module), in order, each module once."""
    names = {n for n, _ in model.named_modules()}
    out: list[str] = []
    for layer in layers:
        mod = module_of(layer, names)
        if mod not in out:
            out.append(mod)
    return out


def default_target_modules(model: nn.Module) -> str | None:
    """``target_modules`` when the config leaves it None: the layers an OVS framework's heads train
    through (``encoder_target_modules()``), the CLIP image encoder of a model holding a ``vision_model``
    (``CLIPModel``, CLIPSeg: never the text tower), else None (every Linear/Conv layer)."""
    if callable(getattr(model, "encoder_target_modules", None)):
        return model.encoder_target_modules()
    if any(n == "vision_model" or n.endswith(".vision_model") for n, _ in model.named_modules()):
        return CLIP_VISION_ENCODER_TARGETS
    return None


def untargeted_clip_parameters(model: nn.Module, analysed_layers: list[str]) -> list[str]:
    """The parameters of ``model`` that spectral tuning freezes because the config does not target them:
    in every two-tower CLIP inside ``model`` (a module with both a ``vision_model`` and a ``text_model``:
    ``CLIPModel``, CLIPSeg's), everything outside the vision tower (``text_model``, ``text_projection``,
    ``visual_projection``, ``logit_scale``) except the parts an analysed layer lies in (``analysed_layers``:
    the host's module names). ``modules_to_save`` unfreezes what it names afterwards.

    Empty on a model that decides which CLIP parts train itself (``freeze_unused_clip_parameters``: the
    OVS frameworks, whose ``freeze_text_encoder`` keeps or frees the text tower and which always freeze
    ``logit_scale`` and ``visual_projection``)."""
    if callable(getattr(model, "freeze_unused_clip_parameters", None)):
        return []
    out: list[str] = []
    for prefix, module in model.named_modules():
        children = dict(module.named_children())
        if "vision_model" not in children or "text_model" not in children:
            continue
        dot = f"{prefix}." if prefix else ""
        out += [dot + n for n, _ in module.named_parameters(recurse=False)]  # logit_scale (and logit_bias)
        for child_name, child in children.items():
            part = dot + child_name
            if child_name == "vision_model" or any(a == part or a.startswith(part + ".") for a in analysed_layers):
                continue
            out += [f"{part}.{n}" for n, _ in child.named_parameters()]
    return out


def _invalid_reasons(report: SpectralReport) -> dict[str, str]:
    """``{layer: "status: reason"}`` for the report's layers without a valid alpha."""
    return {layer.name: f"{layer.status}: {layer.warning}" if layer.warning else layer.status
            for layer in report.layers if layer.status in ("invalid", "degenerate")}


def _status_of(reason: str) -> str:
    status = reason.partition(":")[0]
    return status if status in ("invalid", "degenerate") else "invalid"


def _host_layer_name(layer: str, module_names: set[str]) -> str:
    """A config layer under the model's own names (fused parts keep their ``_q/_k/_v``); as is if unknown."""
    try:
        host = module_of(layer, module_names)
    except KeyError:
        return layer
    base, _, suffix = layer.rpartition("_")
    return host if host.endswith(layer) or suffix not in ("q", "k", "v") else f"{host}_{suffix}"


def select_trainable_layers(config: SpectralTuningConfig, module_names: set[str]) -> list[str]:
    """Module names (as the config names them) of the analysed layers that stay trainable under
    ``config``'s rule; layers without a valid alpha (``invalid_layers``) follow ``invalid_alpha``."""
    alphas, unit_of = units_and_alphas(config.layer_alphas, config.granularity)
    frozen = frozen_units(alphas, config.freeze_rule, freeze_ratio=config.freeze_ratio,
                          alpha_threshold=config.alpha_threshold, k=config.k, seed=config.seed)
    trainable: list[str] = []
    invalid = list(config.invalid_layers or {}) if config.invalid_alpha == "train" else []
    for layer in [*config.layer_alphas, *invalid]:
        if layer in invalid or unit_of[layer] not in frozen:
            mod = _config_module(layer, module_names)
            if mod not in trainable:
                trainable.append(mod)  # a fused q/k/v module trains if any of its parts does
    return trainable


def _config_module(layer: str, module_names: set[str]) -> str:
    """The module of config ``layer`` under the config's naming (``attn.qkv_q`` -> ``attn.qkv``)."""
    host = module_of(layer, module_names)
    if host.endswith(layer):
        return layer
    base, _, suffix = layer.rpartition("_")
    return base if suffix in ("q", "k", "v") and host.endswith(base) else layer


class SpectralModel(AdapterHubMixin, PeftModel):
    """A model with spectral tuning applied; forwards to ``base_model`` (attributes too, like PEFT).

    It is a ``peft.PeftModel`` as far as ``transformers.Trainer`` and Accelerate look (``isinstance``,
    ``get_base_model``, ``active_adapters``, ``load_adapter``), so the Trainer treats it exactly as a
    LoRA model: the dataset columns the base model's ``forward`` takes are kept, every checkpoint and
    ``save_model`` write the adapter (``adapter_config.json`` + ``adapter_model.safetensors`` with only
    the trainable tensors), and ``resume_from_checkpoint`` / ``load_best_model_at_end`` load it back.
    ``PeftModel.__init__`` is not run: there is no tuner and no injected layer, only ``requires_grad``
    set on the base model's own parameters.

    Freezing trains the base model's weights in place, so there is no separate adapter to switch off:
    :meth:`disable_adapter` raises (use :meth:`unload` for the base model with its original
    ``requires_grad``; the original weights are those of the checkpoint you loaded it from).
    """

    default_commit_message = "Upload spectral tuning adapter"

    def __init__(self, base_model: nn.Module, config: SpectralTuningConfig, report: SpectralReport | None = None):
        nn.Module.__init__(self)  # not PeftModel.__init__: nothing is injected into the base model
        self.base_model = base_model
        self.spectral_config = config
        self.spectral_report = report
        # what PeftModel's own methods and transformers.Trainer read
        self.active_adapter = ADAPTER_NAME
        self.peft_type = PEFT_TYPE
        self.special_peft_forward_args = set()
        self._is_prompt_learning = False
        self._adapters_disabled = False
        self._original_requires_grad = {n: p.requires_grad for n, p in base_model.named_parameters()}
        self._loaded_parameters: list[str] = []  # the parameters from_pretrained loaded (by the base model's names)

    # ---- delegation -------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (the same object, with the spectral ``requires_grad`` applied); the Trainer
        reads its ``forward`` signature to decide which dataset columns to keep."""
        return self.base_model

    # ---- PEFT's adapter bookkeeping: one adapter, always active ----------------------------------
    @property
    def peft_config(self) -> dict[str, SpectralTuningConfig]:
        return {ADAPTER_NAME: self.spectral_config}

    @property
    def active_adapters(self) -> list[str]:
        return [ADAPTER_NAME]

    @property
    def active_peft_config(self) -> SpectralTuningConfig:
        return self.spectral_config

    @property
    def has_active_enabled_adapter(self) -> bool:
        return True

    @property
    def modules_to_save(self) -> set[str] | None:
        return set(self.spectral_config.modules_to_save) if self.spectral_config.modules_to_save else None

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        _check_adapter_name(adapter_name)

    def disable_adapter(self):
        """Not available: spectral tuning freezes layers and trains the others in place, so no adapter
        module sits beside the base weights to be switched off (as LoRA's is). To compare with the model
        before tuning, load the base checkpoint again; :meth:`unload` gives the tuned model back with
        its original ``requires_grad``."""
        raise NotImplementedError(
            "disable_adapter() has no meaning for spectral tuning: it trains the base model's own weights in place "
            "(no adapter layer to switch off); load the base checkpoint again for the untuned model"
        )

    def unload(self) -> nn.Module:
        """The base model, with every parameter's ``requires_grad`` as it was before spectral tuning
        (the weights keep their trained values: they were trained in place)."""
        for n, p in self.base_model.named_parameters():
            if n in self._original_requires_grad:
                p.requires_grad_(self._original_requires_grad[n])
        return self.base_model

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        """As :meth:`unload`: the weights were trained in place, so there is nothing to merge. Returns the
        plain base model with its original ``requires_grad``."""
        return self.unload()

    # ---- what is trained ------------------------------------------------------------------------
    # The config names layers relative to the CLIP vision tower (transferable); these properties give the
    # base model's own module names (``dict(model.named_modules())[name]`` works).
    @property
    def analysed_layers(self) -> list[str]:
        """Modules spectral tuning decided on: those with an alpha, and those without a valid one."""
        return host_layers(decided_layers(self.spectral_config), self.base_model)

    @property
    def trainable_layers(self) -> list[str]:
        return host_layers(self.spectral_config.trainable_layers, self.base_model)

    @property
    def frozen_layers(self) -> list[str]:
        trainable = set(self.trainable_layers)
        return [m for m in self.analysed_layers if m not in trainable]

    @property
    def invalid_layers(self) -> dict[str, str]:
        """Analysed modules without a valid alpha -> why (``config.invalid_alpha`` decided on them)."""
        names = {n for n, _ in self.base_model.named_modules()}
        return {module_of(n, names): why for n, why in (self.spectral_config.invalid_layers or {}).items()}

    def _apply_requires_grad(self) -> None:
        cfg = self.spectral_config
        modules = dict(self.base_model.named_modules())
        if cfg.inference_mode:
            for p in self.base_model.parameters():
                p.requires_grad_(False)
            return
        params = dict(self.base_model.named_parameters())
        for name in untargeted_clip_parameters(self.base_model, self.analysed_layers):
            params[name].requires_grad_(False)
        trainable = set(self.trainable_layers)
        for name in self.analysed_layers:
            mod = modules[name]
            train = name in trainable
            for pname, p in mod.named_parameters(recurse=False):
                p.requires_grad_(train or (pname == "bias" and cfg.train_biases))
        if not cfg.train_norms:
            for mod in modules.values():
                if is_norm(mod):
                    for p in mod.parameters(recurse=False):
                        p.requires_grad_(False)
        if cfg.modules_to_save:
            for name, mod in modules.items():
                if name_matches(name, cfg.modules_to_save):
                    mod.requires_grad_(True)
            for name, p in params.items():  # a parameter named directly, e.g. logit_scale
                if name_matches(name, cfg.modules_to_save):
                    p.requires_grad_(True)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), as PEFT."""
        trainable = sum(p.numel() for p in self.base_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.base_model.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """PEFT's one-line summary, plus how many analysed layers are frozen."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
        print(f"spectral tuning ({self.spectral_config.freeze_rule}, {self.spectral_config.estimator}): "
              f"{len(self.frozen_layers)} of {len(self.analysed_layers)} analysed layers frozen")
        invalid = self.invalid_layers
        if invalid:
            trainable = set(self.trainable_layers)
            print(f"{len(invalid)} analysed layer(s) without a valid alpha (invalid_alpha="
                  f"{self.spectral_config.invalid_alpha!r}):")
            for name, why in invalid.items():
                print(f"  {name}: {'trained' if name in trainable else 'frozen'} ({why})")

    # ---- adapter I/O ------------------------------------------------------------------------------
    def adapter_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors that are trainable (``requires_grad``), by their base-model state-dict names; their
        values from ``state_dict`` when given (keys of this model, ``base_model.``-prefixed, or of the base
        model), e.g. the gathered state dict the Trainer passes under FSDP/DeepSpeed."""
        names = [n for n, p in self.base_model.named_parameters() if p.requires_grad]
        return self._values(names, state_dict)

    def _values(self, names: list[str], state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """``names`` (parameters or buffers of the base model) -> their values, from ``state_dict`` if given."""
        if state_dict is None:
            own = {**dict(self.base_model.named_parameters()), **self.base_model.state_dict(keep_vars=True)}
            return {n: own[n].detach().cpu().contiguous() for n in names}
        out = {}
        for n in names:
            t = state_dict.get(f"base_model.{n}", state_dict.get(n))
            if t is None:
                raise KeyError(f"the state_dict given to save_pretrained lacks the trainable tensor {n!r}")
            out[n] = t.detach().cpu().contiguous()
        return out

    def adapter_layout(self) -> AdapterLayout:
        """What :meth:`save_pretrained` stores and how (see ``peft_format``): the trainable parameters, the
        trained Linear/Conv/norm layers among them as PEFT LN_TUNING targets (their whole state). On a
        model loaded for inference (nothing trainable): the tensors its adapter held."""
        names = [n for n, p in self.base_model.named_parameters() if p.requires_grad]
        return plan_layout(self.base_model, names or self._loaded_parameters)

    def peft_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of ``adapter_model.safetensors`` under the keys PEFT reads (what
        ``peft.get_peft_model_state_dict(self)`` returns): ``base_model.model.<layer>.ln_tuning_layers.<name>``
        for the LN_TUNING targets, ``base_model.model.<parameter>`` for the other trained parameters."""
        layout = self.adapter_layout()
        values = self._values(list(layout.tensors), state_dict)
        return {layout.file_key(n): values[n] for n in layout.tensors}

    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's keys (:meth:`peft_state_dict`) -> this model's own state-dict keys (``base_model.<name>``),
        for ``peft.set_peft_model_state_dict``; keys that are none of this adapter's stay as they are (and
        are reported by ``load_state_dict`` as unexpected)."""
        layout = self.adapter_layout()
        keys = layout.file_keys()
        return {(f"base_model.{keys[k]}" if k in keys else k): t for k, t in tensors.items()}

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None,
                        safe_serialization: bool = True, is_main_process: bool = True,
                        selected_adapters: list[str] | None = None, **card_kwargs) -> Path:
        """``adapter_config.json`` + ``adapter_model.safetensors`` (only the trained tensors) + README.md,
        in PEFT's LN_TUNING format: ``peft.PeftModel.from_pretrained(base, directory)`` loads it in a plain
        PEFT install, with this model's outputs (see ``peft_format``); the spectral config (alphas, rule,
        trainable and invalid layers) and the list of stored tensors go in its ``spectral_tuning`` entry.

        Takes ``transformers.Trainer``'s call (``state_dict``, ``is_main_process``) and PEFT's
        (``safe_serialization``, ``selected_adapters``): only safetensors are written, and only the main
        process writes. A trainable layer whose parameters were all frozen afterwards (e.g. by
        ``freeze_unused_parameters``) is saved as frozen: the saved config says what was trained. Any
        other ``requires_grad`` that disagrees with the config is an error naming the tensors (the adapter
        would not load)."""
        if not safe_serialization:
            raise ValueError("spectral adapters are saved as safetensors only (safe_serialization=False is not supported)")
        for name in selected_adapters or ():
            _check_adapter_name(name)
        out = Path(save_directory)
        tensors = self.adapter_state_dict(state_dict)
        if not tensors:
            raise ValueError("no trainable parameter to save (inference_mode, or every layer frozen)")
        config = self._config_to_save()
        required, forbidden = adapter_tensor_names(self.base_model, config)
        frozen, trained = required - set(tensors), forbidden & set(tensors)
        if frozen or trained:
            raise ValueError(
                "the parameters' requires_grad disagrees with the spectral config, so the adapter would not load: "
                + "; ".join(([f"{_some(frozen)} frozen although the config trains their modules"] if frozen else [])
                            + ([f"{_some(trained)} trainable although the config freezes their layers"] if trained else []))
                + " (change what trains through the config: trainable_layers, modules_to_save, train_biases, train_norms)"
            )
        if not is_main_process:
            return out
        layout = plan_layout(self.base_model, tensors)
        if not layout.targets:
            logger.warning("%s: no trained Linear, Conv or normalisation layer, so plain PEFT cannot load this adapter "
                           "(its LN_TUNING method needs a target module); SpectralModel.from_pretrained does", out)
        values = self._values(list(layout.tensors), state_dict)
        config.library_version = __version__
        data = peft_config_dict(spectral_config=config.to_dict(), layout=layout,
                                base_model_name_or_path=config.base_model_name_or_path, revision=config.revision,
                                inference_mode=config.inference_mode)
        card = self._model_card(config, tensors, **card_kwargs)  # everything that can fail happens before the first write
        return adapters.write_adapter_files(out, config=data, tensors={layout.file_key(n): values[n] for n in layout.tensors},
                                            card=card, metadata={"format": "pt"})

    def _config_to_save(self) -> SpectralTuningConfig:
        """The config with the trainable layers whose parameters are all frozen now moved to the frozen ones."""
        cfg = self.spectral_config
        modules = dict(self.base_model.named_modules())
        trained = [m for m, host in zip(cfg.trainable_layers, self.trainable_layers)
                   if any(p.requires_grad for p in modules[host].parameters(recurse=False))]
        return cfg if trained == cfg.trainable_layers else dataclasses.replace(cfg, trainable_layers=trained)

    def _model_card(self, cfg: SpectralTuningConfig, tensors, **kwargs) -> str:
        trainable, total = self.get_nb_trainable_parameters()
        alphas = list(cfg.layer_alphas.values())
        trained = set(host_layers(cfg.trainable_layers, self.base_model))
        frozen_layers = [canonical_name(m) for m in self.analysed_layers if m not in trained]
        return adapters.render_adapter_card(
            "spectral_adapter.md", tags=["spectral-tuning", "opentrans", "heavy-tailed-self-regularization"],
            base_model=cfg.base_model_name_or_path,
            config=cfg, trainable=trainable, total=total, frozen_layers=frozen_layers,
            trainable_layers=cfg.trainable_layers, num_tensors=len(tensors), version=__version__,
            alpha_min=min(alphas), alpha_max=max(alphas), **kwargs,
        )

    @classmethod
    def _read_adapter(cls, model_id, revision=None, token=None) -> tuple[Path, SpectralTuningConfig, dict,
                                                                         AdapterLayout | None]:
        """(directory, config, tensors by their names in the saving model, layout; None for an adapter of an
        earlier version). The file must hold exactly the tensors the config lists (new format)."""
        d, data, tensors = adapters.read_adapter_files(model_id, peft_type=ADAPTER_PEFT_TYPES,
                                                       what="spectral tuning adapter", revision=revision, token=token)
        config_data, layout = split_adapter_config(data, f"{d / CONFIG_NAME}: ")
        config = SpectralTuningConfig.from_dict(config_data, where=f"{d / CONFIG_NAME}: ")
        if config.layer_alphas is None or config.trainable_layers is None:
            raise ValueError(f"{d / CONFIG_NAME} lacks layer_alphas/trainable_layers: it was not written by save_pretrained")
        if layout is not None:
            tensors = layout.to_model_names(tensors, d / WEIGHTS_NAME)
        return d, config, tensors, layout

    @staticmethod
    def _checked_tensors(base_model: nn.Module, config: SpectralTuningConfig, tensors: dict[str, torch.Tensor],
                         layout: AdapterLayout | None, where: Path) -> dict[str, torch.Tensor]:
        """The adapter's tensors under ``base_model``'s own names, checked: every target module's whole
        state and every listed parameter (new format), exactly what the config says was trained
        (:func:`check_adapter_tensors`), buffers with the model's shapes. Nothing is changed."""
        host = host_tensor_names(base_model, tensors)  # an adapter saved on another host of the same CLIP
        if layout is not None:
            layout.check_model(base_model, dict(zip(tensors, host)), where)
        params = {n for n, _ in base_model.named_parameters()}
        buffers = base_model.state_dict()
        check_adapter_tensors(base_model, config, {n: t for n, t in host.items() if n not in buffers or n in params},
                              where)
        bad = [f"{n} {tuple(t.shape)} vs {tuple(buffers[n].shape)}" for n, t in host.items()
               if n in buffers and n not in params and tuple(t.shape) != tuple(buffers[n].shape)]
        if bad:
            raise ValueError(f"{where}: {_some(bad)} have a shape other than the model's")
        return host

    @staticmethod
    def _copy_into(base_model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        own = {**dict(base_model.named_parameters()), **base_model.state_dict(keep_vars=True)}
        with torch.no_grad():
            for n, t in tensors.items():
                own[n].copy_(t.to(own[n].device, own[n].dtype))

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, model_id: str | os.PathLike, adapter_name: str = ADAPTER_NAME, *,
                        is_trainable: bool = False, revision: str | None = None, token=None) -> SpectralModel:
        """Re-apply a saved adapter to ``base_model`` (no re-analysis) and load its tensors. ``model_id``: a
        directory written by :meth:`save_pretrained` (a ``Trainer``'s ``output_dir`` or checkpoint too) or a
        Hub repo id; adapters of earlier versions (``peft_type`` ``SPECTRAL_TUNING``) load too.

        As PEFT: ``is_trainable=False`` loads for inference (every parameter frozen); ``True`` restores
        the adapter's trainable/frozen split to continue training. The file must hold exactly the
        tensors the config says were trained (the analysed layers it trained, ``modules_to_save``, and
        every other tensor it lists, e.g. a framework's head), with the model's shapes and finite
        floating-point values; otherwise nothing is changed and the error names the file and the tensors.
        """
        _check_adapter_name(adapter_name)
        d, config, tensors, layout = cls._read_adapter(model_id, revision=revision, token=token)
        config.inference_mode = not is_trainable
        tensors = cls._checked_tensors(base_model, config, tensors, layout, d / WEIGHTS_NAME)
        model = get_spectral_model(base_model, config)
        cls._copy_into(base_model, tensors)
        params = dict(base_model.named_parameters())
        model._loaded_parameters = [n for n in tensors if n in params]
        if is_trainable:
            _warn_frozen_clip_tensors(model, tensors, d / WEIGHTS_NAME)
        return model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str = ADAPTER_NAME, is_trainable: bool = False,
                     revision: str | None = None, token=None, **kwargs) -> None:
        """Load a saved adapter's tensors into this model (what ``Trainer`` calls on ``resume_from_checkpoint``
        and ``load_best_model_at_end``). The adapter must have been made by the same spectral config (same
        analysed layers and trainable layers); the file is checked as in :meth:`from_pretrained` before any
        weight changes. ``requires_grad`` is left as it is (``is_trainable`` is accepted for PEFT's signature)."""
        _check_adapter_name(adapter_name)
        d, config, tensors, layout = self._read_adapter(model_id, revision=revision, token=token)
        mine = self._config_to_save()
        for field_name in ("layer_alphas", "trainable_layers", "modules_to_save", "train_norms", "train_biases"):
            if getattr(config, field_name) != getattr(mine, field_name):
                raise ValueError(f"{d / CONFIG_NAME}: {field_name} differs from this SpectralModel's config, so it is "
                                 "not an adapter of this model (load it with SpectralModel.from_pretrained(base, ...))")
        tensors = self._checked_tensors(self.base_model, config, tensors, layout, d / WEIGHTS_NAME)
        self._copy_into(self.base_model, tensors)


def read_spectral_adapter(model_id: str | os.PathLike, revision: str | None = None,
                          token=None) -> tuple[SpectralTuningConfig, dict[str, torch.Tensor]]:
    """A saved spectral adapter's config and tensors, the tensors by their names in the model it was saved
    from (in either format: this version's PEFT LN_TUNING keys are mapped back), the file checked against
    the tensors its config lists."""
    _, config, tensors, _ = SpectralModel._read_adapter(model_id, revision=revision, token=token)
    return config, tensors


class SpectralStateDictHooks(BaseTuner):
    """What ``peft.get_peft_model_state_dict`` and ``peft.set_peft_model_state_dict`` call on a
    :class:`SpectralModel` (they look the hooks up by ``peft_config[name].peft_type``; never instantiated):
    the state dict is the adapter file's (:meth:`SpectralModel.peft_state_dict`), and loading one maps its
    keys back to the model's own (:meth:`SpectralModel.load_peft_state_dict`)."""

    prefix = "ln_tuning_"

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        _check_adapter_name(adapter_name)
        return _spectral_model(model).peft_state_dict(state_dict)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # the keys of peft_state_dict() carry no adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        _check_adapter_name(adapter_name)
        return _spectral_model(model).load_peft_state_dict(state_dict)


def _spectral_model(model) -> SpectralModel:
    if not isinstance(model, SpectralModel):
        raise TypeError(f"a spectral tuning state dict belongs to a SpectralModel, got {type(model).__name__}")
    return model


# PEFT's PeftType is an enum that cannot be extended (register_peft_method refuses new names), but its
# state-dict functions only look the tuner up in this dict, by the config's peft_type: registering the hooks
# under our own type makes them work on a SpectralModel and changes nothing for PEFT's own methods.
PEFT_TYPE_TO_TUNER_MAPPING.setdefault(PEFT_TYPE, SpectralStateDictHooks)


def _warn_frozen_clip_tensors(model: SpectralModel, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Say so when an adapter holds CLIP text-tower tensors (or projections, ``logit_scale``) that the
    config leaves untargeted: loaded, but frozen (adapters of earlier versions, which trained them)."""
    untargeted = set(untargeted_clip_parameters(model.base_model, model.analysed_layers))
    params = dict(model.base_model.named_parameters())
    frozen = [n for n in tensors if n in untargeted and not params[n].requires_grad]
    if frozen:
        logger.warning(
            "%s holds %s outside the CLIP vision tower, which this config does not target: their values are "
            "loaded, but they stay frozen (the default trains only the image encoder; earlier versions left the "
            "text tower trainable). Name them in modules_to_save to train them", where, _some(frozen))


def _check_adapter_name(adapter_name: str) -> None:
    if adapter_name != ADAPTER_NAME:
        raise ValueError(f"a SpectralModel has one adapter, {ADAPTER_NAME!r}; got adapter_name={adapter_name!r}")
