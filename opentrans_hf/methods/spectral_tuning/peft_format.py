"""The on-disk format of a spectral adapter: a PEFT ``LN_TUNING`` adapter, which a plain PEFT install loads.

PEFT 0.21 cannot be taught a new ``peft_type`` (``PeftType`` is an enum), but its ``LN_TUNING`` method
takes any module as a target: it keeps a trained copy of each target module beside the original and
runs the copy; ``merge_and_unload()`` puts the copies in place of the originals. Spectral tuning trains
a model's own weights in place, so a spectral adapter is written as one:

- ``adapter_config.json``: PEFT's ``LNTuningConfig`` (``peft_type`` ``"LN_TUNING"``, ``target_modules``:
  the model's names of the modules stored as copies) plus one key PEFT ignores with a warning,
  ``"spectral_tuning"``: ``{"format_version": 2, "config": <the SpectralTuningConfig: alphas, rule,
  trainable and invalid layers>, "tensors": <every stored tensor by its name in the model>}``.
- ``adapter_model.safetensors``: a target module's state (parameters and persistent buffers) under
  ``base_model.model.<module>.ln_tuning_layers.<name>``, as PEFT names the copy's tensors (the adapter
  name stripped); every other trained parameter under ``base_model.model.<parameter>``, which PEFT's
  loader passes through to the base model's own parameter (the mechanism it uses for LoRA's
  ``bias="all"``).

Targets are the trained layers a parent calls rather than reads: leaf ``Linear``/``Conv``/normalisation
modules whose own parameters are all trained, not shared, not held by a module outside its registered
children (a layer called through a Python list, as transformers' Mask2Former heads do: PEFT swaps the
registered module only) and not inside an ``nn.MultiheadAttention`` (which reads its
``out_proj.weight`` directly). A module that reads a child's weight instead of calling it, in a way
none of these rules sees, would run its untuned weight under PEFT: the hosts of this library are
tested for equal outputs. Everything else trained
(``class_embedding``, position embeddings, an attention's ``in_proj_weight``, a root parameter such as
``logit_scale``, the bias of a frozen layer with ``train_biases``) is stored directly. Both give the
tuned model's outputs under PEFT; only the targets have a copy PEFT can switch off
(``disable_adapter``) and that costs memory.

This module knows the layout only: which tensors go where, the file keys, and the JSON shape. It
imports nothing of the spectral config.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from torch import nn

PEFT_FORMAT_TYPE = "LN_TUNING"
LEGACY_PEFT_TYPE = "SPECTRAL_TUNING"  # adapters of 0.2 and earlier: the config itself, tensors under model names
SECTION = "spectral_tuning"
FORMAT_VERSION = 2
KEY_PREFIX = "base_model.model."
COPY_PART = "ln_tuning_layers"
NORM_CLASSES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
COPYABLE = (nn.Linear, nn.modules.conv._ConvNd, *NORM_CLASSES)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_CLASSES) or "norm" in type(module).__name__.lower()


def _some(names) -> str:
    """A count and a few examples: ``2 tensor(s) (a, b)``, ``47 tensor(s) (a, b, c, ...)``."""
    names = sorted(names)
    return f"{len(names)} tensor(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


@dataclass(frozen=True)
class AdapterLayout:
    """Which tensors an adapter stores and how: ``targets`` (modules stored whole, as LN_TUNING copies)
    and ``tensors`` (every stored tensor by its name in the model: the targets' state entries, then the
    parameters stored directly)."""

    targets: tuple[str, ...]
    tensors: tuple[str, ...]

    def target_of(self, name: str) -> str | None:
        """The target module holding tensor ``name`` (targets are leaves: ``<target>.<attribute>``)."""
        owner = name.rpartition(".")[0]
        return owner if owner in self._target_set else None

    @cached_property
    def _target_set(self) -> frozenset[str]:
        return frozenset(self.targets)

    def direct(self) -> list[str]:
        """The tensors stored directly (not in a target's copy)."""
        return [n for n in self.tensors if self.target_of(n) is None]

    def file_key(self, name: str) -> str:
        target = self.target_of(name)
        if target is None:
            return KEY_PREFIX + name
        return f"{KEY_PREFIX}{target}.{COPY_PART}.{name[len(target) + 1:]}"

    def file_keys(self) -> dict[str, str]:
        """``{file key: name in the model}`` for every stored tensor."""
        return {self.file_key(n): n for n in self.tensors}

    def to_model_names(self, tensors: dict, where) -> dict:
        """An adapter file's tensors by their names in the model; the file must hold exactly the tensors
        the config lists (``where``: the file, named in the error)."""
        keys = self.file_keys()
        missing = [n for k, n in keys.items() if k not in tensors]
        extra = [k for k in tensors if k not in keys]
        if missing or extra:
            raise ValueError(
                f"{where} does not hold exactly the tensors adapter_config.json lists as trained: "
                + "; ".join(([f"it lacks {_some(missing)}"] if missing else [])
                            + ([f"it holds {_some(extra)} that the config does not list"] if extra else [])))
        return {keys[k]: t for k, t in tensors.items()}

    def check_model(self, model: nn.Module, host_names: dict[str, str], where) -> None:
        """The layout against ``model`` (``host_names``: listed name -> the model's own name): each target
        is a module of the model whose whole state is listed, each direct tensor one of its parameters."""
        modules = dict(model.named_modules())
        params = {n for n, _ in model.named_parameters()}
        known = params | set(model.state_dict())
        unknown = [n for n in self.tensors if host_names.get(n, n) not in known]
        if unknown:
            raise ValueError(f"{where} holds tensors {type(model).__name__} does not have: {_some(unknown)}")
        listed: dict[str, set[str]] = {}
        for name in self.tensors:
            target = self.target_of(name)
            host = host_names.get(name, name)
            if target is None:
                if host not in params:
                    raise ValueError(f"{where} holds {name} as a parameter, but it is a buffer of "
                                     f"{type(model).__name__}")
            else:
                listed.setdefault(host.rpartition(".")[0], set()).add(host.rpartition(".")[2])
        for module_name, attrs in listed.items():
            module = modules.get(module_name)
            if module is None:
                raise ValueError(f"{where}: adapter_config.json's target module {module_name!r} is no module of "
                                 f"{type(model).__name__}")
            state = set(module.state_dict())
            if attrs != state:
                lacks = sorted(f"{module_name}.{a}" for a in state - attrs)
                extra = sorted(f"{module_name}.{a}" for a in attrs - state)
                raise ValueError(
                    f"{where} does not hold the whole state of target module {module_name}: "
                    + "; ".join(([f"it lacks {_some(lacks)}"] if lacks else [])
                                + ([f"it holds {_some(extra)} the module does not have"] if extra else [])))


def plan_layout(model: nn.Module, trained: Iterable[str]) -> AdapterLayout:
    """The layout for the parameters ``trained`` (names in ``model``): see the module docstring."""
    trained = list(trained)
    chosen = set(trained)
    shared = shared_names(model)
    held = held_outside_modules(model)
    modules = dict(model.named_modules())
    targets: list[str] = []
    for name, module in modules.items():
        if not name or not (isinstance(module, COPYABLE) or is_norm(module)):
            continue
        own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        has_children = any(True for c in module.children() for _ in c.parameters())
        parent = modules[name.rpartition(".")[0]]
        if (own and all(n in chosen for n in own) and not has_children and name not in shared
                and not any(n in shared for n in own) and id(module) not in held
                and not isinstance(parent, nn.MultiheadAttention)):
            targets.append(name)
    tensors = [f"{t}.{k}" for t in targets for k in modules[t].state_dict()]
    in_targets = set(tensors)
    tensors += [n for n in trained if n not in in_targets]
    return AdapterLayout(tuple(targets), tuple(tensors))


def shared_names(model: nn.Module) -> set[str]:
    """Module and parameter names of ``model`` whose object is reachable under another name too (a tied
    weight, a module used twice): a copy of one of them would untie it."""
    seen: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        seen.setdefault(id(module), []).append(name)
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
    return {n for names in seen.values() if len(names) > 1 for n in names}


def held_outside_modules(model: nn.Module) -> set[int]:
    """Ids of the submodules some module of ``model`` also holds in a plain attribute (itself, or in a list,
    tuple or dict), e.g. transformers' Mask2Former prediction heads, which call their layers through a
    Python list: PEFT replaces the registered module only, so a copy would never run."""
    held: set[int] = set()
    for module in model.modules():
        for key, value in vars(module).items():
            if key in ("_modules", "_parameters", "_buffers"):
                continue
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple, set)) else (value,)
            held.update(id(v) for v in items if isinstance(v, nn.Module))
    return held


def peft_config_dict(*, spectral_config: dict, layout: AdapterLayout, base_model_name_or_path: str | None,
                     revision: str | None, inference_mode: bool) -> dict:
    """``adapter_config.json``: PEFT's own ``LNTuningConfig`` dict (written by PEFT itself, so every key
    it expects is there) plus the ``spectral_tuning`` entry it ignores."""
    from peft import LNTuningConfig

    data = LNTuningConfig(target_modules=list(layout.targets), base_model_name_or_path=base_model_name_or_path,
                          revision=revision, inference_mode=inference_mode).to_dict()
    data["peft_type"] = PEFT_FORMAT_TYPE
    data["target_modules"] = list(layout.targets)
    data[SECTION] = {"format_version": FORMAT_VERSION, "config": spectral_config, "tensors": list(layout.tensors)}
    return data


def split_adapter_config(data: dict, where: str) -> tuple[dict, AdapterLayout | None]:
    """(the SpectralTuningConfig dict, the layout) of a parsed ``adapter_config.json``; the layout is None
    for an adapter of an earlier version (``peft_type`` ``SPECTRAL_TUNING``: the config itself)."""
    if data.get("peft_type") == LEGACY_PEFT_TYPE:
        return data, None
    section = data.get(SECTION)
    if not isinstance(section, dict):
        raise ValueError(f"{where}a PEFT {data.get('peft_type')} adapter, but not a spectral tuning adapter (it has no "
                         f"{SECTION!r} entry: written by PEFT, not by SpectralModel.save_pretrained)")
    version = section.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}{SECTION}.format_version {version!r} is not one this version reads "
                         f"({FORMAT_VERSION}): upgrade opentrans-hf")
    config, tensors, targets = section.get("config"), section.get("tensors"), data.get("target_modules")
    if not isinstance(config, dict):
        raise ValueError(f"{where}{SECTION}.config must be a JSON object, got {type(config).__name__}")
    for key, value in ((f"{SECTION}.tensors", tensors), ("target_modules", targets)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}{key} must be a list of names, got {value!r:.80}")
    duplicates = sorted({n for n in tensors if tensors.count(n) > 1} | {n for n in targets if targets.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where}names listed twice: {duplicates[:3]}")
    layout = AdapterLayout(tuple(targets), tuple(tensors))
    empty = [t for t in targets if not any(layout.target_of(n) == t for n in tensors)]
    if empty:
        raise ValueError(f"{where}target_modules {empty[:3]} have no tensor in {SECTION}.tensors")
    return config, layout
