"""Rewrite a saved spectral adapter in the format of opentrans-hf 0.2 and earlier (``peft_type``
``SPECTRAL_TUNING``: the config itself in ``adapter_config.json``, tensors under the model's names), for
tests of what such adapters hold (e.g. the text tower, names relative to the model). The fixture
``fixtures/spectral_adapter_v0.2`` is a file that version wrote."""

import json
from pathlib import Path

from safetensors.torch import save_file

from opentrans_hf.methods.spectral_tuning import read_spectral_adapter


def to_previous_format(d: Path) -> dict:
    """Rewrite adapter directory ``d`` in place; returns its tensors by their names in the model."""
    config, tensors = read_spectral_adapter(d)
    (d / "adapter_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return tensors
