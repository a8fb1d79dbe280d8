"""``SparseMask``: a binary weight mask stored as a small adapter, transferable between models that
contain the same CLIP image encoder."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from opentrans_hf.methods import base as adapters
from opentrans_hf.methods.base import CONFIG_NAME, WEIGHTS_NAME, AdapterHubMixin
from opentrans_hf.methods.sparse_mask.compact import compact_model
from opentrans_hf.methods.sparse_mask.export import export_model
from opentrans_hf.methods.sparse_mask.layer import (  # noqa: F401  (pack_bits, unpack_bits: also importable from here)
    _BUFFER,
    _HOOK_ATTR,
    install_hooks,
    pack_bits,
    remove_hooks,
    resolve_parameter,
    unpack_bits,
)
from opentrans_hf.methods.sparse_mask.structured import check_structure
from opentrans_hf.methods.sparse_mask.tuners import install_slot_hook, peft_free_name, unpatch
from opentrans_hf.utils.io import atomic_write_with, is_integer, is_number
from opentrans_hf.utils.naming import VISION_PREFIXES, canonical_name
from opentrans_hf.utils.plotting import figure
from opentrans_hf.utils.version import __version__

PEFT_TYPE = "SPARSE_MASK"

MASK_SUBFOLDER = "mask_adapter"
"""Where a model directory saved with its mask (a training run's ``model/``) keeps it: its weights are zero
wherever the mask prunes, and loading the directory checks that they still are."""


CONFIG_FIELDS = ("peft_type", "base_model_name_or_path", "method", "target_sparsity", "sparsity", "num_weights",
                 "shapes", "layer_densities", "extra", "library_version")


def _bad(name: str, expected: str, value):
    raise ValueError(f"SparseMask {name} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_config(cfg: dict, where) -> dict[str, list[int]]:
    """Check the fields of a mask adapter's ``adapter_config.json`` (``where``); returns its shapes."""
    unknown = sorted(set(cfg) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; a sparse mask adapter config has {list(CONFIG_FIELDS)}")
    shapes = cfg.get("shapes")
    if not isinstance(shapes, dict) or not shapes:
        raise ValueError(f"{where} lacks the 'shapes' of the masks (a non-empty object of name -> shape), got {shapes!r}")
    for name, shape in shapes.items():
        if not (isinstance(shape, list) and shape and all(is_integer(x) and x > 0
                                                          for x in shape)):
            raise ValueError(f"{where}: field 'shapes' entry {name!r} must be a list of positive integers, got {shape!r}")
    for key in ("sparsity", "target_sparsity"):
        value = cfg.get(key)
        if value is not None and not (is_number(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{where}: field {key!r} must be a number in [0, 1]"
                             f"{' or null' if key == 'target_sparsity' else ''}, got {value!r} ({type(value).__name__})")
    num = cfg.get("num_weights")
    total = sum(math.prod(s) for s in shapes.values())
    if num is not None and num != total:
        raise ValueError(f"{where}: field 'num_weights' is {num!r} but the shapes hold {total} weights")
    densities = cfg.get("layer_densities")
    if densities is not None:
        if not isinstance(densities, dict) or set(densities) != set(shapes):
            raise ValueError(f"{where}: field 'layer_densities' must have one entry per mask in 'shapes'")
        bad = {n: v for n, v in densities.items() if not (is_number(v) and 0.0 <= v <= 1.0)}
        if bad:
            raise ValueError(f"{where}: field 'layer_densities' must hold numbers in [0, 1], got {bad}")
    if cfg.get("library_version") is not None and not isinstance(cfg["library_version"], str):
        raise ValueError(f"{where}: field 'library_version' must be a string, got {cfg['library_version']!r}")
    return shapes


class SparseMask(AdapterHubMixin):
    """Boolean masks (True = kept) by canonical weight name, plus what made them.

    ``apply(model)`` zeroes the masked weights and keeps them zero through training: their gradients
    are masked, and a forward pre-hook re-applies the mask before every forward. The mask lives in
    non-persistent buffers of the owning modules, so ``state_dict`` keys are unchanged, ``deepcopy``
    copies it, and ``.to(device)`` moves it.

    Saving, loading, the model card and ``push_to_hub`` go through :mod:`opentrans_hf.methods.base`, the
    persistence shared with :class:`~opentrans_hf.SpectralModel`.
    """

    default_commit_message = "Upload sparse mask adapter"

    def __init__(self, masks: dict[str, torch.Tensor], *, base_model_name_or_path: str | None = None,
                 method: str = "", target_sparsity: float | None = None, extra: dict | None = None):
        self.masks = {}
        for name, m in masks.items():
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"mask {name!r} must be a tensor, got {type(m).__name__}")
            self.masks[name] = m.detach().to("cpu", torch.bool)
        if isinstance(base_model_name_or_path, os.PathLike):
            base_model_name_or_path = str(base_model_name_or_path)
        if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
            _bad("base_model_name_or_path", "a string or None", base_model_name_or_path)
        if not isinstance(method, str):
            _bad("method", "a string", method)
        if target_sparsity is not None and not (is_number(target_sparsity) and 0.0 <= target_sparsity <= 1.0):
            _bad("target_sparsity", "a number in [0, 1] or None", target_sparsity)
        if extra is not None and not isinstance(extra, dict):
            _bad("extra", "a dict or None", extra)
        if extra and "structure" in extra:  # a structured mask's kept heads/neurons (structured.py)
            check_structure(extra["structure"], "field 'extra.structure'")
        self.base_model_name_or_path = base_model_name_or_path
        self.method = method
        self.target_sparsity = target_sparsity
        self.extra = dict(extra or {})

    # ---- statistics ---------------------------------------------------------------------------
    @property
    def num_weights(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    @property
    def sparsity(self) -> float:
        """Fraction of the masked tensors' weights that are pruned."""
        n = self.num_weights
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / n if n else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - int(m.sum()) / m.numel() for n, m in self.masks.items()}

    def summary(self) -> str:
        lines = [f"SparseMask(method={self.method!r}, {len(self.masks)} tensors, {self.num_weights:,d} weights, "
                 f"sparsity {100 * self.sparsity:.2f}%" + (f", target {100 * self.target_sparsity:.2f}%" if self.target_sparsity is not None else "") + ")"]
        width = max((len(n) for n in self.masks), default=10)
        for n, s in self.layer_sparsity().items():
            lines.append(f"{n:<{width}}  {str(tuple(self.masks[n].shape)):<16} {100 * s:6.2f}%")
        kinds: dict[str, list[int]] = {}  # by layer kind: the module name's last component (q_proj, fc1, ...)
        for n, m in self.masks.items():
            module = n.rpartition(".")[0] if n.rpartition(".")[2] in ("weight", "bias") else n
            counts = kinds.setdefault(module.rpartition(".")[2] or module, [0, 0])
            counts[0] += m.numel() - int(m.sum())
            counts[1] += m.numel()
        lines.append("by layer kind:")
        lines += [f"  {k:<{width - 2}}  {t:>16,d} {100 * p / t:6.2f}%" for k, (p, t) in kinds.items()]
        for block, entry in (self.extra.get("structure") or {}).items():
            lines.append(f"{block}: " + ", ".join(f"{len(entry[u])}/{entry[n]} {u} kept" for u, n in
                                                 (("heads", "num_heads"), ("neurons", "intermediate_size")) if u in entry))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SparseMask(method={self.method!r}, tensors={len(self.masks)}, sparsity={self.sparsity:.4f})"

    def __eq__(self, other) -> bool:
        return (isinstance(other, SparseMask) and self.masks.keys() == other.masks.keys()
                and all(torch.equal(self.masks[k], other.masks[k]) for k in self.masks))

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG: sparsity per layer (needs matplotlib)."""
        names = list(self.masks)
        vals = [100 * v for v in self.layer_sparsity().values()]
        fig = figure(figsize=(max(8, 0.18 * len(names) + 3), 4.5))
        ax = fig.subplots()
        ax.bar(range(len(names)), vals, color="tab:purple")
        ax.axhline(100 * self.sparsity, color="k", ls="--", lw=1, label=f"overall {100 * self.sparsity:.1f}%")
        ax.set_ylabel("pruned weights (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"Sparsity per layer ({self.method or 'mask'})")
        if len(names) <= 80:
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=90, fontsize=6)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return atomic_write_with(Path(path), lambda p: fig.savefig(p, format="png", dpi=100))

    # ---- applying -------------------------------------------------------------------------------
    def resolve(self, model: nn.Module, strict: bool = True) -> tuple[dict[str, str], list[str]]:
        """(canonical name -> model parameter name, skipped entries). strict: a missing layer or a shape
        mismatch is an error naming the layer (and both shapes)."""
        params = dict(model.named_parameters())
        # a PEFT model: names as before PEFT wrapped it (no base_model.model., no .base_layer)
        unwrapped = {peft_free_name(n): n for n in params}
        if len(unwrapped) != len(params):
            unwrapped = {n: n for n in params}
        found, skipped = {}, []
        for name, m in self.masks.items():
            target = resolve_parameter(model, name, unwrapped)
            target = unwrapped[target] if target is not None else None
            if target is None:
                if strict:
                    raise KeyError(f"mask entry {name!r} matches no parameter of {type(model).__name__} (tried the "
                                   f"prefixes {[p for p in VISION_PREFIXES if p]} and '*vision_model.'); "
                                   "use strict=False to apply the rest")
                skipped.append(name)
                continue
            if tuple(params[target].shape) != tuple(m.shape):
                if strict:
                    raise ValueError(f"mask entry {name!r} has shape {tuple(m.shape)} but {type(model).__name__}."
                                     f"{target} has shape {tuple(params[target].shape)}")
                skipped.append(name)
                continue
            found[name] = target
        return found, skipped

    def apply(self, model: nn.Module, strict: bool = True, keep_pruned: bool = False) -> list[str]:
        """Zero the masked weights of ``model`` and keep them zero; returns the skipped entries
        (always empty with ``strict=True``). Masks already applied to a weight are combined (AND).
        ``keep_pruned=True`` remembers the pruned values so ``remove(bake=False)`` can restore them.

        On a PEFT model (LoRA, LoHa, LoKr, IA3), or a model PEFT wraps later, a masked layer's effective
        weight is ``(W + ΔW) ⊙ M`` in the forward and after ``merge_and_unload()``
        (:mod:`opentrans_hf.methods.sparse_mask.tuners`)."""
        found, skipped = self.resolve(model, strict)
        modules = dict(model.named_modules())
        for name, target in found.items():
            mod_name, _, pname = target.rpartition(".")
            module = modules[mod_name]
            param = getattr(module, pname)
            key = _BUFFER.format(pname)
            mask = self.masks[name].to(param.device)
            existing = getattr(module, key, None)
            if existing is not None:
                mask = mask & existing
            with torch.no_grad():
                if keep_pruned and not hasattr(module, key + "_pruned"):
                    module.register_buffer(key + "_pruned", param.detach().clone(), persistent=False)
                param.mul_(mask)
            module.register_buffer(key, mask, persistent=False)
            install_hooks(module, pname)
            if pname == "weight":  # a PEFT tuner layer around it (now or later) adds a delta masked too
                install_slot_hook(model, mod_name)
        return skipped

    def pruned_nonzero(self, model: nn.Module) -> dict[str, int]:
        """``{model parameter name: count}`` of the weights ``model`` holds non-zero where this mask prunes,
        for the layers that have any, most first; ``{}`` when the weights agree with the mask (a model the
        mask was applied to, or saved with it). Every mask entry must fit the model (:meth:`resolve`)."""
        found, _ = self.resolve(model, strict=True)
        params = dict(model.named_parameters())
        counts = {}
        for name, target in found.items():
            weight = params[target].detach()
            pruned = self.masks[name].to(weight.device).logical_not()
            n = int(torch.count_nonzero(weight.ne(0).logical_and_(pruned)))  # bool ops: 2x faster than masked_fill
            if n:
                counts[target] = n
        return dict(sorted(counts.items(), key=lambda item: -item[1]))

    def check_weights(self, model: nn.Module, where: str = "") -> None:
        """Refuse (``ValueError``) a ``model`` whose weights contradict this mask: the message names the layer
        with the most non-zero weights where the mask (``where``: e.g. its directory) is 0, and the count. For a
        model saved with this mask; a mask meant to prune a model is applied with :meth:`apply` instead."""
        bad = self.pruned_nonzero(model)
        if not bad:
            return
        (layer, n), *rest = bad.items()
        more = (f" (and {len(rest)} more layer{'s' * (len(rest) != 1)}: {sum(bad.values())} in all)" if rest else "")
        mask = f"the mask {where}" if where else "the mask"
        raise ValueError(f"layer {layer} has {n} non-zero weights where {mask} is 0{more}")

    @staticmethod
    def remove(model: nn.Module, bake: bool = True) -> int:
        """Take every applied mask off ``model``; returns how many weights were unmasked. ``bake=True``
        keeps the pruned weights at zero (a plain sparse model); ``bake=False`` restores the values they
        had when the mask was applied (needs ``apply(..., keep_pruned=True)``)."""
        unpatch(model)
        return sum(remove_hooks(module, bake=bake, name=mod_name) for mod_name, module in model.named_modules())

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs) -> SparseMask:
        """The masks currently applied to ``model``, under canonical names."""
        masks = {}
        for mod_name, module in model.named_modules():
            for pname in getattr(module, _HOOK_ATTR, {}) or {}:
                full = f"{mod_name}.{pname}" if mod_name else pname
                masks[canonical_name(peft_free_name(full))] = getattr(module, _BUFFER.format(pname)).cpu()
        return cls(masks, **kwargs)

    def export(self, model: nn.Module, format: str = "csr", **kwargs) -> dict[str, str]:
        """Swap ``model``'s masked Linear layers for inference kernels in place: ``"csr"`` (CPU,
        ``SparseLinear``; ``min_sparsity=0.85``) or ``"2:4"`` (CUDA semi-structured). Inference only;
        returns ``{module name: "csr" | "2:4" | "dense"}``. See :func:`opentrans_hf.methods.sparse_mask.export.export_model`."""
        return export_model(self, model, format, **kwargs)

    def compact(self, model: nn.Module, strict: bool = True, bake: bool = True) -> nn.Module:
        """Apply this mask to ``model`` and physically remove the attention heads and MLP neurons it
        prunes entirely (fewer q/k/v rows and out_proj columns, fewer fc1 rows and fc2 columns), in
        place, on any host of the CLIP vision tower; returns ``model``. Outputs equal the masked dense
        model's. A structured mask removes all its units; an unstructured one only the units it happens
        to prune whole (the rest stays as zeros). See :func:`opentrans_hf.methods.sparse_mask.compact.compact_model`."""
        return compact_model(self, model, strict=strict, bake=bake)

    # ---- adapter I/O ----------------------------------------------------------------------------
    def to_config(self) -> dict:
        return {
            "peft_type": PEFT_TYPE,
            "base_model_name_or_path": self.base_model_name_or_path,
            "method": self.method,
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "num_weights": self.num_weights,
            "shapes": {n: list(m.shape) for n, m in self.masks.items()},
            "layer_densities": {n: 1.0 - s for n, s in self.layer_sparsity().items()},
            "extra": self.extra,
            "library_version": __version__,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """``adapter_config.json`` + ``adapter_model.safetensors`` (bit-packed masks) + README.md."""
        if not self.masks:
            raise ValueError("the mask is empty: nothing to save")
        packed = {n: pack_bits(m) for n, m in self.masks.items()}
        config = self.to_config()
        card = self._model_card(config)  # everything that can fail happens before the first write
        return adapters.write_adapter_files(save_directory, config=config, tensors=packed, card=card,
                                            metadata={"format": "packbits"}, sort_keys=False)

    def _model_card(self, config: dict) -> str:
        return adapters.render_adapter_card(
            "sparse_mask.md", tags=["sparse-mask", "pruning", "opentrans", "open-vocabulary-segmentation"],
            base_model=self.base_model_name_or_path,
            config=config, layers=self.layer_sparsity(), num_tensors=len(self.masks),
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None, token=None) -> SparseMask:
        """Load a mask adapter (local directory or Hub id). The config and the bit-packed file are checked
        against each other (names, shapes, packed sizes, recorded sparsity and densities); every error
        names the file, the field or entry, and the value."""
        d, cfg, packed = adapters.read_adapter_files(name_or_path, peft_type=PEFT_TYPE, what="sparse mask adapter",
                                                     revision=revision, token=token)
        where = d / CONFIG_NAME
        shapes = _check_config(cfg, where)
        if set(packed) != set(shapes):
            missing, extra = sorted(set(shapes) - set(packed)), sorted(set(packed) - set(shapes))
            raise ValueError(f"{d / WEIGHTS_NAME} does not match {CONFIG_NAME}: missing {missing[:3]}, unexpected {extra[:3]}")
        masks = {}
        for name, shape in shapes.items():
            t = packed[name]
            n = math.prod(shape)
            if t.dtype != torch.uint8 or t.ndim != 1 or t.numel() != (n + 7) // 8:
                raise ValueError(f"{d / WEIGHTS_NAME}: entry {name!r} holds {t.numel()} {t.dtype} values; expected "
                                 f"{(n + 7) // 8} uint8 bytes for shape {tuple(shape)}")
            masks[name] = unpack_bits(t, tuple(shape))
        try:
            mask = cls(masks, base_model_name_or_path=cfg.get("base_model_name_or_path"), method=cfg.get("method", ""),
                       target_sparsity=cfg.get("target_sparsity"), extra=cfg.get("extra"))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        recorded = cfg.get("sparsity")
        if recorded is not None and abs(recorded - mask.sparsity) > 1e-9:
            raise ValueError(f"{d}: the masks' sparsity {mask.sparsity:.6f} differs from the recorded {recorded:.6f} (corrupt file?)")
        densities = cfg.get("layer_densities") or {}
        off = [f"{n}: recorded {densities[n]}, actual {1.0 - s}" for n, s in mask.layer_sparsity().items()
               if n in densities and abs(densities[n] - (1.0 - s)) > 1e-9]
        if off:
            raise ValueError(f"{d}: {len(off)} mask(s) differ from the layer_densities recorded in {CONFIG_NAME} "
                             f"(corrupt file?): {'; '.join(off[:3])}")
        return mask
