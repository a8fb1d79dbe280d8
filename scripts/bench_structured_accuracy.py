"""Benchmark: accuracy of structured vs unstructured subnetworks at equal kept weights, beside their speed.

On the embedded benchmark with the pretrained embedded CLIP (the jobs' default, built once and cached),
for each ``--sparsities`` value and each seed:

1. two subnetworks of the CLIP image encoder by IMP with the demo's settings (prune rate 0.1 per round,
   10 distillation steps per round, until the target sparsity): ``--scope global`` (unstructured, the
   paper's) and ``--scope structured`` (whole attention heads and MLP neurons); both stop at the first
   round reaching the target, so they keep the same fraction of the encoder blocks' weights (up to the
   size of one unit);
2. each fine-tuned as the demo does (DeepLabV3, the mask applied, spectral tuning with the median rule,
   500 steps, learning rate 1e-3), then seen/unseen mIoU on the validation split (train's metrics);
3. the dense row: the same framework fine-tuned without a mask, nothing frozen (the demo's baseline).

Beside the accuracy, what each subnetwork costs on that small CLIP's encoder (64 px, CPU): the wall-time
ratio dense / pruned at batch 1 and 8 (structured: compacted with ``mask.compact``; unstructured:
``mask.export(model, "csr")``, whose layers under 85% sparsity stay dense), timed in interleaved rounds
(median), and the FLOP ratio (``count_params_and_flops``: dense MACs / effective MACs). Wall time and
FLOPs come from the first seed's masks.

Writes ``<output_dir>/results.json`` and ``<output_dir>/results.md`` and prints the table.
Usage: ``python scripts/bench_structured_accuracy.py [--seeds 0 1 2] [--sparsities 0.5 0.9]``
(``--quick``: a few steps, to check that it runs).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

SCOPES = ("global", "structured")


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float]) -> str:
    """Percent, mean (± sample standard deviation over seeds)."""
    m, sd = mean_sd(values)
    return f"{100 * m:.2f}" + ("" if sd is None else f" ± {100 * sd:.2f}")


def time_encoder(clip: str, masks: dict[str, str], rounds: int, repeats: int) -> dict:
    """{row: {"b1": ratio, "b8": ratio, "flops": ratio, "csr_layers": ...}}: the small CLIP's vision tower,
    dense vs each mask (structured: compacted; unstructured: CSR-exported), interleaved rounds."""
    import torch
    from transformers import CLIPVisionModel

    from opentrans_hf import SparseMask, count_params_and_flops
    from opentrans_hf.utils.hub import quiet_loading

    with quiet_loading():
        dense = CLIPVisionModel.from_pretrained(clip).eval().requires_grad_(False)
    dense_macs = count_params_and_flops(dense)["macs"]
    models, info = {"dense": dense}, {}
    for row, path in masks.items():
        mask = SparseMask.from_pretrained(path)
        model = copy.deepcopy(dense)
        if "structure" in mask.extra:
            mask.compact(model)
            macs = count_params_and_flops(model)["macs"]
            info[row] = {"kernel": "compacted"}
        else:
            macs = count_params_and_flops(dense, mask)["effective_macs"]
            report = mask.export(model, "csr")
            info[row] = {"kernel": "csr", "csr_layers": sum(v == "csr" for v in report.values()),
                         "masked_layers": len(report)}
        info[row]["flops_ratio"] = dense_macs / macs
        models[row] = model
    size = dense.config.image_size
    generator = torch.Generator().manual_seed(0)
    names = list(models)
    with torch.inference_mode():
        for batch in (1, 8):
            x = torch.randn(batch, 3, size, size, generator=generator)
            for m in models.values():
                for _ in range(3):
                    m(pixel_values=x)
            per_round = {n: [] for n in names}
            for r in range(rounds):
                for n in names[r % len(names):] + names[:r % len(names)]:
                    t0 = time.perf_counter()
                    for _ in range(repeats):
                        models[n](pixel_values=x)
                    per_round[n].append((time.perf_counter() - t0) / repeats)
            median = {n: statistics.median(v) for n, v in per_round.items()}
            for row in masks:
                info[row][f"speedup_b{batch}"] = median["dense"] / median[row]
                info[row][f"ms_b{batch}"] = 1e3 * median[row]
            info.setdefault("dense", {})[f"ms_b{batch}"] = 1e3 * median["dense"]
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/bench_structured_accuracy")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5], help="IMP target sparsities")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="a full run (prune + fine-tune) per seed")
    parser.add_argument("--framework", default="deeplabv3")
    parser.add_argument("--max_steps", type=int, default=500, help="fine-tuning steps (the demo's 500)")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="fine-tuning learning rate (the demo's)")
    parser.add_argument("--prune_rate", type=float, default=0.1, help="IMP: fraction pruned per round (the demo's)")
    parser.add_argument("--steps_per_round", type=int, default=10, help="IMP: distillation steps per round (the demo's)")
    parser.add_argument("--timing_rounds", type=int, default=9)
    parser.add_argument("--timing_repeats", type=int, default=100, help="forwards per variant per round (their mean)")
    parser.add_argument("--timing_only", action="store_true",
                        help="reuse the masks and metrics an earlier run wrote to --output_dir (same seeds and "
                             "sparsities); only time again, e.g. once the machine is idle")
    parser.add_argument("--quick", action="store_true", help="a few steps and examples: checks that it runs")
    args = parser.parse_args()

    from opentrans_hf.commands import prune, train
    from opentrans_hf.training.pretraining import default_clip
    from opentrans_hf.utils import logging
    from opentrans_hf.utils.io import atomic_write_text, json_safe

    logging.set_verbosity(logging.job_level())  # the library's progress lines, as under `opentrans-hf`
    extra = dict(embedded_size=16, max_eval_examples=8) if args.quick else {}
    if args.quick:
        args.max_steps, args.steps_per_round, args.timing_rounds, args.timing_repeats = 4, 1, 2, 2
    out = Path(args.output_dir)
    clip = default_clip(None)

    def job(run, arguments, record: Path):
        """``run(arguments)``, or with --timing_only the result it wrote to ``record`` before."""
        if not args.timing_only:
            return run(arguments)
        if not record.is_file():
            raise SystemExit(f"--timing_only: {record} is missing; run without --timing_only first")
        return json.loads(record.read_text())

    t0 = time.time()
    runs: dict[str, list[dict]] = {}  # row -> one result per seed
    first_masks: dict[str, str] = {}
    for seed in args.seeds:
        dense = job(train.run, train.TrainArguments(
            model_name_or_path=clip, framework=args.framework, max_steps=args.max_steps,
            learning_rate=args.learning_rate, output_dir=str(out / f"seed{seed}" / "dense"), seed=seed,
            max_eval_examples=extra.get("max_eval_examples"), embedded_size=extra.get("embedded_size", 192)),
            out / f"seed{seed}" / "dense" / "metrics.json")
        runs.setdefault("dense", []).append({"eval": next(iter(dense["eval"].values())), "sparsity": 0.0})
        for sparsity in args.sparsities:
            for scope in SCOPES:
                row = f"{scope}@{sparsity:g}"
                where = out / f"seed{seed}" / f"{scope}{round(100 * sparsity)}"
                pruned = job(prune.run, prune.PruneArguments(
                    model_name_or_path=clip, rate=args.prune_rate, target_sparsity=sparsity,
                    steps_per_round=args.steps_per_round, batch_size=8, learning_rate=1e-4, scope=scope,
                    output_dir=str(where / "prune"), seed=seed, no_resume=True,
                    embedded_size=extra.get("embedded_size", 192)), where / "prune" / "counts.json")
                metrics = job(train.run, train.TrainArguments(
                    model_name_or_path=clip, framework=args.framework, mask=pruned["mask"], freeze_rule="median",
                    max_steps=args.max_steps, learning_rate=args.learning_rate, output_dir=str(where / "train"),
                    seed=seed, max_eval_examples=extra.get("max_eval_examples"),
                    embedded_size=extra.get("embedded_size", 192)), where / "train" / "metrics.json")
                runs.setdefault(row, []).append({"eval": next(iter(metrics["eval"].values())),
                                                 "sparsity": pruned["sparsity"], "rounds": pruned["rounds"],
                                                 "mask": pruned["mask"]})
                first_masks.setdefault(row, pruned["mask"])
    train_seconds = time.time() - t0
    speed = time_encoder(clip, first_masks, args.timing_rounds, args.timing_repeats)

    labels = {"global": "unstructured (global IMP), CSR export", "structured": "structured (heads + neurons), compacted"}
    lines = ["| subnetwork | kept weights (%) | mIoU (%) | mIoU seen (%) | mIoU unseen (%) | speed-up b1 | "
             "speed-up b8 | FLOP ratio |", "|---|---|---|---|---|---|---|---|"]
    rows = {}
    for row, results in runs.items():
        scope = row.split("@")[0]
        keys = ("mean_iou", "mean_iou_seen", "mean_iou_unseen")
        cells = {k: [r["eval"][k] for r in results] for k in keys}
        kept = [1 - r["sparsity"] for r in results]
        s = speed.get(row, {})
        rows[row] = {"kept": kept, **cells, "speed": s, "seeds": args.seeds,
                     "rounds": [r.get("rounds") for r in results]}
        name = "dense, fully fine-tuned" if row == "dense" else labels[scope]
        ratios = ["1.00x (ref.)"] * 3 if row == "dense" else [
            f"{s['speedup_b1']:.2f}x", f"{s['speedup_b8']:.2f}x", f"{s['flops_ratio']:.2f}x"]
        if row != "dense" and s.get("kernel") == "csr":
            name += f" ({s['csr_layers']}/{s['masked_layers']} layers CSR)"
        lines.append(f"| {name} | {fmt(kept)} | " + " | ".join(fmt(cells[k]) for k in keys) + " | "
                     + " | ".join(ratios) + " |")
    paired = []  # global - structured, seed by seed (the same seed: the same data order and initial heads)
    for sparsity in args.sparsities:
        g, st = rows.get(f"global@{sparsity:g}"), rows.get(f"structured@{sparsity:g}")
        diffs = {k: [a - b for a, b in zip(g[k], st[k])] for k in ("mean_iou", "mean_iou_seen", "mean_iou_unseen")}
        rows[f"global-minus-structured@{sparsity:g}"] = diffs
        paired.append(f"at {100 * sparsity:g}% sparsity, unstructured minus structured (paired by seed): mIoU "
                      f"{fmt(diffs['mean_iou'])}, seen {fmt(diffs['mean_iou_seen'])}, unseen "
                      f"{fmt(diffs['mean_iou_unseen'])} points")
    dense_ms = speed.get("dense", {})
    table = "\n".join(lines) + "\n\n" + "\n".join(paired)
    seeds = ", ".join(map(str, args.seeds))
    note = (f"seeds {seeds} (mean ± sd over seeds); {args.framework}, {args.max_steps} fine-tuning steps; speed-up "
            f"= wall time of the dense / the pruned encoder forward, small CLIP at 64 px, CPU (dense: {dense_ms.get('ms_b1', 0):.2f} ms "
            f"at batch 1, {dense_ms.get('ms_b8', 0):.2f} ms at batch 8); FLOPs = dense / effective MACs")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.md", table + "\n\n" + note + "\n")
    summary = {"clip": clip, "args": vars(args), "rows": rows,
               "seconds": None if args.timing_only else round(train_seconds, 1)}
    atomic_write_text(out / "results.json", json.dumps(json_safe(summary), indent=2) + "\n")
    print("\n" + table + "\n\n" + note)
    print(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}"
          + ("" if args.timing_only else f" (pruning + fine-tuning took {train_seconds:.0f} s)"))


if __name__ == "__main__":
    main()
