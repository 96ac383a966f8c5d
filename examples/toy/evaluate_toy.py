"""Re-evaluate a toy VISOR checkpoint on the recorded held-out sets and compare with its `results.json`:

    HF_HUB_OFFLINE=1 python examples/toy/evaluate_toy.py [--model DIR] [--results FILE] [--tolerance 0.0]

Runs every configuration of the checkpoint and the router on the held-out set of the results table (seed 2, 200
pictures, 1000 questions) and the router on the CI set (seed 3, 40 pictures), with the same evaluation code as
`train_toy.py` (`visor_hf.toy.evaluation`), and prints each VISOR row next to the recorded one. Exit status 1 when an
accuracy differs by more than `--tolerance` or a FLOPs ratio by more than `--flops-tolerance` (the FLOPs are
analytical: they move only when the accounting of `visor_hf.modeling.flops_visor` changes). (The dense LLaVA-OV and pooling rows
need the LLaVA-OV checkpoint of step 1, which is not shipped: they are printed as recorded.) About 1 minute on one
CPU thread.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from visor_hf.toy.data import eval_set
from visor_hf.toy.evaluation import evaluate_visor, report
from visor_hf.toy.inference import DEFAULT_CHECKPOINT, load_toy

COLUMNS = ("easy", "hard", "background", "red", "count_shape", "count_colour", "cell")


def compare(name: str, measured: dict, recorded: dict, tolerance: float, flops_tolerance: float) -> list[str]:
    problems = []
    for key in COLUMNS:
        if abs(measured["accuracy"][key] - recorded["accuracy"][key]) > tolerance:
            problems.append(f"{name}: {key} accuracy {measured['accuracy'][key]:.4f}, recorded {recorded['accuracy'][key]:.4f}")
    if abs(measured["flops_ratio"] - recorded["flops_ratio"]) > flops_tolerance:
        problems.append(f"{name}: FLOPs ratio {measured['flops_ratio']:.6f}, recorded {recorded['flops_ratio']:.6f}")
    return problems


def line(name: str, r: dict) -> str:
    return f"{name:22s} " + " ".join(f"{r['accuracy'][k]:.3f}" for k in COLUMNS) + f"  FLOPs x{r['flops_ratio']:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_CHECKPOINT), help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--results", default=None, help="recorded results.json (default: MODEL/results.json)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="largest accuracy difference accepted (default 0)")
    parser.add_argument("--flops-tolerance", type=float, default=0.01,
                        help="largest difference of a FLOPs ratio to dense accepted (default 0.01)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--update-flops", action="store_true",
                        help="when every accuracy reproduces, write the measured FLOPs of the VISOR rows and the CI set into the "
                        "results file and re-render docs/toy_results.md and the plot (after a change of the FLOPs accounting)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recorded = json.loads(Path(args.results or Path(args.model) / "results.json").read_text())
    model, _ = load_toy(args.model)
    test = eval_set(recorded["test_set"]["seed"], recorded["test_set"]["images"])
    print(f"held-out set: seed {recorded['test_set']['seed']}, {len(test)} questions; columns: {' '.join(COLUMNS)}")
    problems = []
    measured_flops = {}
    for name, row in recorded["rows"].items():
        if not name.startswith("VISOR"):
            print(line(name, row) + "  (recorded; needs the LLaVA-OV checkpoint of step 1)")
            continue
        if name == "VISOR router":
            configuration = "auto"
        else:
            layers = json.loads(row["sa_layers_text"])
            configuration = model.config.configurations.index(layers)
        measured = report(evaluate_visor(model, test, configuration), test)
        print(line(name, measured) + "  measured")
        print(line("", row) + "  recorded")
        problems += compare(name, measured, row, args.tolerance, args.flops_tolerance)
        measured_flops[name] = measured
    ci = recorded["ci"]
    ci_set = eval_set(ci["seed"], ci["images"])
    measured = report(evaluate_visor(model, ci_set, "auto"), ci_set)
    print(line("CI set, router", measured) + f"  measured (mean SA layers easy {measured['mean_sa_layers_easy']:.2f}, "
          f"hard {measured['mean_sa_layers_hard']:.2f})")
    print(line("", ci) + f"  recorded (mean SA layers easy {ci['mean_sa_layers_easy']:.2f}, hard {ci['mean_sa_layers_hard']:.2f})")
    problems += compare("CI set, router", measured, ci, args.tolerance, args.flops_tolerance)
    if args.update_flops:
        if any("accuracy" in p for p in problems):
            print("not updated: the accuracies do not reproduce")
            return 1
        for name, row in [*((n, recorded["rows"][n]) for n in measured_flops), ("CI set, router", ci)]:
            source = measured_flops.get(name, measured)
            row.update({key: source[key] for key in ("flops", "dense_flops", "flops_ratio", "saving")})
        write_results(recorded, Path(args.results or Path(args.model) / "results.json"))
        return 0
    for p in problems:
        print("MISMATCH", p)
    print("reproduced" if not problems else f"{len(problems)} mismatches")
    return 1 if problems else 0


def write_results(results: dict, path: Path) -> None:
    """Write the results file and re-render the docs table and plot from it, as `train_toy.py --ship` does."""
    from common import dump
    from train_toy import REPO, plot, table  # heavy imports: only when updating

    dump(path, results)
    (REPO / "docs" / "toy_results.md").write_text(table(results))
    plot(results, REPO / "docs" / "toy_accuracy_vs_flops.png")
    print(f"updated {path}, docs/toy_results.md and docs/toy_accuracy_vs_flops.png")


if __name__ == "__main__":
    sys.exit(main())
