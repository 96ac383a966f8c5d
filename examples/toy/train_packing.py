"""VISOR-TR on the toy: continue the shipped toy's universal fine-tuning with token packing sampled per step.

    HF_HUB_OFFLINE=1 python examples/toy/train_packing.py --out runs/toy-packing [--relabel] [--ship]

1. adds the token packing module (2x horizontal pairs, 4x 2x2 blocks, average-initialised) to the shipped toy VISOR
   (`src/visor_hf/assets/toy-visor`, or `--start`) and evaluates it untrained (= average pooling);
2. warms the new module up as stage 1 warms up the CA blocks (`--warmup-steps`: `train_stage(..., "1",
   packing=[1, 2, 4])`, the new modules at the maximal configuration, one packing factor per step, lr 1e-3), then
   continues the universal fine-tuning with one (configuration, packing) pair per step
   (`train_stage(..., "universal", packing=[1, 2, 4])`, the toy's collator and learning-rate recipe);
3. `--relabel`: pseudo-labels and the calibrated router again, at packing 1 (as `train_toy.py`), on the new weights;
4. evaluates every configuration and the router at packing 1, 2 and 4 on the held-out set of the results table
   (teacher-forced first answer token), and the router on fresh pictures through `visor-hf toy`'s own path (greedy
   `generate`), and writes `results_packing.json` and `results_packing.md` to `--out`.

`--ship` writes the final checkpoint as the shipped toy VISOR-TR, `src/visor_hf/assets/toy-visor-tr/` (with
`results_packing.json`; `visor-hf toy --packing 2` runs it), and its table to `docs/toy_packing_results.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import dump, fmt, log, set_seed, start_run  # noqa: E402
from train_toy import CI_IMAGES, CI_SEED, TEST_IMAGES, TEST_SEED, make_portable  # noqa: E402
from train_visor import LABEL_SEED_BASE, VISOR_TRAIN_SEED_BASE, KeyWordCollator, load, report, trainer_args, write_records  # noqa: E402

from visor_hf.toy.data import eval_set  # noqa: E402
from visor_hf.toy.evaluation import evaluate_visor  # noqa: E402
from visor_hf.toy.inference import DEFAULT_CHECKPOINT, answer_examples, fresh_examples  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FACTORS = (1, 2, 4)
PACKING_SEED_BASE = VISOR_TRAIN_SEED_BASE + 3_000_000  # new training pictures (the shipped stages used the first 3M)
WARMUP_SEED_BASE = VISOR_TRAIN_SEED_BASE + 4_000_000
KEY_KINDS = ("cell", "count_shape", "count_colour")


def add_packing(start: Path, out: Path, positions: bool = True) -> Path:
    """The start checkpoint with the packing module (`packing_factors` [2, 4], with or without its position tables),
    average-initialised, as a folder (a start that has the module keeps it as trained)."""
    from visor_hf.modeling import VisorForConditionalGeneration
    from visor_hf.training.data import load_processor
    from visor_hf.training.stages import save_checkpoint

    config = json.loads((start / "config.json").read_text())
    extra = {} if config.get("packing_factors") else {"packing_positions": positions}
    model = VisorForConditionalGeneration.from_pretrained(start, packing_factors=[2, 4], **extra)
    if not config.get("packing_factors"):  # a new module: the average start
        model.model.token_packing.reset_to_average(guarded=False)
    save_checkpoint(model, load_processor(start), out)
    return out


def evaluate_all(path: Path, test, fresh, logfile) -> dict:
    """Every configuration and the router at each packing factor on `test`; the router on `fresh` through `generate`."""
    from visor_hf.training.data import load_processor

    model = load(path)
    processor = load_processor(path)
    rows = {}
    for k in FACTORS:
        for c, layers in enumerate(model.config.configurations):
            rows[f"{k}x {layers}"] = report(evaluate_visor(model, test, c, packing=k), test)
        rows[f"{k}x router"] = report(evaluate_visor(model, test, "auto", packing=k), test)
        answers = answer_examples(model, processor, fresh, packing=k)
        rows[f"{k}x router, fresh (generate)"] = {
            "accuracy": {"all": sum(a.correct for a in answers) / len(answers)},
            "flops_ratio": sum(a.prefill_flops for a in answers) / sum(a.dense_prefill_flops for a in answers),
        }
        for name in (f"{k}x router", f"{k}x router, fresh (generate)"):
            log(f"{path.name} {name}: {fmt(rows[name]['accuracy'])} FLOPs x{rows[name]['flops_ratio']:.3f}", logfile)
    return rows


def ci_rows(path: Path) -> dict:
    """The router at each packing factor on the CI set of the toy (`eval_set(CI_SEED, CI_IMAGES)`, teacher-forced
    first token): what `tests/test_packing.py` re-evaluates on the shipped toy VISOR-TR."""
    model = load(path)
    examples = eval_set(CI_SEED, CI_IMAGES)
    rows = {str(k): report(evaluate_visor(model, examples, "auto", packing=k), examples) for k in FACTORS}
    return {"seed": CI_SEED, "images": CI_IMAGES, "rows": rows}


def fmt3(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"  # the fresh-picture rows have the overall accuracy only


def table(stages: dict) -> str:
    """Accuracy of every row at each stage (untrained = average pooling), FLOPs of the last stage."""
    names = list(stages)
    last = stages[names[-1]]
    lines = [
        "| packing | configuration | " + " | ".join(f"accuracy {n}" for n in names) + " | easy | hard | "
        "prefill FLOPs / dense LLaVA-OV (every visual token) | saving |",
        "|---|---|" + "---|" * len(names) + "---|---|---|---|",
    ]
    for row, r in last.items():
        k, what = row.split(" ", 1)
        accuracies = " | ".join(f"{stages[n][row]['accuracy']['all']:.3f}" for n in names)
        lines.append(
            f"| {k} | {what} | {accuracies} | {fmt3(r['accuracy'].get('easy'))} | "
            f"{fmt3(r['accuracy'].get('hard'))} | {r['flops_ratio']:.3f} | {1 / r['flops_ratio']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy-packing")
    parser.add_argument("--start", default=str(DEFAULT_CHECKPOINT), help="VISOR checkpoint to continue (default: shipped toy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=300, help="stage-1 steps (new modules) with packing sampled")
    parser.add_argument("--warmup-learning-rate", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=300, help="universal fine-tuning steps with packing sampled")
    parser.add_argument("--factors", default="1,2,4", help="packing factors sampled in training")
    parser.add_argument(
        "--position-tables",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the packing module's 2-D position tables (config.packing_positions) when the module is new",
    )
    parser.add_argument(
        "--cell-questions", type=int, default=1, help="cell questions per training picture (the other kinds: one each)"
    )
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--images-per-step", type=int, default=8)
    parser.add_argument("--test-images", type=int, default=TEST_IMAGES)
    parser.add_argument("--fresh-images", type=int, default=100, help="fresh pictures of the `visor-hf toy` check (seed 0)")
    parser.add_argument("--relabel", action="store_true", help="pseudo-label and train the router again after training")
    parser.add_argument("--label-images", type=int, default=300)
    parser.add_argument("--router-steps", type=int, default=2000)
    parser.add_argument(
        "--skip-eval", default="", help="stages not to evaluate, e.g. 'untrained,universal' (the final one always is)"
    )
    parser.add_argument("--ship", action="store_true", help="write the result to src/visor_hf/assets/toy-visor-tr")
    args = parser.parse_args()
    out, logfile = start_run(args.out)
    set_seed(args.seed)
    timings = {}
    start = add_packing(Path(args.start), out / "start", positions=args.position_tables)
    test = eval_set(TEST_SEED, args.test_images)
    fresh = fresh_examples(0, args.fresh_images)
    skip = set(filter(None, args.skip_eval.split(",")))
    stages = {}
    if "untrained" not in skip:
        t = time.time()
        stages["untrained"] = evaluate_all(start, test, fresh, logfile)
        timings["evaluate_untrained"] = round(time.time() - t, 1)

    from visor_hf.training import pseudo_label, train_router, train_stage
    from visor_hf.training.data import load_processor

    batch = args.images_per_step * 5
    factors = [int(k) for k in args.factors.split(",")]
    # (stage, steps, learning rate, first picture, cell questions per picture); stage 1 is the warm-up
    phases = {
        "warmup": ("1", args.warmup_steps, args.warmup_learning_rate, WARMUP_SEED_BASE, 1),
        "universal": ("universal", args.steps, args.learning_rate, PACKING_SEED_BASE, args.cell_questions),
    }
    for name, (stage, steps, learning_rate, first_picture, cells) in phases.items():
        if not steps:
            continue
        data = write_records(out / "data" / name, steps * args.images_per_step, first_picture, cells=cells)
        t = time.time()
        train_stage(
            start,
            data,
            out / name,
            stage,
            seed=args.seed,
            packing=factors,
            attn_implementation="sdpa",
            data_collator=KeyWordCollator(load_processor(start), KEY_KINDS),
            training_args=trainer_args(steps, learning_rate, batch, min(50, steps // 5), args.seed),
        )
        timings[name] = round(time.time() - t, 1)
        start = out / name
    final = out / "universal"
    if "universal" not in skip or not args.relabel:
        t = time.time()
        stages["universal"] = evaluate_all(final, test, fresh, logfile)
        timings["evaluate_universal"] = round(time.time() - t, 1)
    if args.relabel:
        t = time.time()
        labels = write_records(out / "data" / "labels", args.label_images, LABEL_SEED_BASE)
        config = json.loads((Path(args.start) / "config.json").read_text())
        pseudo_label(final, labels, out / "labels", keep=0.99, batch_size=50, group_field="source", attn_implementation="sdpa")
        train_router(
            final,
            labels,
            out / "labels",
            out / "router",
            seed=args.seed,
            attn_implementation="sdpa",
            batch_size=50,
            router_type=config["router_type"],
            router_threshold=config["router_threshold"],
            training_args=trainer_args(args.router_steps, 3e-3, 64, 10, args.seed),
        )
        timings["labels_router"] = round(time.time() - t, 1)
        final = out / "router"
        t = time.time()
        stages["relabelled"] = evaluate_all(final, test, fresh, logfile)
        timings["evaluate_relabelled"] = round(time.time() - t, 1)
    results = {
        "start": args.start,
        "test_set": {"seed": TEST_SEED, "images": args.test_images, "questions": len(test)},
        "fresh": {"seed": 0, "images": args.fresh_images, "questions": len(fresh)},
        "stages": stages,
        "ci": ci_rows(final),
        "final": str(final),
        "timings_seconds": timings,
        "args": vars(args),
    }
    dump(out / "results_packing.json", results)
    (out / "results_packing.md").write_text(table(stages))
    print(table(stages))
    if args.ship:
        ship(final, out)


def relative(path: str, out: Path) -> str:
    path = Path(path).resolve()
    if path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return str(Path("runs") / path.relative_to(out.resolve().parent)) if path.is_relative_to(out.resolve().parent) else path.name


def ship(final: Path, out: Path) -> None:
    """The trained checkpoint as the shipped toy VISOR-TR (`src/visor_hf/assets/toy-visor-tr/`, made portable, with
    `results_packing.json`), its table to `docs/toy_packing_results.md`. The toy VISOR is left as it is."""
    assets = REPO / "src" / "visor_hf" / "assets" / "toy-visor-tr"
    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    for path in final.iterdir():
        if path.is_file() and path.suffix != ".py":  # the package holds the modeling code itself
            shutil.copyfile(path, assets / path.name)
    results = json.loads((out / "results_packing.json").read_text())
    results.setdefault("ci", ci_rows(final))  # runs written before the CI rows existed
    # machine paths -> the repository's relative ones, or the run folder's under `runs/`
    results["start"], results["final"] = relative(results["start"], out), relative(results["final"], out)
    results["args"].update(out=relative(results["args"]["out"], out), start=relative(results["args"]["start"], out))
    dump(assets / "results_packing.json", results)
    make_portable(assets)
    card = assets / "README.md"  # the card of the toy VISOR it was continued from, told what this one is
    card.write_text(
        card.read_text().replace(
            "`examples/toy/train_toy.py --ship` reproduces it. Results: `results.json`.",
            "continued with token packing (VISOR-TR, 2x and 4x) by `examples/toy/train_packing.py`. Results: "
            "`results_packing.json`.",
        )
    )
    shutil.copyfile(out / "results_packing.md", REPO / "docs" / "toy_packing_results.md")


if __name__ == "__main__":
    main()
