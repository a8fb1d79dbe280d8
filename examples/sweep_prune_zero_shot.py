"""How much of the dense CLIP's zero-shot survives IMP, per distillation schedule and sparsity.

The transferred object of OpenTrans is the binary mask, applied to the ORIGINAL dense CLIP weights of a
framework; an FC-CLIP-style framework keeps that CLIP frozen, so its out-of-vocabulary recognition rests
on the zero-shot of (original CLIP weights x mask). For every setting this script runs the prune job
(``opentrans-hf prune``: IMP, rate 0.1 up to --target_sparsity, embedded data, the default pretrained
CLIP) once, then scores the training-free dense zero-shot (``pretraining.zero_shot_evaluation``: mIoU
over all / seen / held-out classes of the embedded validation split) of

* ``original x mask``: a fresh ``CLIPModel`` with the original weights and round_XX's mask applied, for
  the saved rounds nearest to --eval_sparsities (what transfers);
* ``student``: the distilled student (``output_dir/student.safetensors`` in the vision tower; the final
  round only), which is not transferred, for comparison;

beside the dense CLIP. Settings: ``global`` IMP for every --steps x --learning_rates, plus every
--extra_settings entry ``SCOPE:STEPS:LR[:MAX_LAYER_SPARSITY]`` (default: ``global:0:1e-4``, one-shot
magnitude pruning of the original weights round by round among the survivors, no distillation; and
``layerwise:10:1e-4``). Settings run the first learning rate's first, cheapest first; one that would start after --max_minutes is skipped
(and listed). A finished setting's directory is reused (the prune job resumes at its last round), so a
re-run only evaluates.

    OMP_NUM_THREADS=1 python examples/sweep_prune_zero_shot.py --steps 10 30 100 --learning_rates 1e-4 1e-5

Prints a table (percent) and, as its last line, the whole result as JSON (fractions of 1); the JSON is
also written to <work_dir>/sweep.json after every setting.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def _scores(zs: dict) -> dict:
    clean = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)  # noqa: E731
    return {"mean_iou": clean(zs["dense_mean_iou"]), "mean_iou_seen": clean(zs["dense_mean_iou_seen"]),
            "mean_iou_unseen": clean(zs["dense_mean_iou_unseen"])}


def evaluate(clip_path: str, tokenizer, *, mask_dir: Path | None = None, student: Path | None = None,
             embedded_size: int, seed: int) -> dict:
    """Dense zero-shot of a fresh CLIPModel from ``clip_path`` (original weights), optionally with the
    distilled student's vision tower loaded and/or a mask adapter applied."""
    from transformers import CLIPModel

    from opentrans_hf import SparseMask
    from opentrans_hf.training.pretraining import zero_shot_evaluation
    from opentrans_hf.utils.hub import quiet_loading, read_safetensors

    with quiet_loading():
        clip = CLIPModel.from_pretrained(clip_path).eval()
    if student is not None:
        weights = read_safetensors(student, "IMP student weights")
        clip.vision_model.load_state_dict(weights)  # the vision tower's own names (strict: all of them)
    if mask_dir is not None:
        SparseMask.from_pretrained(mask_dir).apply(clip)
    return _scores(zero_shot_evaluation(clip, tokenizer, embedded_size=embedded_size, seed=seed))


def settings(args) -> list[dict]:
    """The settings: the first learning rate's, cheapest (fewest distillation steps) first, then the next's."""
    specs = [("global", s, lr, None) for s in args.steps for lr in args.learning_rates]
    for spec in args.extra_settings:
        parts = spec.split(":")
        if len(parts) not in (3, 4):
            raise SystemExit(f"--extra_settings {spec!r}: expected SCOPE:STEPS:LR[:MAX_LAYER_SPARSITY]")
        specs.append((parts[0], int(parts[1]), float(parts[2]), float(parts[3]) if len(parts) == 4 else None))
    out = []
    for scope, steps, lr, cap in specs:
        if steps == 0:
            name = "oneshot magnitude (s0)" if scope == "global" else f"oneshot {scope} magnitude (s0)"
        else:
            name = f"{scope} s{steps} lr{lr:g}"
        if cap is not None:
            name += f" cap{cap:g}"
        if name not in [c["name"] for c in out]:
            out.append({"name": name, "scope": scope, "steps_per_round": steps, "learning_rate": lr,
                        "max_layer_sparsity": cap})
    lrs = list(dict.fromkeys([*args.learning_rates, *(c["learning_rate"] for c in out)]))
    return sorted(out, key=lambda c: (lrs.index(c["learning_rate"]) if c["steps_per_round"] else -1,
                                      c["steps_per_round"], c["scope"] != "global", c["max_layer_sparsity"] or 0))


def nearest_rounds(rate: float, rounds: int, targets: list[float]) -> dict[int, float]:
    """{round: its sparsity} of the rounds nearest to each target sparsity."""
    sparsity = {r: 1 - (1 - rate) ** r for r in range(1, rounds + 1)}
    picked = {min(sparsity, key=lambda r: abs(sparsity[r] - t)) for t in targets}
    return {r: sparsity[r] for r in sorted(picked)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="*", default=[10, 30, 100], help="steps_per_round values of global IMP")
    p.add_argument("--learning_rates", type=float, nargs="+", default=[1e-4, 1e-5])
    p.add_argument("--extra_settings", nargs="*", default=["global:0:1e-4", "layerwise:10:1e-4"],
                   help="more settings, SCOPE:STEPS:LR[:MAX_LAYER_SPARSITY] (steps 0: one-shot magnitude, no distillation)")
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--target_sparsity", type=float, default=0.9)
    p.add_argument("--eval_sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embedded_size", type=int, default=192, help="the prune job's embedded train split")
    p.add_argument("--eval_embedded_size", type=int, default=384,
                   help="zero-shot on this embedded_size's validation split (384: 96 images, the pretrained CLIP's card)")
    p.add_argument("--model_name_or_path", default=None, help="default: the pretrained embedded CLIP")
    p.add_argument("--work_dir", default="runs/sweep_prune_zero_shot")
    p.add_argument("--max_minutes", type=float, default=35.0, help="start no setting after this much wall time")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from opentrans_hf.commands import prune
    from opentrans_hf.methods.sparse_mask.imp import IMPConfig
    from opentrans_hf.training.pretraining import default_clip
    from opentrans_hf.utils import logging
    from opentrans_hf.utils.hub import quiet_loading

    logging.set_verbosity(logging.job_level())  # the library's progress lines, as under `opentrans-hf`
    t0 = time.time()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    clip_path = default_clip(args.model_name_or_path)
    with quiet_loading():
        tok = AutoTokenizer.from_pretrained(clip_path)
    common = dict(embedded_size=args.eval_embedded_size, seed=args.seed)
    rounds = IMPConfig(rate=args.rate, target_sparsity=args.target_sparsity).num_rounds
    picked = nearest_rounds(args.rate, rounds, args.eval_sparsities)
    result = {"clip": clip_path, "rate": args.rate, "rounds": rounds, "batch_size": args.batch_size, "seed": args.seed,
              "eval_embedded_size": args.eval_embedded_size, "dense": evaluate(clip_path, tok, **common),
              "settings": [], "skipped": []}
    print(f"dense CLIP: {_row(result['dense'])}", flush=True)

    for cfg in settings(args):
        if time.time() - t0 > 60 * args.max_minutes:
            result["skipped"].append(cfg["name"])
            print(f"skipped (past --max_minutes {args.max_minutes}): {cfg['name']}", flush=True)
            continue
        out = work / cfg["name"].replace(" ", "_").replace("(", "").replace(")", "")  # a finished one is reused
        started = time.time()
        job = prune.run(prune.PruneArguments(
            model_name_or_path=args.model_name_or_path, rate=args.rate, target_sparsity=args.target_sparsity,
            steps_per_round=cfg["steps_per_round"], learning_rate=cfg["learning_rate"], scope=cfg["scope"],
            batch_size=args.batch_size, seed=args.seed, embedded_size=args.embedded_size, output_dir=str(out),
            **({"max_layer_sparsity": cfg["max_layer_sparsity"]} if cfg["max_layer_sparsity"] is not None else {})))
        call_seconds = time.time() - started
        # the IMP wall time over every call that worked on this directory (a resumed run adds its part)
        timing = out / "sweep_imp_seconds.json"
        before = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
        prune_seconds = call_seconds + (before or 0.0)
        timing.write_text(json.dumps({"seconds": prune_seconds}) + "\n")
        state = json.loads((out / "state.json").read_text())
        entry = {**cfg, "output_dir": str(out), "prune_seconds": round(prune_seconds, 1),
                 "prune_seconds_note": "prune job wall time, summed over the calls on this directory" + (
                     "" if before is not None or call_seconds > 10 else " (a directory from before this "
                     "bookkeeping: this call only; a finished run only reloads)"),
                 "final_sparsity": job["sparsity"], "rounds": {}}
        for r, sp in picked.items():
            entry["rounds"][r] = {"sparsity": sp, "original_x_mask": evaluate(clip_path, tok, mask_dir=out / f"round_{r:02d}", **common)}
        last = max(picked)
        entry["rounds"][last]["student"] = evaluate(clip_path, tok, student=out / "student.safetensors", **common)
        entry["eval_seconds"] = round(time.time() - started - call_seconds, 1)
        entry["final_loss"] = state["history"][-1]["loss"]
        result["settings"].append(entry)
        print(f"{cfg['name']}: IMP {prune_seconds:.0f} s; " + "; ".join(
            f"r{r} ({100 * v['sparsity']:.0f}%) {_row(v['original_x_mask'])}" for r, v in entry["rounds"].items()), flush=True)
        (work / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")

    result["seconds"] = round(time.time() - t0, 1)
    print("\n" + table(result))
    (work / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _row(s: dict) -> str:
    return f"all {_pct(s['mean_iou'])} / seen {_pct(s['mean_iou_seen'])} / unseen {_pct(s['mean_iou_unseen'])}"


def table(result: dict) -> str:
    d = result["dense"]
    lines = ["| setting | IMP s | round | sparsity | model | mIoU (%) | seen (%) | unseen (%) | unseen - dense |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| dense CLIP | - | 0 | 0.00% | original | {_pct(d['mean_iou'])} | {_pct(d['mean_iou_seen'])} | "
             f"{_pct(d['mean_iou_unseen'])} | 0.00 |"]
    for e in result["settings"]:
        for r, v in e["rounds"].items():
            for kind in ("original_x_mask", "student"):
                if kind not in v:
                    continue
                s = v[kind]
                gap = None if s["mean_iou_unseen"] is None else s["mean_iou_unseen"] - d["mean_iou_unseen"]
                lines.append(f"| {e['name']} | {e['prune_seconds']:.0f} | {r} | {100 * v['sparsity']:.2f}% | "
                             f"{kind.replace('_', ' ')} | {_pct(s['mean_iou'])} | {_pct(s['mean_iou_seen'])} | "
                             f"{_pct(s['mean_iou_unseen'])} | {_pct(gap)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
