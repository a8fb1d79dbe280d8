"""The CLIP-encoder regexes come from one builder (``utils.naming.vision_encoder_targets``) and match exactly
what the literals they replaced matched, on the module and parameter names of a CLIPModel, a CLIPVisionModel,
a framework and names made to probe the edges; one validator checks ``max_layer_sparsity`` everywhere."""

import re

import pytest
from transformers import CLIPModel, CLIPVisionModel

from opentrans_hf.commands import ArgumentError
from opentrans_hf.commands.prune import PruneArguments
from opentrans_hf.methods.sparse_mask.compact import _BLOCK
from opentrans_hf.methods.sparse_mask.imp import IMPConfig
from opentrans_hf.methods.sparse_mask.layer import CLIP_ENCODER_TARGETS
from opentrans_hf.methods.sparse_mask.magnitude import check_max_layer_sparsity, magnitude_prune
from opentrans_hf.models import CLIPMask2FormerForOVS
from opentrans_hf.utils.naming import CLIP_VISION_ENCODER_TARGETS, vision_encoder_targets

# the literals the builder replaced, as they stood
OLD_WITH_STEM = r"(?:.*\.)?vision_model\.(?:embeddings\.patch_embedding|encoder\.layers\.(?:{layers})\..*)"
OLD_BLOCKS_ONLY = r"(.*vision_model\.)?encoder\.layers\.\d+\..*"
OLD_BLOCK = r"(?:.*\.)?encoder\.layers\.\d+"

EDGE_NAMES = [
    "encoder.layers.0.mlp.fc1", "encoder.layers.12.self_attn.q_proj", "encoder.layers.0", "encoder.layers.x.fc",
    "vision_model.encoder.layers.3.mlp.fc2", "clip.vision_model.encoder.layers.1.self_attn.out_proj",
    "clip_vision_model.encoder.layers.1.mlp.fc1", "xvision_model.embeddings.patch_embedding",
    "vision_model.embeddings.patch_embedding", "backbone.clip.vision_model.embeddings.patch_embedding",
    "vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding",
    "text_model.encoder.layers.0.mlp.fc1", "clip.text_model.encoder.layers.0.self_attn.k_proj",
    "vision_model.encoder.layers.", "vision_model.encoder.layers.7", "head.encoder.layers.2.linear",
    "vision_model.post_layernorm", "visual_projection", "",
]


@pytest.fixture(scope="module")
def names(tiny_clip_dir):
    """Module and parameter names of a CLIPModel, a CLIPVisionModel and a Mask2Former framework, and the edges."""
    models = [CLIPModel.from_pretrained(tiny_clip_dir), CLIPVisionModel.from_pretrained(tiny_clip_dir),
              CLIPMask2FormerForOVS.from_clip(tiny_clip_dir, fpn_channels=32, hidden_dim=32, mask_feature_size=32,
                                              num_queries=6, dim_feedforward=64, decoder_layers=2)]
    found = set(EDGE_NAMES)
    for model in models:
        found |= {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    return sorted(found)


def _matches(pattern: str, names: list[str]) -> list[str]:
    return [n for n in names if re.fullmatch(pattern, n)]


def test_the_names_cover_every_kind_of_match(names):
    """The probe names hold hits and misses of every regex (else the comparisons below prove little)."""
    for pattern in (OLD_WITH_STEM.format(layers=r"\d+"), OLD_BLOCKS_ONLY, OLD_BLOCK):
        hits = _matches(pattern, names)
        assert hits and len(hits) < len(names), pattern
    assert any(n.startswith("clip.vision_model.encoder.layers.") for n in _matches(OLD_BLOCKS_ONLY, names))
    assert any(n.startswith("encoder.layers.") for n in _matches(OLD_BLOCKS_ONLY, names))
    assert any("patch_embedding" in n for n in _matches(CLIP_VISION_ENCODER_TARGETS, names))


@pytest.mark.parametrize("layers", [r"\d+", "0|1", "1", "0|1|2|3|4|5"])
def test_with_the_stem_the_builder_matches_the_old_regex(names, layers):
    new = vision_encoder_targets(layers)
    assert new == OLD_WITH_STEM.format(layers=layers)  # the very same string
    assert _matches(new, names) == _matches(OLD_WITH_STEM.format(layers=layers), names)


def test_blocks_only_targets_match_the_old_literal(names):
    assert CLIP_ENCODER_TARGETS == vision_encoder_targets(stem=False)
    hits = _matches(CLIP_ENCODER_TARGETS, names)
    assert hits == _matches(OLD_BLOCKS_ONLY, names)
    assert not any("patch_embedding" in n or "text_model" in n for n in hits)
    assert CLIP_VISION_ENCODER_TARGETS == vision_encoder_targets()


def test_compaction_finds_the_blocks_the_old_literal_found(names):
    assert [n for n in names if _BLOCK.fullmatch(n)] == _matches(OLD_BLOCK, names)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, True, "0.9", None, float("nan")])
def test_one_max_layer_sparsity_check_everywhere(tiny_vision, bad):
    with pytest.raises(ValueError, match=rf"^max_layer_sparsity must be in \(0, 1\], got {re.escape(repr(bad))}$"):
        check_max_layer_sparsity(bad)
    with pytest.raises(ValueError, match=r"^max_layer_sparsity must be in \(0, 1\]"):
        magnitude_prune(tiny_vision, 0.5, max_layer_sparsity=bad)
    with pytest.raises(ValueError, match=r"^max_layer_sparsity must be in \(0, 1\]"):
        IMPConfig(max_layer_sparsity=bad)
    with pytest.raises(ArgumentError, match=r"^--max_layer_sparsity must be in \(0, 1\]"):
        PruneArguments(max_layer_sparsity=bad)


@pytest.mark.parametrize("good", [1, 1.0, 0.5, 1e-6])
def test_max_layer_sparsity_in_range_passes(good):
    check_max_layer_sparsity(good)
    assert IMPConfig(max_layer_sparsity=good).max_layer_sparsity == good
    assert PruneArguments(max_layer_sparsity=good).max_layer_sparsity == good
