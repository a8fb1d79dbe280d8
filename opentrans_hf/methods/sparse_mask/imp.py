"""Iterative magnitude pruning (IMP) of a CLIP image encoder with a semantic-agnostic objective.

OpenTrans step 1: every round removes ``rate`` of the remaining target weights (global L1 magnitude),
then fine-tunes the masked student for ``steps_per_round`` steps by distillation to the frozen dense
CLIP -- no class names, no text. 22 rounds of 10% give the paper's ~90% sparse subnetwork. Weights
are not rewound between rounds (the paper's choice; ``rewind=True`` resets the survivors to their
initial values instead).
"""

from __future__ import annotations

import base64
import copy
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from opentrans_hf.methods.sparse_mask.counting import vision_tower
from opentrans_hf.methods.sparse_mask.magnitude import (
    DEFAULT_MAX_LAYER_SPARSITY,
    SCOPES,
    STRUCTURED_SCOPES,
    check_max_layer_sparsity,
    magnitude_prune,
)
from opentrans_hf.methods.sparse_mask.mask import SparseMask
from opentrans_hf.utils import logging
from opentrans_hf.utils.distributed import make_accelerator, on_main_process
from opentrans_hf.utils.fingerprint import differences
from opentrans_hf.utils.fingerprint import fingerprint as as_fingerprint
from opentrans_hf.utils.hub import read_safetensors
from opentrans_hf.utils.io import atomic_write_text, atomic_write_with, is_integer

logger = logging.get_logger(__name__)


@dataclass
class IMPConfig:
    rate: float = field(default=0.1, metadata={"help": "fraction of the remaining target weights removed per round"})
    num_rounds: int | None = field(default=None, metadata={"help": "rounds to run (default: enough for target_sparsity, else 22)"})
    target_sparsity: float | None = field(default=None, metadata={"help": "stop at the first round reaching this sparsity"})
    steps_per_round: int = field(default=5000, metadata={"help": "fine-tuning steps between rounds (the paper: 5000)"})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the fine-tuning"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    scope: str = field(default="global", metadata={"help": "magnitude_prune scope: global (the paper), layerwise, alpha, "
                                                           "2:4 (one round keeping 2 of every 4 weights, for sparse tensor cores), "
                                                           "or random (the paper's Random baseline: a seeded random "
                                                           "mask of each round's sparsity, nested like IMP's), "
                                                           "structured (whole attention heads and MLP neurons, "
                                                           "ranked globally) or structured-layerwise"})
    max_layer_sparsity: float = field(default=DEFAULT_MAX_LAYER_SPARSITY, metadata={
        "help": "global and structured scopes: most of one layer pruned (1.0: no cap; structured: below 1 keeps "
                "at least one head and one neuron per layer)"})
    seed: int = field(default=0, metadata={"help": "seed of the random scope's masks (the same seed, the same masks)"})
    target_modules: str | list[str] | None = field(default=None, metadata={"help": "layers to prune (default: the encoder blocks)"})
    exclude_modules: str | list[str] | None = field(default=None, metadata={"help": "layers never pruned"})
    embed_weight: float = field(default=1.0, metadata={"help": "weight of the image-embedding distillation (1 - cosine)"})
    patch_weight: float = field(default=1.0, metadata={"help": "weight of the patch-token distillation (1 - cosine per token)"})
    region_weight: float = field(default=1.0, metadata={"help": "weight of the region-level distillation (batches with 'labels')"})
    max_regions: int = field(default=4, metadata={"help": "regions per image for the region-level loss"})
    ignore_index: int = field(default=255, metadata={"help": "label value that is no region"})
    rewind: bool = field(default=False, metadata={"help": "reset surviving weights to their initial values after each pruning"})
    output_dir: str = field(default="runs/prune", metadata={"help": "mask after every round, student weights (+ the state), state.json"})
    resume: bool = field(default=True, metadata={"help": "continue from the last round saved in output_dir"})
    ignore_mismatch: bool = field(default=False, metadata={"help": "resume even if the saved state was made with other settings (the differences are printed)"})

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; choose one of {SCOPES}")
        check_max_layer_sparsity(self.max_layer_sparsity)
        if not is_integer(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r} ({type(self.seed).__name__})")
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"rate must be in (0, 1), got {self.rate}")
        if self.target_sparsity is not None and not 0.0 < self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in (0, 1), got {self.target_sparsity}")
        if self.scope == "2:4":  # one pattern, one sparsity: one round of 2-of-4 pruning, then the distillation
            if self.target_sparsity not in (None, 0.5) or self.num_rounds not in (None, 1):
                raise ValueError("scope '2:4' keeps exactly 2 of every 4 weights: it is one round at sparsity 0.5 "
                                 f"(got num_rounds={self.num_rounds}, target_sparsity={self.target_sparsity}); leave "
                                 "them unset")
            self.num_rounds, self.target_sparsity = 1, 0.5
        if self.num_rounds is None:
            self.num_rounds = (math.ceil(math.log(1 - self.target_sparsity) / math.log(1 - self.rate) - 1e-9)
                               if self.target_sparsity is not None else 22)
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if self.steps_per_round < 0:
            raise ValueError(f"steps_per_round must be >= 0, got {self.steps_per_round}")

    def sparsity_after(self, round_: int) -> float:
        """Overall sparsity after ``round_`` rounds: 1 - (1 - rate) ** round_ (scope ``"2:4"``: 0.5 after its
        one round)."""
        if self.scope == "2:4":
            return 0.5 if round_ >= 1 else 0.0
        return 1.0 - (1.0 - self.rate) ** round_


def distillation_loss(student: nn.Module, teacher: nn.Module, batch: dict, config: IMPConfig) -> torch.Tensor:
    """Semantic-agnostic distillation of a vision tower to the frozen dense one (no text, no classes).

    Image embedding (pooled output) and every patch token: 1 - cosine similarity. With ``labels`` in the
    batch, also the paper's region-level term: the student's patch tokens mask-pooled over a region
    match the teacher's embedding of the image with everything outside that region blanked.
    """
    x = batch["pixel_values"]
    s = student(pixel_values=x)
    with torch.no_grad():
        t = teacher(pixel_values=x)
    loss = config.embed_weight * (1 - F.cosine_similarity(s.pooler_output, t.pooler_output, dim=-1)).mean()
    loss = loss + config.patch_weight * (1 - F.cosine_similarity(
        s.last_hidden_state[:, 1:], t.last_hidden_state[:, 1:], dim=-1)).mean()
    labels = batch.get("labels")
    if labels is not None and config.region_weight > 0:
        loss = loss + config.region_weight * _region_loss(student, teacher, s, x, labels, config)
    return loss


def _region_loss(student, teacher, s_out, x, labels, config) -> torch.Tensor:
    tokens = s_out.last_hidden_state[:, 1:]
    post_ln = getattr(student, "post_layernorm", None) or getattr(getattr(student, "vision_model", None), "post_layernorm", None)
    if post_ln is not None:
        tokens = post_ln(tokens)
    b, n, d = tokens.shape
    g = int(round(n**0.5))
    masks, owners = [], []
    for i in range(b):
        present = [int(c) for c in labels[i].unique() if int(c) != config.ignore_index][: config.max_regions]
        for c in present:
            masks.append((labels[i] == c).float())
            owners.append(i)
    if not masks:
        return tokens.sum() * 0.0
    m = torch.stack(masks)  # (R, H, W)
    with torch.no_grad():
        blanked = x[owners] * m[:, None]  # 0 = the mean colour after CLIP normalisation
        target = teacher(pixel_values=blanked).pooler_output
    weights = F.adaptive_avg_pool2d(m[:, None], (g, g)).flatten(1)  # (R, N) region share of each patch
    region = (weights[:, :, None] * tokens[owners]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1e-6)
    return (1 - F.cosine_similarity(region, target, dim=-1)).mean()


CAPPED_SCOPES = ("global", *STRUCTURED_SCOPES)  # the scopes max_layer_sparsity applies to
STATE_KEY = "opentrans_hf.imp_state"  # the state's key in the student weights' safetensors metadata
RNG_KEY = "opentrans_hf.imp_rng"  # the RNG states at the end of the round, beside it (not in the readable state.json)
# settings a resumed run may change: how far it goes, and where/whether it resumes
RESUMABLE_CHANGES = frozenset({"num_rounds", "target_sparsity", "output_dir", "resume", "ignore_mismatch"})


def iterative_magnitude_prune(model: nn.Module, dataloader, config: IMPConfig, accelerator=None,
                              progress: bool = True, fingerprint: dict | None = None) -> SparseMask:
    """Prune ``model``'s vision tower round by round, fine-tuning by distillation in between.

    ``dataloader`` yields dicts with ``pixel_values`` (and optionally ``labels``, for the region-level
    loss). Under Accelerate (pass your ``accelerator`` or one is made) any number of processes work
    together; masks are computed identically on every process. After every round the mask adapter
    (``round_XX/``) and then the student's weights are written to ``output_dir``; the run's state (round,
    history, settings) travels in the weights file's metadata, so weights and state are written in one
    atomic step and an interrupted run resumes from the last finished round with that round's weights.
    The same file records the random number generators' states (torch, CUDA, numpy, Python, the loader's
    shuffling and Accelerate's pass count), restored on resume: a resumed run ends bit-identical to an
    uninterrupted one (same machine, processes and threads). ``state.json`` is a readable copy. ``fingerprint``: other settings that define the run (the prune job
    passes the model, dataset, seed, batch size); resuming a state made with other settings (these, or
    the config's rate, scope, ...) is refused with the differences listed unless ``config.ignore_mismatch``.
    Returns the final mask (applied to ``model``).
    """
    accelerator = accelerator or make_accelerator()
    out = Path(config.output_dir)
    run = _run_fingerprint(model, config, fingerprint)
    student = vision_tower(model)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    initial = {k: v.detach().clone() for k, v in student.state_dict().items()} if config.rewind else None
    state, resumed_mask, initial, rng = _resume_or_start(student, initial, out, run, config, accelerator)

    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    teacher.to(accelerator.device)
    wrapped, optimizer, loader = accelerator.prepare(student, optimizer, dataloader)
    if state["round"] > 0:  # resumed: where the uninterrupted run stood after that round (data order, draws)
        _restore_rng_state(rng, loader, accelerator, out)
    total = (config.num_rounds - state["round"]) * config.steps_per_round
    bar = tqdm(total=total, desc="IMP", disable=not (progress and accelerator.is_main_process))
    # a run resumed after its last round returns that round's saved mask, with what made it (method, extra)
    mask = resumed_mask if resumed_mask is not None else SparseMask.from_model(student)
    for round_ in range(state["round"] + 1, config.num_rounds + 1):
        target = config.sparsity_after(round_)
        mask = magnitude_prune(student, target, scope=config.scope, target_modules=config.target_modules,
                               exclude_modules=config.exclude_modules, seed=round_seed(config.seed, round_),
                               max_layer_sparsity=config.max_layer_sparsity)
        mask.apply(student)
        if initial is not None:
            with torch.no_grad():
                student.load_state_dict(initial)
            mask.apply(student)
        _reset_optimizer_state(optimizer)  # moments of freshly pruned weights would move them off zero
        losses = _distil_round(wrapped, teacher, loader, optimizer, accelerator, config, bar, round_, mask)
        mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item() if losses else None
        state = {"round": round_, "sparsity": mask.sparsity, "target": target,
                 "history": state["history"] + [{"round": round_, "sparsity": mask.sparsity, "loss": mean_loss}],
                 "config": asdict(config), "fingerprint": run}
        _label_round_mask(mask, model, config, round_, target)
        rng = _rng_state(loader, accelerator)  # every process draws alike (one seed, the loader's order synchronised)
        on_main_process(accelerator, lambda: _save_round(out, round_, mask, accelerator.unwrap_model(wrapped), state, rng))
    bar.close()
    return mask


def _run_fingerprint(model: nn.Module, config: IMPConfig, fingerprint: dict | None) -> dict:
    """The settings that define the run (a resume must share them): the model, the caller's
    ``fingerprint`` and the config's own, less those a resume may change."""
    # the seed only changes a random-scope run; under its own key, apart from a caller's "seed" (data order)
    return as_fingerprint({"model": getattr(model, "name_or_path", None) or None, **(fingerprint or {}),
                           **{k: v for k, v in asdict(config).items()
                              if k not in RESUMABLE_CHANGES and k not in ("seed", "max_layer_sparsity")},
                           **({"random_mask_seed": config.seed} if config.scope == "random" else {}),
                           # the cap changes the global and structured scopes' masks only
                           **({"max_layer_sparsity": config.max_layer_sparsity} if config.scope in CAPPED_SCOPES else {})})


def _resume_or_start(student: nn.Module, initial: dict | None, out: Path, run: dict, config: IMPConfig,
                     accelerator) -> tuple[dict, SparseMask | None, dict | None, dict | None]:
    """``(state, the last round's mask or None, the initial weights or None, the RNG states or None)``:
    resumed from the last round saved in ``out`` (the student loaded and masked, the RNG states saved with
    it), or a fresh start (the initial weights written when ``config.rewind``)."""
    if not (config.resume and ((out / "student.safetensors").is_file() or (out / "state.json").is_file())):
        if config.rewind and accelerator.is_main_process:
            atomic_write_with(out / "initial.safetensors",
                              lambda p: save_file({k: v.contiguous() for k, v in initial.items()}, str(p)))
        return {"round": 0, "history": []}, None, initial, None
    state = read_imp_state(out)
    _check_resumable(out, state, run, config)
    student.load_state_dict(read_safetensors(out / "student.safetensors", "IMP student weights"))
    resumed_mask = SparseMask.from_pretrained(out / f"round_{state['round']:02d}")
    _check_weights_match_mask(student, resumed_mask, out, state["round"])
    resumed_mask.apply(student)
    if initial is not None:
        initial = read_safetensors(out / "initial.safetensors", "IMP initial weights")
    # the readable copy may lag behind the weights' state (a kill between the two writes)
    on_main_process(accelerator, lambda: atomic_write_text(out / "state.json", json.dumps(state, indent=2) + "\n"))
    logger.info(f"resuming after round {state['round']} (sparsity {config.sparsity_after(state['round']):.4f})")
    return state, resumed_mask, initial, read_imp_rng_state(out)


def _distil_round(wrapped, teacher, loader, optimizer, accelerator, config: IMPConfig, bar, round_: int,
                  mask: SparseMask) -> list[torch.Tensor]:
    """``config.steps_per_round`` distillation steps (the loader restarted when exhausted); the losses."""
    losses = []
    it = iter(loader)
    for _ in range(config.steps_per_round):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        loss = distillation_loss(wrapped, teacher, batch, config)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        bar.update(1)
        bar.set_postfix(round=f"{round_}/{config.num_rounds}", sparsity=f"{mask.sparsity:.3f}", loss=f"{loss.item():.4f}")
    return losses


def _label_round_mask(mask: SparseMask, model: nn.Module, config: IMPConfig, round_: int, target: float) -> None:
    """What made the round's mask: the model, ``imp-<scope>``, the target, the round and the IMP settings
    (a structured scope's kept units and a binding scope's cap kept from ``magnitude_prune``'s extra)."""
    mask.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    mask.method = f"imp-{config.scope}"
    mask.target_sparsity = target
    structure = mask.extra.get("structure")  # a structured scope's kept heads/neurons
    mask.extra = {**({"structure": structure} if structure is not None else {}),
                  **({"max_layer_sparsity": config.max_layer_sparsity} if "max_layer_sparsity" in mask.extra else {}),
                  "round": round_, "rate": config.rate, "steps_per_round": config.steps_per_round,
                  "objective": "distillation (embedding + patch tokens" + (" + regions)" if config.region_weight else ")"),
                  **({"seed": config.seed} if config.scope == "random" else {})}


def round_seed(seed: int, round_: int) -> int:
    """The seed of round ``round_``'s random mask: a fresh draw per round (among the survivors of the
    previous one), determined by ``seed`` and the round alone, so a resumed run draws what an
    uninterrupted one would."""
    return int(np.random.SeedSequence([seed % 2**63, round_]).generate_state(1, np.uint64)[0] % 2**63)


def _save_round(out: Path, round_: int, mask: SparseMask, student: nn.Module, state: dict, rng: dict) -> None:
    """The round's mask adapter, then the student's weights with the state and the RNG states in their
    metadata (one atomic file: a kill leaves either the previous round's weights and state or this
    round's), then the readable ``state.json``."""
    mask.save_pretrained(out / f"round_{round_:02d}")
    weights = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    metadata = {STATE_KEY: json.dumps(state), RNG_KEY: json.dumps(rng)}
    atomic_write_with(out / "student.safetensors", lambda p: save_file(weights, str(p), metadata=metadata))
    atomic_write_text(out / "state.json", json.dumps(state, indent=2) + "\n")


def _student_metadata(out: Path) -> dict | None:
    """The metadata of ``out/student.safetensors`` (None when there is no such file)."""
    path = out / "student.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - named here
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None


def read_imp_state(output_dir: str | Path) -> dict:
    """The IMP state saved in ``output_dir`` (round, history, config, fingerprint), read from the student
    weights it belongs to."""
    out = Path(output_dir)
    path = out / "student.safetensors"
    metadata = _student_metadata(out)
    if not metadata or STATE_KEY not in metadata:
        raise ValueError(f"{out} holds an IMP state of an older opentrans-hf (state.json and the student weights "
                         f"written apart, which a kill can leave out of step) or an incomplete one; start over "
                         f"with resume=False (--no_resume) or use another output_dir")
    try:
        state = json.loads(metadata[STATE_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"the IMP state in {path} is not valid JSON: {err}") from None
    if not isinstance(state, dict) or not isinstance(state.get("round"), int) or state["round"] < 1:
        raise ValueError(f"the IMP state in {path} has no valid 'round' (an integer >= 1)")
    return state


def read_imp_rng_state(output_dir: str | Path) -> dict | None:
    """The random number generators' states at the end of the last round saved in ``output_dir`` (torch's,
    the accelerator device's, numpy's, Python's and the data loader's), read from the student weights they
    belong to; None for a state written before they were saved."""
    path = Path(output_dir) / "student.safetensors"
    raw = (_student_metadata(Path(output_dir)) or {}).get(RNG_KEY)
    if raw is None:
        return None
    try:
        rng = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"the RNG states in {path} are not valid JSON: {err}") from None
    if not isinstance(rng, dict) or not isinstance(rng.get("generators"), list):
        raise ValueError(f"the RNG states in {path} are not an opentrans-hf IMP RNG record")
    return rng


def _loader_generators(loader) -> list[torch.Generator]:
    """The ``torch.Generator``s that draw ``loader``'s order (its own, its sampler's, an Accelerate shard's
    synchronised one), each once, in a fixed order."""
    found, seen = [], set()
    candidates = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
    inner = getattr(loader, "batch_sampler", None)
    for _ in range(3):  # BatchSamplerShard -> BatchSampler -> RandomSampler
        inner = getattr(inner, "batch_sampler", None) or getattr(inner, "sampler", None)
        candidates.append(inner)
    for obj in candidates:
        for name in ("generator", "synchronized_generator"):
            g = getattr(obj, name, None) if obj is not None else None
            if isinstance(g, torch.Generator) and id(g) not in seen:
                seen.add(id(g))
                found.append(g)
    return found


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _rng_state(loader, accelerator) -> dict:
    """Every random number generator a round draws from, as JSON: torch's (CPU and, on CUDA, the device's),
    numpy's and Python's global ones (dropout, a dataset's own augmentation), ``loader``'s (its shuffled
    order: the next round restarts it from there) and an Accelerate loader's pass count (the epoch
    a dataset's per-example augmentations are drawn with)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    device = accelerator.device
    return {"torch": _b64(torch.get_rng_state()),
            "cuda": _b64(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None,
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(py_state), py_gauss],
            "generators": [_b64(g.get_state()) for g in _loader_generators(loader)],
            # an Accelerate loader's count of finished passes: the epoch its dataset's augmentations draw with
            "iteration": getattr(loader, "iteration", None)}


def _restore_rng_state(rng: dict | None, loader, accelerator, out: Path) -> None:
    """Set every generator :func:`_rng_state` recorded back to its recorded state (every process: they
    drew alike). Without a record (a state saved by an older opentrans-hf), or for a loader with other
    generators, the run goes on with a warning that it is not bit-identical to an uninterrupted one."""
    generators = _loader_generators(loader)
    if rng is None or len(rng["generators"]) != len(generators):
        why = ("records no RNG states (saved by an older opentrans-hf)" if rng is None else
               f"records {len(rng['generators'])} data-loader generators, the loader now has {len(generators)}")
        logger.warning(f"{out / 'student.safetensors'} {why}: the resumed rounds draw their data order afresh and "
                       "will not be bit-identical to an uninterrupted run's")
        return
    torch.set_rng_state(_unb64(rng["torch"]))
    if rng.get("cuda") is not None and accelerator.device.type == "cuda":
        torch.cuda.set_rng_state(_unb64(rng["cuda"]), accelerator.device)
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = rng["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    for g, state in zip(generators, rng["generators"]):
        g.set_state(_unb64(state))
    if rng.get("iteration") is not None and hasattr(loader, "iteration"):
        loader.iteration = rng["iteration"]


def _check_resumable(out: Path, state: dict, run: dict, config: IMPConfig) -> None:
    saved = state.get("fingerprint")
    diffs = differences(saved, run, "saved state") if isinstance(saved, dict) else ["the saved state records no settings"]
    if diffs and not config.ignore_mismatch:
        raise ValueError(f"{out} holds an IMP state made with other settings: {'; '.join(diffs)}. Use the same "
                         f"settings, another output_dir, resume=False (--no_resume) to start over, or "
                         f"ignore_mismatch=True (--ignore_checkpoint_mismatch) to resume anyway")
    if diffs:
        logger.warning(f"resuming {out} despite other settings: {'; '.join(diffs)}")
    if state["round"] > config.num_rounds:
        raise ValueError(f"{out} holds round {state['round']} already, more than num_rounds={config.num_rounds}")


def _check_weights_match_mask(student: nn.Module, mask: SparseMask, out: Path, round_: int) -> None:
    """The saved weights of round ``round_`` are zero wherever its mask pruned."""
    found, _ = mask.resolve(student, strict=False)
    params = dict(student.named_parameters())
    for name, target in found.items():
        w, keep = params[target].detach(), mask.masks[name]
        if bool((w[~keep.to(w.device)] != 0).any()):
            raise ValueError(f"{out}: the student weights do not match round_{round_:02d}'s mask ({name} has "
                             f"non-zero pruned weights); start over with resume=False (--no_resume)")


def _reset_optimizer_state(optimizer) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.state.clear()
