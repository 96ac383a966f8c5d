"""The toy VISOR, end to end, in one command (CPU, one torch thread):

    HF_HUB_OFFLINE=1 python examples/toy/train_toy.py --out runs/toy [--ship]

1. trains a tiny LLaVA-OneVision from scratch on the synthetic visual questions of `visor_hf.toy` (train_llava.py);
2. converts it to VISOR with `visor_hf.conversion.convert` (8 layers: CA 0, 2, 5; SA 1, 3, 6, 7; router after 0);
3. runs the VISOR stages with the project's default pipeline (`visor_hf.training`): stage 1, stage 2,
   configuration search (per question kind: each record's `source`), universal fine-tuning, labels and the
   calibrated router;
4. evaluates dense LLaVA-OV, token pooling 2x/4x on it, every kept VISOR configuration and the router on a
   held-out set, and writes `results.json`, `results.md` and `accuracy_vs_flops.png` to `--out`, and the router's
   accuracy-vs-FLOPs curve over thresholds (`visor_hf.training.evaluate_curve`, what `visor-hf evaluate --curve`
   runs) to `--out/curve`.

`--ship` also copies the trained VISOR checkpoint to `src/visor_hf/assets/toy-visor/` and the tables and plots to
`docs/`. `--reuse-llava` and `--reuse-stages` restart from the LLaVA-OV of step 1 and the stage-1/2 checkpoints of an
earlier run in the same `--out` (the steps after them are seeded the same way, so a restarted run equals a full one). Every random draw is seeded: the pictures by their index, the model initialisations and data orders by
`--seed`. (Float summation order on other machines may still change the last digits.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import dump, fmt, log, set_seed, start_run  # noqa: E402
from train_llava import evaluate_llava, train_llava  # noqa: E402
from train_visor import (  # noqa: E402
    LABEL_SEED_BASE,
    VISOR_TRAIN_SEED_BASE,
    KeyWordCollator,
    evaluate_visor,
    load,
    report,
    trainer_args,
    write_records,
)
from transformers import LlavaOnevisionForConditionalGeneration  # noqa: E402

from visor_hf.modeling.flops_visor import FlopsShape, prefill_flops  # noqa: E402
from visor_hf.toy.data import eval_set  # noqa: E402
from visor_hf.toy.model import IMAGE_ID, PAD_ID, encode_batch, num_pooled_tokens, toy_image_processor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CROSS = [0, 2, 5]
SELF = [1, 3, 6, 7]
ROUTER_LAYER = 0
TEST_SEED, TEST_IMAGES = 2, 200  # the held-out set of the results table (1000 questions)
CI_SEED, CI_IMAGES = 3, 40  # the fixed held-out set of the CI test (200 questions)
ROUTER_THRESHOLD = 0.99  # the calibrated router's default threshold: keep 99 % of max's accuracy per question kind
SEARCH_SEED_BASE, SEARCH_IMAGES = 40_000_000, 120


def dense_report(llava, examples, pool: int) -> dict:
    acc, correct = evaluate_llava(llava, examples, pool)
    shape = FlopsShape.from_config(llava.config)
    flops = []
    for chunk_start in range(0, len(examples), 100):
        batch = encode_batch(examples[chunk_start : chunk_start + 100], None, toy_image_processor())
        for row in batch["input_ids"]:
            n_visual = int((row == IMAGE_ID).sum())
            n_text = int((row != PAD_ID).sum()) - n_visual
            flops.append(prefill_flops(shape, n_text, num_pooled_tokens(pool)))
    dense = [prefill_flops(shape, f_text, 88) for f_text in _text_counts(examples)]
    mean, dmean = float(np.mean(flops)), float(np.mean(dense))
    return {"accuracy": acc, "flops": mean, "dense_flops": dmean, "flops_ratio": mean / dmean, "saving": dmean / mean}


def _text_counts(examples) -> list[int]:
    counts = []
    for e in examples:
        counts.append(2 + len(e.question.text.split()) + 3)  # <|im_start|> user ... <|im_end|> <|im_start|> assistant
    return counts


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, diff in zip(axes, ("easy", "hard")):
        xs, ys = [], []
        for name, r in results["rows"].items():
            x, y = r["flops_ratio"], r["accuracy"][diff]
            if name.startswith("VISOR ["):
                xs.append(x)
                ys.append(y)
                marker, colour = "o", "tab:blue"
            elif name == "VISOR router":
                marker, colour = "*", "tab:red"
            elif name.startswith("LLaVA-OV pool"):
                marker, colour = "s", "tab:green"
            else:
                marker, colour = "D", "black"
            ax.scatter([x], [y], marker=marker, color=colour, s=120 if marker == "*" else 40, zorder=3)
            label = {"VISOR []": "CA only", "LLaVA-OV (dense)": "LLaVA-OV"}.get(name, name.replace("VISOR [", "SA ["))
            ax.annotate(label.replace("LLaVA-OV pool", "pool"), (x, y), fontsize=7,
                        xytext=(4, -11) if name == "VISOR router" else (3, 4), textcoords="offset points")
        order = np.argsort(xs)
        ax.plot(np.array(xs)[order], np.array(ys)[order], color="tab:blue", alpha=0.5)
        ax.set_xlabel("LLM prefill FLOPs / dense LLaVA-OV")
        ax.set_title(f"{diff} questions")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy")
    fig.suptitle(f"Toy VISOR: accuracy vs FLOPs (held-out set, {results['test_set']['questions']} questions)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    lines = ["| model | SA layers | easy | hard | background | any red | count shape | count colour | cell | "
             "mean prefill FLOPs (M) | FLOPs vs dense | saving |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        a = r["accuracy"]
        sa = r.get("sa_layers_text", "all")
        lines.append(f"| {name} | {sa} | {a['easy']:.3f} | {a['hard']:.3f} | {a['background']:.3f} | {a['red']:.3f} | "
                     f"{a['count_shape']:.3f} | {a['count_colour']:.3f} | {a['cell']:.3f} | {r['flops'] / 1e6:.1f} | "
                     f"{r['flops_ratio']:.3f} | {r['saving']:.2f}x |")
    return "\n".join(lines) + "\n"


def make_portable(folder: Path) -> None:
    """The shipped folder loads without the package too (`trust_remote_code=True`): `auto_map` in the model and
    processor configs, the modeling files as symbolic links to the package's own (one copy in the repository; a wheel
    holds real files), a model card, and a tokenizer that `stop_strings` can use."""
    import json

    from transformers import AutoTokenizer

    from visor_hf.modeling import VisorConfig
    from visor_hf.modeling.hub_visor import MODEL_AUTO_MAP, PROCESSOR_AUTO_MAP, visor_model_card

    for name, auto_map in (("config.json", MODEL_AUTO_MAP), ("processor_config.json", PROCESSOR_AUTO_MAP)):
        path = folder / name
        data = json.loads(path.read_text())
        data["auto_map"] = dict(auto_map)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    modeling = REPO / "src" / "visor_hf" / "modeling"
    for code in sorted(modeling.glob("*_visor.py")):
        link = folder / code.name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..", "..", "modeling", code.name))
    # `generate(stop_strings=...)` decodes every token after the probe word "abcdef" (transformers'
    # `StopStringCriteria`); a word-level vocabulary must know that word: an ordinary token on a spare embedding row
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    if tokenizer.add_tokens(["abcdef"]):
        tokenizer.save_pretrained(folder)
    text = (
        "\nThe toy VISOR of `visor_hf` (`visor-hf toy`): a tiny LLaVA-OneVision trained on synthetic pictures of shapes; "
        "`examples/toy/train_toy.py --ship` reproduces it. Results: `results.json`.\n"
    )
    visor_model_card(VisorConfig.from_pretrained(folder), text=text).save(folder / "README.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llava-steps", type=int, default=1500)
    parser.add_argument("--tower-steps", type=int, default=800, help="vision tower pre-training steps (step 1)")
    parser.add_argument("--llava-eval-images", type=int, default=100, help="pictures of step 1's running evaluation")
    parser.add_argument("--stage1-steps", type=int, default=150)
    parser.add_argument("--stage2-steps", type=int, default=200)
    parser.add_argument("--universal-steps", type=int, default=300)
    parser.add_argument("--label-images", type=int, default=300)
    parser.add_argument("--router-steps", type=int, default=2000, help="router steps (on cached router inputs: seconds)")
    parser.add_argument("--images-per-step", type=int, default=8)
    parser.add_argument("--search-images", type=int, default=SEARCH_IMAGES, help="pictures of the search set (5 questions each)")
    parser.add_argument("--test-images", type=int, default=TEST_IMAGES, help="pictures of the results table's held-out set")
    parser.add_argument("--ci-images", type=int, default=CI_IMAGES, help="pictures of the CI test's held-out set")
    parser.add_argument("--reuse-llava", action="store_true", help="skip step 1 when OUT/llava exists")
    parser.add_argument("--reuse-stages", action="store_true", help="skip stage 1 and 2 when OUT/stages/stage2 exists")
    parser.add_argument("--reuse-universal", action="store_true",
                        help="skip the search and universal fine-tuning when OUT/stages/universal exists")
    parser.add_argument("--from-checkpoint", default=None,
                        help="start at the configuration search from this VISOR checkpoint (e.g. the shipped toy-visor, "
                        "trained by an earlier run) instead of steps 1-2 and stages 1-2; the dense LLaVA-OV rows of the "
                        "table are copied from its results.json (the LLaVA-OV of step 1 is not shipped)")
    parser.add_argument("--router-type", choices=["argmax", "calibrated"], default="calibrated",
                        help="the router head (calibrated: a probability per configuration, threshold at inference)")
    parser.add_argument("--router-threshold", type=float, default=ROUTER_THRESHOLD,
                        help="default threshold of the calibrated router written into the config")
    parser.add_argument("--cell-word-target", action=argparse.BooleanOptionalAction, default=True,
                        help="step 1 and the VISOR stages also supervise each cell question's answer at the cell word")
    parser.add_argument("--cell-word-steps", type=int, default=None,
                        help="step 1: weight the cell-word target like the others for this many steps (default: all) ...")
    parser.add_argument("--cell-word-weight-after", type=float, default=0.1, help="... then with this weight")
    parser.add_argument("--count-word-target", action=argparse.BooleanOptionalAction, default=True,
                        help="the same auxiliary target for counting questions, at the colour or shape word")
    parser.add_argument("--ship", action="store_true", help="copy the checkpoint to src/visor_hf/assets and results to docs")
    args = parser.parse_args()
    out, logfile = start_run(args.out)
    timings = {}
    start = time.time()

    # 1. LLaVA-OV from scratch
    llava_dir = out / "llava"
    start_from = Path(args.from_checkpoint).resolve() if args.from_checkpoint else None
    if start_from is None and not (args.reuse_llava and (llava_dir / "config.json").is_file()):
        t = time.time()
        train_llava(str(llava_dir), steps=args.llava_steps, tower_steps=args.tower_steps, seed=args.seed, logfile=logfile,
                    eval_images=args.llava_eval_images, cell_word_target=args.cell_word_target,
                    cell_word_steps=args.cell_word_steps, cell_word_weight_after=args.cell_word_weight_after,
                    count_word_target=args.count_word_target)
        timings["llava"] = round(time.time() - t, 1)

    # 2. conversion
    from visor_hf.conversion import convert

    set_seed(args.seed)
    converted = out / "visor-converted"
    if start_from is None:
        convert(llava_dir, converted, cross_attention_layers=CROSS, self_attention_layers=SELF,
                configurations=[[], [1], [1, 6], [1, 3, 6], SELF], router_layer=ROUTER_LAYER, overwrite=True,
                routing_token_init="mean")  # the recorded run initialised the routing token's rows from the mean
        log(f"converted: CA {CROSS}, SA {SELF}, router layer {ROUTER_LAYER}", logfile)

    # 3. VISOR stages with the project's training pipeline (visor_hf.training, HF Trainer)
    from visor_hf.training import evaluate_curve, pseudo_label, search, train_router, train_stage
    from visor_hf.training.data import load_processor

    key_kinds = ("cell",) * args.cell_word_target + ("count_shape", "count_colour") * args.count_word_target

    def collator(source):  # None: the pipeline's own
        return KeyWordCollator(load_processor(source), key_kinds) if key_kinds else None

    data = out / "data"
    images = args.images_per_step
    batch = images * 5  # one question of each kind per picture
    t = time.time()
    stage_data = {name: write_records(data / name, steps * images, base)
                  for name, steps, base in (("stage1", args.stage1_steps, VISOR_TRAIN_SEED_BASE),
                                            ("stage2", args.stage2_steps, VISOR_TRAIN_SEED_BASE + 1_000_000),
                                            ("universal", args.universal_steps, VISOR_TRAIN_SEED_BASE + 2_000_000))}
    search_data = write_records(data / "search", args.search_images, SEARCH_SEED_BASE)
    label_data = write_records(data / "labels", args.label_images, LABEL_SEED_BASE)
    test_data = write_records(data / "test", args.test_images, TEST_SEED * 1_000_000)  # = eval_set(TEST_SEED, ...)
    timings["data"] = round(time.time() - t, 1)
    stages = out / "stages"
    for stage, source, steps, lr in (("1", converted, args.stage1_steps, 1e-3), ("2", stages / "stage1", args.stage2_steps, 3e-4)):
        if start_from is not None or (args.reuse_stages and (stages / "stage2" / "config.json").is_file()):
            log(f"stage {stage}: skipped ({'--from-checkpoint' if start_from else 'reused'})", logfile)
            continue
        t = time.time()
        train_stage(source, stage_data[f"stage{stage}"], stages / f"stage{stage}", stage, seed=args.seed,
                    attn_implementation="sdpa", data_collator=collator(source), training_args=trainer_args(steps, lr, batch, min(50, steps // 5), args.seed))
        timings[f"stage{stage}"] = round(time.time() - t, 1)
        log(f"stage {stage}: {timings[f'stage{stage}']} s", logfile)
    # search with the pipeline's defaults: every subset of the SA layers on held-out records, viable when it keeps 99 %
    # of the maximal configuration's accuracy on one question kind, then each kind's cheapest one (and the maximal)
    t = time.time()
    reuse = args.reuse_universal and (stages / "universal" / "config.json").is_file()
    if reuse:  # the search and universal fine-tuning of an earlier run in the same --out
        import json

        from visor_hf.training.evaluation import read_jsonl

        found = {"candidates": read_jsonl(stages / "search" / "search_results.jsonl"),
                 **json.loads((stages / "search" / "search_summary.json").read_text())}
    else:
        found = search(start_from or stages / "stage2", search_data, stages / "search", batch_size=50, seed=args.seed,
                       attn_implementation="sdpa")
    search_summary = [{k: c[k] for k in ("layers", "accuracy", "loss", "flops_ratio_to_max", "groups", "viable_groups", "viable")
                       if k in c} for c in found["candidates"]]
    for c in search_summary:
        log(f"search {c}", logfile)
    kept = found["written"]
    timings["search"] = round(time.time() - t, 1)
    log(f"kept configurations: {kept}", logfile)
    t = time.time()
    if not reuse:
        train_stage(stages / "search", stage_data["universal"], stages / "universal", "universal", seed=args.seed,
                    attn_implementation="sdpa", data_collator=collator(stages / "search"),
                    training_args=trainer_args(args.universal_steps, 2e-4, batch, min(50, args.universal_steps // 5), args.seed))
        timings["universal"] = round(time.time() - t, 1)
    t = time.time()
    # labels and targets per question kind (the records' `source`): see docs/toy.md for the comparison of the rules
    label_report = pseudo_label(stages / "universal", label_data, stages / "labels", keep=0.99, batch_size=50,
                                group_field="source", attn_implementation="sdpa")
    label_report.pop("moved_to_cheapest", None)
    log(f"labels: {label_report}", logfile)
    router_report = train_router(stages / "universal", label_data, stages / "labels", stages / "router", seed=args.seed,
                                 attn_implementation="sdpa", batch_size=50, router_type=args.router_type,
                                 router_threshold=args.router_threshold,
                                 training_args=trainer_args(args.router_steps, 3e-3, 64, 10, args.seed))
    log(f"router: {router_report}", logfile)
    timings["labels_router"] = round(time.time() - t, 1)
    final = stages / "router"

    # 4. evaluation
    t = time.time()
    test = eval_set(TEST_SEED, args.test_images)
    rows = {}
    if start_from is not None:
        import json

        earlier = json.loads((start_from / "results.json").read_text())
        for name in ("LLaVA-OV (dense)", "LLaVA-OV pool 2x", "LLaVA-OV pool 4x"):
            rows[name] = earlier["rows"][name]
    else:
        llava = LlavaOnevisionForConditionalGeneration.from_pretrained(llava_dir, attn_implementation="sdpa").float().eval()
        rows["LLaVA-OV (dense)"] = dense_report(llava, test, 1)
        rows["LLaVA-OV pool 2x"] = dense_report(llava, test, 2)
        rows["LLaVA-OV pool 4x"] = dense_report(llava, test, 4)
    model = load(final)
    for c, layers in enumerate(model.config.configurations):
        r = report(evaluate_visor(model, test, c), test)
        r["sa_layers_text"] = str(layers)
        rows[f"VISOR {layers}"] = r
    routed = evaluate_visor(model, test, "auto")
    r = report(routed, test)
    r["sa_layers_text"] = "router"
    r["configuration_histogram"] = {d: {str(list(c)): sum(1 for cc, e in zip(routed["configurations"], test)
                                                          if cc == tuple(c) and e.question.difficulty == d)
                                        for c in model.config.configurations} for d in ("easy", "hard")}
    rows["VISOR router"] = r
    for name, r in rows.items():
        log(f"{name}: {fmt(r['accuracy'])} flops x{r['flops_ratio']:.3f}", logfile)
    curve = evaluate_curve(final, test_data, batch_size=50, output=out / "curve", attn_implementation="sdpa")
    for point in curve["points"]:
        log(f"curve {point['name']}: accuracy {point['accuracy']:.3f} FLOPs x{point['flops_ratio_to_dense']:.3f}", logfile)
    ci_set = eval_set(CI_SEED, args.ci_images)
    ci = report(evaluate_visor(model, ci_set, "auto"), ci_set)
    timings["evaluation"] = round(time.time() - t, 1)
    timings["total"] = round(time.time() - start, 1)
    results = {
        "layout": {"cross_attention_layers": CROSS, "self_attention_layers": SELF, "router_layer": model.config.router_layer,
                   "configurations": model.config.configurations, "router_type": model.config.router_type,
                   "router_threshold": model.config.router_threshold},
        "test_set": {"seed": TEST_SEED, "images": args.test_images, "questions": len(test)},
        "rows": rows,
        "ci": {"seed": CI_SEED, "images": args.ci_images, **ci},
        "search": search_summary,
        "search_kept": found["written"],
        "router_curve": [{k: p[k] for k in ("name", "accuracy", "groups", "flops_ratio_to_dense", "flops_saving_vs_dense") if k in p}
                         for p in curve["points"]],
        "labels": label_report,
        "router_training": router_report,
        "timings_seconds": timings,
        "args": vars(args),
    }
    dump(out / "results.json", results)
    (out / "results.md").write_text(table(results))
    plot(results, out / "accuracy_vs_flops.png")
    log(f"done in {timings['total']:.0f} s: {out / 'results.md'}", logfile)
    print(table(results))

    if args.ship:
        ship(out)
        log(f"shipped to {REPO / 'src' / 'visor_hf' / 'assets' / 'toy-visor'}", logfile)


def ship(out: Path) -> None:
    """Copy a finished run (`--out`) into the repository: the router checkpoint to `src/visor_hf/assets/toy-visor/`
    (made portable, with `results.json`), the results table and plots and the router curve to `docs/` (what `--ship`
    does)."""
    assets = REPO / "src" / "visor_hf" / "assets" / "toy-visor"
    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    for path in (out / "stages" / "router").iterdir():
        if path.is_file() and path.suffix != ".py":  # the package holds the modeling code itself
            shutil.copyfile(path, assets / path.name)
    make_portable(assets)
    shutil.copyfile(out / "results.json", assets / "results.json")
    shutil.copyfile(out / "accuracy_vs_flops.png", REPO / "docs" / "toy_accuracy_vs_flops.png")
    shutil.copyfile(out / "results.md", REPO / "docs" / "toy_results.md")
    shutil.copyfile(out / "curve" / "curve.png", REPO / "docs" / "toy_router_curve.png")
    shutil.copyfile(out / "curve" / "curve.md", REPO / "docs" / "toy_router_curve.md")


if __name__ == "__main__":
    main()
