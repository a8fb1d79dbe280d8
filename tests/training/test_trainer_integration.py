"""``SpectralModel`` in ``transformers.Trainer`` works as a PEFT model does, with no extra flag: the base
model's forward columns are kept, checkpoints and ``save_model`` hold the adapter only, resuming and
``load_best_model_at_end`` load it back, ``SpectralModel.from_pretrained`` loads the output directory.
Also the PEFT API parity: ``get_base_model``, ``unload``, ``merge_and_unload``, ``disable_adapter``."""

import json

import pytest
import torch
from safetensors.torch import load_file

from opentrans_hf import SpectralModel, SpectralTuningConfig, get_spectral_model
from opentrans_hf.methods.spectral_tuning import read_spectral_adapter
from opentrans_hf.utils.hub import quiet_loading

datasets = pytest.importorskip("datasets")
from transformers import CLIPForImageClassification, Trainer, TrainingArguments  # noqa: E402

FC = r".*mlp\.fc[12]"  # a full-match regex: the MLP layers, whatever the prefix


def clip_classifier(clip_dir):
    torch.manual_seed(0)
    with quiet_loading():
        base = CLIPForImageClassification.from_pretrained(clip_dir, num_labels=3)
    config = SpectralTuningConfig(target_modules=FC, modules_to_save=["classifier"])
    return get_spectral_model(base, config)


def image_dataset(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict({
        "pixel_values": torch.randn(n, 3, 30, 30, generator=g).numpy(),
        "labels": torch.randint(0, 3, (n,), generator=g).tolist(),
        "image_id": [f"img{i}" for i in range(n)],  # a column the model does not take: dropped
    })


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, per_device_eval_batch_size=4, max_steps=4,
                save_strategy="steps", save_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0, save_only_model=False)
    base.update(kw)
    return TrainingArguments(**base)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.base_model.named_parameters() if p.requires_grad}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def assert_adapter_dir(d, model):
    files = {p.name for p in d.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, files
    assert json.loads((d / "adapter_config.json").read_text())["peft_type"] == "LN_TUNING"  # a PEFT adapter
    names = set(read_spectral_adapter(d)[1])
    assert names == {n for n, p in model.base_model.named_parameters() if p.requires_grad}
    assert all(k.startswith("base_model.model.") for k in load_file(str(d / "adapter_model.safetensors")))


@pytest.fixture(scope="module")
def uninterrupted(tiny_clip_dir, tmp_path_factory):
    """4 steps, a checkpoint every 2, then save_model: the run the others are compared with."""
    out = tmp_path_factory.mktemp("run")
    model = clip_classifier(tiny_clip_dir)
    start = trainable(model)
    trainer = Trainer(model=model, args=args(out), train_dataset=image_dataset())
    trainer.train()
    trainer.save_model()
    return out, model, start


def test_trainer_keeps_forward_columns_and_trains(uninterrupted):
    out, model, start = uninterrupted
    end = trainable(model)
    assert any(not torch.equal(start[n], end[n]) for n in start)  # it trained: pixel_values/labels reached forward
    for n, p in model.base_model.named_parameters():  # frozen layers stayed frozen
        if not p.requires_grad:
            assert n not in end


def test_every_checkpoint_and_save_model_hold_the_adapter_only(uninterrupted):
    out, model, _ = uninterrupted
    for d in (out / "checkpoint-2", out / "checkpoint-4", out):
        assert_adapter_dir(d, model)
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()
    assert_same(read_spectral_adapter(out)[1], trainable(model))


def test_checkpoints_hold_the_adapter_with_remove_unused_columns_false_too(tiny_clip_dir, tmp_path):
    """The old workaround flag: training ran, but wrote full ``model.safetensors`` files."""
    model = clip_classifier(tiny_clip_dir)
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=2, remove_unused_columns=False),
                      train_dataset=image_dataset().remove_columns("image_id"))
    trainer.train()
    trainer.save_model()
    assert_adapter_dir(tmp_path / "checkpoint-2", model)
    assert_adapter_dir(tmp_path, model)


def test_from_pretrained_loads_the_trainer_output_dir(uninterrupted, tiny_clip_dir):
    out, model, _ = uninterrupted
    with quiet_loading():
        fresh = CLIPForImageClassification.from_pretrained(tiny_clip_dir, num_labels=3)
    loaded = SpectralModel.from_pretrained(fresh, out, is_trainable=True)
    assert_same(trainable(loaded), trainable(model))
    assert loaded.trainable_layers == model.trainable_layers


def test_resume_from_checkpoint_ends_identical_to_the_uninterrupted_run(uninterrupted, tiny_clip_dir, tmp_path):
    out, model, _ = uninterrupted
    resumed = clip_classifier(tiny_clip_dir)
    trainer = Trainer(model=resumed, args=args(tmp_path), train_dataset=image_dataset())
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert trainer.state.global_step == 4
    assert_same(trainable(resumed), trainable(model))  # weights and Adam state restored, same data order


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tiny_clip_dir, tmp_path):
    scores = iter([1.0, 0.0])  # the first evaluation is the best one

    model = clip_classifier(tiny_clip_dir)
    trainer = Trainer(
        model=model, train_dataset=image_dataset(), eval_dataset=image_dataset(4, seed=1),
        args=args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                  metric_for_best_model="score", greater_is_better=True),
        compute_metrics=lambda pred: {"score": next(scores)},
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = read_spectral_adapter(tmp_path / "checkpoint-2")[1]
    last = read_spectral_adapter(tmp_path / "checkpoint-4")[1]
    assert any(not torch.equal(best[n], last[n]) for n in best)
    assert_same(trainable(model), best)


def test_framework_in_trainer_keeps_class_names_and_saves_the_adapter(tiny_clip_dir, tmp_path):
    from opentrans_hf.models import ENCODER_TARGET_MODULES, CLIPDeepLabV3ForOVS

    torch.manual_seed(0)
    with quiet_loading():
        base = CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir, aspp_channels=16)
    model = get_spectral_model(base, SpectralTuningConfig(target_modules=ENCODER_TARGET_MODULES))
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({
        "pixel_values": torch.randn(4, 3, 30, 30, generator=g).numpy(),
        "labels": torch.randint(0, 3, (4, 30, 30), generator=g).numpy(),
        "class_names": [["sky", "grass", "water"]] * 4,
        "image_id": [f"img{i}" for i in range(4)],
    })
    seen = []

    def collate(features):
        seen.append(set(features[0]))
        return {"pixel_values": torch.stack([torch.as_tensor(f["pixel_values"]) for f in features]),
                "labels": torch.stack([torch.as_tensor(f["labels"]) for f in features]).long(),
                "class_names": features[0]["class_names"]}

    trainer = Trainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=data, data_collator=collate)
    trainer.train()
    trainer.save_model()
    assert seen and seen[0] == {"pixel_values", "labels", "class_names"}  # image_id dropped, the rest kept
    assert_adapter_dir(tmp_path, model)
    assert_adapter_dir(tmp_path / "checkpoint-2", model)
    with quiet_loading():
        fresh = CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir, aspp_channels=16)
    loaded = SpectralModel.from_pretrained(fresh, tmp_path)
    assert_same({n: p for n, p in loaded.base_model.state_dict().items() if n in trainable(model)},
                trainable(model))


# ---- PEFT API parity --------------------------------------------------------------------------------


def test_peft_api_parity(tiny_clip_dir, capsys):
    from peft import PeftModel

    with quiet_loading():
        base = CLIPForImageClassification.from_pretrained(tiny_clip_dir, num_labels=3)
    base.vision_model.embeddings.patch_embedding.weight.requires_grad_(False)  # the user froze it before
    before = {n: p.requires_grad for n, p in base.named_parameters()}
    model = get_spectral_model(base, SpectralTuningConfig(target_modules=FC))
    assert isinstance(model, PeftModel)  # what Trainer and Accelerate check
    assert model.get_base_model() is base
    assert model.active_adapters == ["default"]
    trainable_n, total = model.get_nb_trainable_parameters()
    assert 0 < trainable_n < total == sum(p.numel() for p in base.parameters())
    model.print_trainable_parameters()
    assert "trainable params:" in capsys.readouterr().out
    assert any(not p.requires_grad for n, p in base.named_parameters() if before[n])
    with pytest.raises(NotImplementedError, match="in place"):
        model.disable_adapter()
    assert model.unload() is base
    assert {n: p.requires_grad for n, p in base.named_parameters()} == before
    model2 = get_spectral_model(base, SpectralTuningConfig(target_modules=FC))
    assert model2.merge_and_unload() is base
    assert {n: p.requires_grad for n, p in base.named_parameters()} == before


def test_load_adapter_refuses_another_models_adapter(uninterrupted, tiny_clip_dir):
    out, model, _ = uninterrupted
    with quiet_loading():
        base = CLIPForImageClassification.from_pretrained(tiny_clip_dir, num_labels=3)
    other = get_spectral_model(base, SpectralTuningConfig(target_modules=FC, freeze_rule="ratio", freeze_ratio=0.0,
                                                          modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="trainable_layers differs"):
        other.load_adapter(out)
    with pytest.raises(ValueError, match="one adapter"):
        model.load_adapter(out, adapter_name="other")
