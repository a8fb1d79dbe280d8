"""``target_modules`` / ``exclude_modules`` select the same module names here as in PEFT: the hand-written
rules of ``opentrans_hf.utils.matching`` agree with ``peft.tuners.tuners_utils.check_target_module_exists``."""

from types import SimpleNamespace

import pytest
from peft.tuners.tuners_utils import check_target_module_exists

from opentrans_hf.utils.matching import is_selected, name_matches, normalize_patterns

NAMES = ["vision_model.encoder.layers.0.mlp.fc1", "fc1", "encoder.layers.0.mlp.fc10", "mlp.fc1.weight_fc1",
         "vision_model.encoder.layers.1.self_attn.q_proj", "vision_model.embeddings.patch_embedding", "q_proj"]
PATTERNS = ["fc1", r".*\.fc1", r".*\.(fc1|q_proj)", "mlp", ["fc1"], ["mlp.fc1", "q_proj"], ["layers.0"], ("fc1",),
            ["patch_embedding"], []]


def peft_selects(name, target_modules, exclude_modules=None) -> bool:
    config = SimpleNamespace(target_modules=target_modules, exclude_modules=exclude_modules, target_parameters=None)
    return bool(check_target_module_exists(config, name))


@pytest.mark.parametrize("name", NAMES)
def test_rules_are_peft_rules(name):
    for target in PATTERNS:
        assert name_matches(name, target) == peft_selects(name, target), (name, target)
        for exclude in [None, *PATTERNS]:
            assert is_selected(name, target, exclude) == peft_selects(name, target, exclude), (name, target, exclude)


def test_none_selects_every_candidate_as_target_and_nothing_as_patterns():
    assert is_selected("a.fc1", None, None) and not is_selected("a.fc1", None, ["fc1"])
    assert not name_matches("a.fc1", None)
    assert is_selected("a.fc1", ["fc1"], ["fc2"]) and not is_selected("a.fc1", ["fc1"], r".*fc1")  # exclude wins
    # whole-name regex, dotted suffix for lists
    assert name_matches("a.fc1", r".*fc1") and not name_matches("a.fc1", "fc1")
    assert name_matches("a.fc1", ["fc1"]) and not name_matches("a.xfc1", ["fc1"])


def test_normalize_patterns_names_the_bad_pattern():
    assert normalize_patterns(("fc1", "fc2")) == ["fc1", "fc2"] and normalize_patterns(None) is None
    with pytest.raises(ValueError, match=r"invalid regular expression '\(' for module selection"):
        normalize_patterns("(")
    with pytest.raises(TypeError, match=r"module patterns must be strings, got 3 \(int\)"):
        normalize_patterns(["fc1", 3])
