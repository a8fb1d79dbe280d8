"""What every adapter of this library shares on disk and on the Hub, as PEFT's ``PeftConfigMixin`` and
``PushToHubMixin`` serve every PEFT method: the ``adapter_config.json`` file (written atomically, read
with its ``peft_type`` checked), the ``adapter_model.safetensors`` file (written atomically, read with
errors that name it), the model card, and ``push_to_hub``.

:class:`~opentrans_hf.SparseMask` and :class:`~opentrans_hf.SpectralModel` both use this module, so a
fix here is a fix for both.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from opentrans_hf.utils.hub import (
    check_can_push,
    push_folder_to_hub,
    read_safetensors,
    render_model_card,
    resolve_pretrained_dir,
)
from opentrans_hf.utils.io import atomic_write_text, atomic_write_with, json_safe, read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
LIBRARY_NAME = "opentrans-hf"


def write_adapter_config(save_directory: str | os.PathLike, config: dict, *, sort_keys: bool = True) -> Path:
    """Write ``config`` as ``save_directory/adapter_config.json``, atomically."""
    path = Path(save_directory) / CONFIG_NAME
    atomic_write_text(path, json.dumps(json_safe(config), indent=2, sort_keys=sort_keys) + "\n")
    return path


def read_adapter_config(path: str | os.PathLike, peft_type: str | tuple[str, ...], what: str) -> dict:
    """The JSON object in ``path`` (an ``adapter_config.json``); an error names the file when it is not
    JSON, not an object, or its ``peft_type`` is not ``peft_type`` (or one of them, given a tuple;
    ``what``: e.g. "sparse mask adapter")."""
    accepted = (peft_type,) if isinstance(peft_type, str) else tuple(peft_type)
    data = read_json(path, "adapter config")
    if not isinstance(data, dict) or data.get("peft_type") not in accepted:
        got = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
        expected = " or ".join(repr(t) for t in accepted)
        raise ValueError(f"{path} is not a {what} config (peft_type {got!r}, expected {expected})")
    return data


def write_adapter_files(save_directory: str | os.PathLike, *, config: dict, tensors: dict, card: str,
                        metadata: dict | None = None, sort_keys: bool = True) -> Path:
    """The one write path of every adapter: ``adapter_model.safetensors`` (``tensors``), then
    ``adapter_config.json`` (``config``), then ``README.md`` (``card``), each atomically (a temporary file
    beside it, then a rename). Compute everything that can fail (the card too) before calling this."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=metadata or {"format": "pt"}))
    write_adapter_config(out, config, sort_keys=sort_keys)
    atomic_write_text(out / CARD_NAME, card)
    return out


def read_adapter_files(name_or_path: str | os.PathLike, *, peft_type: str | tuple[str, ...], what: str, revision: str | None = None,
                       token=None) -> tuple[Path, dict, dict]:
    """The one read path of every adapter: ``(directory, config dict, tensors)`` from a local directory or a
    Hub repo. The config's ``peft_type`` is checked; the safetensors file is read with errors that name it
    (missing, truncated, corrupt). Checking the tensors against the config is the adapter's own job."""
    d = resolve_pretrained_dir(name_or_path, [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME], revision=revision, token=token,
                               what=what)
    config = read_adapter_config(d / CONFIG_NAME, peft_type, what)
    tensors = read_safetensors(d / WEIGHTS_NAME, what)
    return d, config, tensors


def render_adapter_card(template: str, *, tags: list[str], base_model: str | None, **variables) -> str:
    """The adapter's ``README.md`` from ``opentrans_hf/model_cards/<template>`` (``library_name`` set)."""
    return render_model_card(template, {"library_name": LIBRARY_NAME, "tags": tags, "base_model": base_model},
                             **variables)


class AdapterHubMixin:
    """``push_to_hub`` for an object with ``save_pretrained(directory)``: save to a temporary directory and
    push its files (config, weights, card) in one commit (:func:`~opentrans_hf.utils.hub.push_folder_to_hub`);
    returns the commit URL."""

    default_commit_message = "Upload adapter"

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token=None, commit_message: str | None = None,
                    revision: str | None = None, commit_description: str | None = None) -> str:
        """Push the adapter to the Hub model repo ``repo_id`` in one commit: the repo is created if missing
        (``private`` applies then), ``revision`` is a branch (created if missing), ``token`` None is the
        logged-in token. Offline (``HF_HUB_OFFLINE``): an ``OSError`` before anything is saved or sent."""
        check_can_push(repo_id)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_folder_to_hub(tmp, repo_id, private=private, token=token, revision=revision,
                                      commit_message=commit_message or self.default_commit_message,
                                      commit_description=commit_description)
