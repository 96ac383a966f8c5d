"""A router that also chooses the packing factor (VISOR-TR): does it help? A study on a toy VISOR with packing modules.

    HF_HUB_OFFLINE=1 python examples/toy/router_packing.py --model RUN/universal --out RUN/router-packing

The configuration space becomes (SA configuration) x (packing factor 1, 2, 4). The packing factor fixes the prompt's
layout (its number of image placeholders) before the prefill, so a router that chooses it needs a **routing pass**:
the prompt runs at one fixed routing factor (`--routing-packing`; 4, the cheapest, and 1 are measured) up to and
including `config.router_layer`, the router reads the routing token there and picks a (configuration, packing) pair,
then the real prefill runs at the chosen factor. The routing pass's LLM FLOPs (layers 0..router_layer at the routing
factor, `routing_pass_flops`) are added to every routed question.

1. Every (configuration, packing) pair runs on a labelling set and on the held-out test set
   (`visor_hf.toy.evaluation.evaluate_visor`): correctness and LLM prefill FLOPs per question. Labelling set: the
   router-labelling pictures of the recipe (`LABEL_SEED_BASE`, `eval_set(30, n)` = the records `train_toy.py`
   labels, `--label-images` pictures, one question of each kind each); no stage of the LLM trained on them.
   Test set: `eval_set(TEST_SEED, TEST_IMAGES)` of `train_toy.py` (the results table's).
2. Targets per question kind, the project's default rule (`keep_targets(..., groups=kind)`): for every pair, the
   share of the maximal pair's accuracy (maximal configuration, packing 1) it keeps on the question's kind, capped
   at 1.
3. Router inputs: the routing token's hidden state after `router_layer` at the routing factor, captured by
   `visor_hf.training.router.routing_features` (the router's own input, from a forward hook). A calibrated head of
   the model's router architecture (a copy of the checkpoint's router with one output per pair, each row started
   from its configuration's row) is trained with binary cross-entropy on the targets, on inputs computed once
   (`RouterOnFeatures`, HF `Trainer`, lr 3e-3, batch 64, `--router-steps`), as `train_router` trains the model's.
   Selection at threshold `t`: the cheapest pair (mean prefill FLOPs on the labelling set) whose probability is
   `>= t` (ties: the higher probability, then the lower index), the maximal pair when none is.
4. Test-set rows by lookup in the per-pair table (exact: the router's input does not depend on what runs after
   it): accuracy per kind / easy / hard / all and mean FLOPs (chosen pair's prefill + routing pass) against dense
   LLaVA-OV on every visual token. Compared with every fixed pair, the checkpoint's own router at packing 1, 2, 4
   (`evaluate_visor(..., "auto", packing=k)`), a configuration-only router retrained the same way at each fixed
   packing (targets against the maximal configuration at that factor, as `pseudo_label(packing=k)` makes them; it
   reads the routing token inside its own prefill: no routing pass), and the pair rule (and each fixed factor's
   configuration rule) given each question's kind (an oracle: the labelling set's targets of the kind, no router
   and no routing pass). Every head is trained for each of `--head-seeds`: the rows are the first seed's, a second
   table gives every seed's accuracy and FLOPs (how much of a difference between two rows is the head's luck).
5. The lookup is checked on `--verify` test questions: the routing pass run on them alone, the head, the selection,
   then the chosen pair actually run (`evaluate_visor`); the chosen pair and the answer's correctness must match
   the lookup (`verification` in the JSON).

The packing module's own FLOPs (`flops_visor.packing_flops`; the routing factor's packing plus the chosen one) are
listed apart, as the projector's are (`packing_module_flops` in the JSON). Writes `router_packing.json` and
`router_packing.md` to `--out` and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import dump, log  # noqa: E402
from train_toy import TEST_IMAGES, TEST_SEED  # noqa: E402
from train_visor import LABEL_SEED_BASE, load, trainer_args  # noqa: E402

from visor_hf.modeling.flops_visor import FlopsShape, packing_flops, prefill_flops  # noqa: E402
from visor_hf.modeling.routing_visor import select_configurations  # noqa: E402
from visor_hf.toy.data import KINDS, Example, eval_set  # noqa: E402
from visor_hf.toy.evaluation import evaluate_visor, summarize  # noqa: E402
from visor_hf.toy.model import encode_batch, num_pooled_tokens, prompt_ids, toy_image_processor  # noqa: E402
from visor_hf.training.labels import keep_targets  # noqa: E402
from visor_hf.training.router import RouterOnFeatures, RoutingFeatures, routing_features  # noqa: E402

FACTORS = (1, 2, 4)
THRESHOLDS = (0.9, 0.95, 0.99)
ROUTING_FACTORS = (4, 1)

Pair = tuple[int, int]  # (configuration index, packing factor)


# -- the per-pair table -------------------------------------------------------------------------------------------


def pairs_of(config, factors=FACTORS) -> list[Pair]:
    """Every (configuration index, packing factor) pair, factor-major."""
    missing = [k for k in factors if k != 1 and k not in (config.packing_factors or [])]
    if missing:
        raise ValueError(
            f"the checkpoint has no packing module for factors {missing} (packing_factors="
            f"{config.packing_factors}): add one with from_pretrained(..., packing_factors=[2, 4])"
        )
    return [(c, k) for k in factors for c in range(len(config.configurations))]


def maximal_configuration(config) -> int:
    """The configuration with the most SA layers (ties: the higher index), as the router's rule reads it."""
    return max(range(len(config.configurations)), key=lambda c: (len(config.configurations[c]), c))


def run_pairs(model, examples: list[Example], pairs: list[Pair], batch_size: int = 50) -> dict[Pair, dict]:
    """`evaluate_visor` of every pair: per question `correct`, `loss`, `flops` (LLM prefill) and `dense_flops`."""
    return {(c, k): evaluate_visor(model, examples, c, batch_size, packing=k) for c, k in pairs}


def group_targets(results: dict[Pair, dict], pairs: list[Pair], examples: list[Example], maximal: Pair) -> dict[int, list[float]]:
    """`{question index: [target per pair]}`: the share of `maximal`'s accuracy each pair keeps on the question's
    kind, capped at 1 (the pipeline's group targets, `keep_targets(..., groups=...)`, over the pairs)."""
    table = [
        {
            "index": i,
            "configuration": p,
            "num_layers": len(results[pair]["configurations"][i]),
            "correct": results[pair]["correct"][i],
            "loss": results[pair]["loss"][i],
            "flops": results[pair]["flops"][i],
        }
        for p, pair in enumerate(pairs)
        for i in range(len(examples))
    ]
    groups = {i: e.question.kind for i, e in enumerate(examples)}
    return keep_targets(table, max_configuration=pairs.index(maximal), groups=groups)


# -- the routing pass -----------------------------------------------------------------------------------------------


class ToyRoutingCollator:
    """`routing_features`' collate function on `(index, Example)` items: `encode_batch` at one packing factor, plus
    `visor_packing` and `sample_index`."""

    def __init__(self, routing_token_id: int, packing: int):
        self.routing_token_id, self.packing = routing_token_id, packing
        self.processor = toy_image_processor()

    def __call__(self, items: list[tuple[int, Example]]) -> dict:
        batch = encode_batch([e for _, e in items], self.routing_token_id, self.processor, self.packing)
        if self.packing != 1:
            batch["visor_packing"] = self.packing
        batch["sample_index"] = torch.tensor([i for i, _ in items])
        return batch


def routing_inputs(model, examples: list[Example], packing: int, batch_size: int = 50) -> torch.Tensor:
    """The router's input (the routing token's hidden state after `router_layer`) of every question at `packing`:
    `[len(examples), hidden]`, in the examples' order."""
    collator = ToyRoutingCollator(model.config.routing_token_id, packing)
    features, samples = routing_features(model, list(enumerate(examples)), collator, batch_size)
    if samples.tolist() != list(range(len(examples))):
        raise ValueError("expected exactly one routing token per question")
    return features


def routing_pass_flops(config, n_text: int, n_visual: int) -> int:
    """LLM FLOPs of the routing pass: layers 0..router_layer over the prompt (`n_visual` visual tokens at the
    routing factor), the SA layers there that every configuration holds (what an "auto" sample runs before the
    router), the CA blocks there; no LM head."""
    last = config.router_layer
    shape = dataclasses.replace(FlopsShape.from_config(config), num_layers=last + 1)
    always = set.intersection(*(set(c) for c in config.configurations))
    sa = sorted(i for i in always if i <= last)
    ca = [i for i in config.cross_attention_layers if i <= last]
    return prefill_flops(shape, n_text, n_visual, sa, ca, lm_head_tokens=0)


def question_routing_flops(config, examples: list[Example], packing: int) -> list[int]:
    """`routing_pass_flops` of each question (its text tokens, with the routing token; the packed picture)."""
    n_visual = num_pooled_tokens(packing)
    return [routing_pass_flops(config, len(prompt_ids(e.question.text, config.routing_token_id, 0)), n_visual) for e in examples]


# -- the heads ------------------------------------------------------------------------------------------------------


def pair_head(router: torch.nn.Module, pairs: list[Pair]) -> torch.nn.Module:
    """A copy of the model's router (same class and architecture) with one output per pair; output `(c, k)` starts
    as the checkpoint's output `c`."""
    head = copy.deepcopy(router)
    fc2 = torch.nn.Linear(router.fc2.in_features, len(pairs), dtype=router.fc2.weight.dtype)
    rows = [c for c, _ in pairs]
    with torch.no_grad():
        fc2.weight.copy_(router.fc2.weight[rows])
        fc2.bias.copy_(router.fc2.bias[rows])
    head.fc2 = fc2
    return head


def train_head(
    head: torch.nn.Module, features: torch.Tensor, targets: dict[int, list[float]], steps: int, seed: int = 0
) -> torch.nn.Module:
    """Binary cross-entropy on the soft targets, on router inputs computed once (`RouterOnFeatures`, HF `Trainer`,
    the toy recipe's router settings); returns the head in eval mode."""
    from transformers import Trainer

    from visor_hf.training.stages import make_training_arguments

    settings = {**trainer_args(steps, 3e-3, 64, min(10, steps), seed), "logging_steps": max(steps, 1)}
    samples = torch.arange(len(features))
    with tempfile.TemporaryDirectory() as scratch:
        Trainer(
            model=RouterOnFeatures(head.train()),
            args=make_training_arguments(scratch, settings),
            train_dataset=RoutingFeatures(features, samples, targets),
        ).train()
    return head.eval()


@torch.no_grad()
def probabilities(head: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(head(features.to(head.fc2.weight.dtype)).float())


def select_pairs(probability: torch.Tensor, costs: list[float], threshold: float, maximal: int) -> list[int]:
    """Pair index per question: the cheapest pair (by `costs`) whose probability is `>= threshold` (ties: the higher
    probability, then the lower index); `maximal` when no pair is."""
    chosen = []
    # compared in the probabilities' dtype, as the model's calibrated rule compares them
    above_rows = (probability >= torch.tensor(threshold, dtype=probability.dtype)).tolist()
    for row, above in zip(probability.tolist(), above_rows):
        candidates = [p for p, ok in enumerate(above) if ok]
        chosen.append(min(candidates, key=lambda p: (costs[p], -row[p], p)) if candidates else maximal)
    return chosen


# -- rows -----------------------------------------------------------------------------------------------------------


def lookup(
    results: dict[Pair, dict],
    pairs: list[Pair],
    choice: list[int],
    examples: list[Example],
    routing_flops: list[int] | None = None,
    routing_packing: int | None = None,
    hidden_size: int | None = None,
) -> dict:
    """Accuracy and FLOPs of one pair per question, read from the per-pair table. `routing_flops` (per question):
    the routing pass at `routing_packing`, added to every question (`flops`), and only where the chosen factor
    differs from the routing one (`flops_reusing_routing_pass`: what a prefill continuing the routing pass pays)."""
    kinds = [e.question.kind for e in examples]
    chosen = [pairs[p] for p in choice]
    correct = [results[pair]["correct"][i] for i, pair in enumerate(chosen)]
    prefill = [results[pair]["flops"][i] for i, pair in enumerate(chosen)]
    extra = routing_flops or [0] * len(choice)
    flops = [f + r for f, r in zip(prefill, extra)]
    reusing = [f + (r if pair[1] != routing_packing else 0) for f, r, pair in zip(prefill, extra, chosen)]
    dense = float(np.mean(results[pairs[0]]["dense_flops"]))
    out = {
        "accuracy": summarize(correct, kinds),
        "flops": float(np.mean(flops)),
        "prefill_flops": float(np.mean(prefill)),
        "routing_pass_flops": float(np.mean(extra)),
        "dense_flops": dense,
        "flops_ratio": float(np.mean(flops)) / dense,
        "flops_ratio_reusing_routing_pass": float(np.mean(reusing)) / dense,
        "saving": dense / float(np.mean(flops)),
        "packing_share": {str(k): sum(pair[1] == k for pair in chosen) / len(chosen) for k in sorted({k for _, k in pairs})},
        "pair_histogram": {f"{k}x c{c}": sum(pair == (c, k) for pair in chosen) for c, k in pairs},
        "pair_per_kind": {
            kind: {
                f"{k}x c{c}": sum(pair == (c, k) for pair, kk in zip(chosen, kinds) if kk == kind)
                for c, k in pairs
                if any(pair == (c, k) and kk == kind for pair, kk in zip(chosen, kinds))
            }
            for kind in KINDS
        },
        "choice": choice,
    }
    if hidden_size is not None:
        packed = [packing_flops(hidden_size, pair[1], num_pooled_tokens(pair[1])) for pair in chosen]
        if routing_packing is not None:
            packed = [p + packing_flops(hidden_size, routing_packing, num_pooled_tokens(routing_packing)) for p in packed]
        out["packing_module_flops"] = float(np.mean(packed))
    return out


def two_pass_check(
    model,
    head,
    examples: list[Example],
    indices: list[int],
    routing_packing: int,
    pairs: list[Pair],
    costs: list[float],
    thresholds,
    maximal: int,
    lookups: dict[float, list[int]],
    results: dict[Pair, dict],
) -> dict:
    """Run the two passes for real on `examples[indices]`: the routing pass (these questions alone), the head, the
    selection at each threshold, then each chosen pair (`evaluate_visor`). Counts where the chosen pair and the
    answer's correctness agree with the lookup."""
    subset = [examples[i] for i in indices]
    probability = probabilities(head, routing_inputs(model, subset, routing_packing, batch_size=len(subset)))
    out = {"questions": len(indices), "indices": indices, "thresholds": {}}
    for t in thresholds:
        chosen = select_pairs(probability, costs, t, maximal)
        same_pair = sum(p == lookups[t][i] for p, i in zip(chosen, indices))
        same_answer = 0
        for p, i in zip(chosen, indices):
            c, k = pairs[p]
            real = evaluate_visor(model, [examples[i]], c, packing=k)["correct"][0]
            same_answer += real == results[pairs[lookups[t][i]]]["correct"][i]
        out["thresholds"][str(t)] = {"same_pair": same_pair, "same_correctness": same_answer}
    return out


# -- the study ------------------------------------------------------------------------------------------------------


def study(
    model,
    label: list[Example],
    test: list[Example],
    *,
    factors=FACTORS,
    routing_factors=ROUTING_FACTORS,
    thresholds=THRESHOLDS,
    router_steps: int = 2000,
    verify: int = 20,
    seeds=(0,),
    batch_size: int = 50,
    logfile=None,
) -> dict:
    """Every row of the comparison (see the module documentation) and the lookup's verification."""
    config = model.config
    timings, clock = {}, time.time()
    pairs = pairs_of(config, factors)
    top = maximal_configuration(config)
    maximal = pairs.index((top, 1))
    label_results = run_pairs(model, label, pairs, batch_size)
    test_results = run_pairs(model, test, pairs, batch_size)
    timings["pairs"] = round(time.time() - clock, 1)
    log(f"every pair on {len(label)} labelling and {len(test)} test questions: {timings['pairs']} s", logfile)
    costs = [float(np.mean(label_results[pair]["flops"])) for pair in pairs]
    targets = group_targets(label_results, pairs, label, pairs[maximal])
    hidden = config.text_config.hidden_size
    rows = {}
    for p, (c, k) in enumerate(pairs):
        rows[f"{k}x {config.configurations[c]}"] = lookup(test_results, pairs, [p] * len(test), test, hidden_size=hidden)

    clock = time.time()
    for k in factors:
        routed = evaluate_visor(model, test, "auto", batch_size, packing=k)
        index = {tuple(layers): c for c, layers in enumerate(config.configurations)}
        choice = [pairs.index((index[tuple(layers)], k)) for layers in routed["configurations"]]
        row = lookup(test_results, pairs, choice, test, hidden_size=hidden)
        row["lookup_agrees_with_run"] = sum(
            a == b for a, b in zip(routed["correct"], [test_results[pairs[p]]["correct"][i] for i, p in enumerate(choice)])
        )
        rows[f"{k}x checkpoint router, t={config.router_threshold:g}"] = row
    timings["checkpoint_router"] = round(time.time() - clock, 1)

    clock = time.time()
    features = {
        k: (routing_inputs(model, label, k, batch_size), routing_inputs(model, test, k, batch_size))
        for k in sorted(set(factors) | set(routing_factors))
    }
    timings["router_inputs"] = round(time.time() - clock, 1)

    clock = time.time()
    configurations = config.configurations
    fixed_targets = {
        k: group_targets(label_results, [(c, k) for c in range(len(configurations))], label, (top, k)) for k in factors
    }
    seeds = list(seeds)
    per_seed, verification = {}, {}
    for s in seeds:  # the heads' training seed: how much of a difference between rows is the head's luck
        found = per_seed[s] = {}
        for k in factors:  # a configuration-only router at each fixed factor, trained as the pair head is
            head = train_head(copy.deepcopy(model.model.router), features[k][0], fixed_targets[k], router_steps, s)
            with torch.no_grad():
                logits = head(features[k][1])
            for t in thresholds:
                chosen = select_configurations(logits, torch.arange(len(test)), len(test), configurations, [t] * len(test))
                found[f"{k}x retrained router, t={t:g}"] = lookup(
                    test_results, pairs, [pairs.index((c, k)) for c in chosen], test, hidden_size=hidden
                )
        for r in routing_factors:
            head = train_head(pair_head(model.model.router, pairs), features[r][0], targets, router_steps, s)
            probability = probabilities(head, features[r][1])
            extra = question_routing_flops(config, test, r)
            chosen_at = {}
            for t in thresholds:
                chosen_at[t] = select_pairs(probability, costs, t, maximal)
                found[f"pair router (routing at {r}x), t={t:g}"] = lookup(
                    test_results, pairs, chosen_at[t], test, extra, r, hidden
                )
            if s == seeds[0]:
                indices = np.random.default_rng(s).choice(len(test), size=min(verify, len(test)), replace=False).tolist()
                verification[f"routing at {r}x"] = two_pass_check(
                    model, head, test, sorted(indices), r, pairs, costs, thresholds, maximal, chosen_at, test_results
                )
    rows.update(per_seed[seeds[0]])
    spread = {
        name: {
            field: [per_seed[s][name][field] if field != "all" else per_seed[s][name]["accuracy"]["all"] for s in seeds]
            for field in ("all", "flops_ratio")
        }
        for name in per_seed[seeds[0]]
    }
    timings["heads_and_verification"] = round(time.time() - clock, 1)

    def by_kind(table: dict[int, list[float]]) -> dict[str, list[float]]:
        """The labelling set's targets of each kind (the same for every question of a kind)."""
        out = {}
        for i, e in enumerate(label):
            out.setdefault(e.question.kind, table[i])
        return out

    pair_kind = by_kind(targets)
    for t in thresholds:
        choice = select_pairs(torch.tensor([pair_kind[e.question.kind] for e in test]), costs, t, maximal)
        rows[f"pair rule given the kind (oracle), t={t:g}"] = lookup(test_results, pairs, choice, test, hidden_size=hidden)
    for k in factors:  # the same oracle over the configurations at one fixed factor
        fixed = [pairs.index((c, k)) for c in range(len(configurations))]
        kind_targets = by_kind(fixed_targets[k])
        for t in thresholds:
            probability = torch.tensor([kind_targets[e.question.kind] for e in test])
            choice = select_pairs(probability, [costs[p] for p in fixed], t, top)
            rows[f"{k}x configuration rule given the kind (oracle), t={t:g}"] = lookup(
                test_results, pairs, [fixed[c] for c in choice], test, hidden_size=hidden
            )

    for name, row in rows.items():
        a = row["accuracy"]
        log(f"{name}: all {a['all']:.3f} easy {a['easy']:.3f} hard {a['hard']:.3f} FLOPs x{row['flops_ratio']:.3f}", logfile)
    return {
        "pairs": [
            {"configuration": c, "layers": configurations[c], "packing": k, "mean_prefill_flops_labelling": costs[p]}
            for p, (c, k) in enumerate(pairs)
        ],
        "maximal_pair": list(pairs[maximal]),
        "targets_by_kind": {kind: dict(zip((f"{k}x c{c}" for c, k in pairs), v)) for kind, v in pair_kind.items()},
        "rows": rows,
        "head_seeds": seeds,
        "seed_spread": spread,
        "verification": verification,
        "timings_seconds": timings,
    }


def table(results: dict) -> str:
    lines = [
        "| row | background | red | count shape | count colour | cell | easy | hard | all | FLOPs / dense | "
        "(routing pass reused) | saving | packing module / dense | packing 1 / 2 / 4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["rows"].items():
        a = r["accuracy"]
        share = " / ".join(f"{r['packing_share'].get(str(k), 0.0):.2f}" for k in FACTORS)
        reused = f"{r['flops_ratio_reusing_routing_pass']:.3f}" if r["routing_pass_flops"] else ""
        lines.append(
            f"| {name} | {a['background']:.3f} | {a['red']:.3f} | {a['count_shape']:.3f} | {a['count_colour']:.3f} | "
            f"{a['cell']:.3f} | {a['easy']:.3f} | {a['hard']:.3f} | {a['all']:.3f} | {r['flops_ratio']:.3f} | {reused} | "
            f"{r['saving']:.2f}x | {r['packing_module_flops'] / r['dense_flops']:.3f} | {share} |"
        )
    return "\n".join(lines) + "\n"


def spread_table(results: dict) -> str:
    """The learned routers' rows for every head seed: all-question accuracy and FLOPs / dense (mean, then each seed)."""
    seeds = results["head_seeds"]
    lines = [
        f"| learned router (head seeds {', '.join(map(str, seeds))}) | accuracy: mean | per seed | FLOPs / dense: mean | per seed |",
        "|---|---|---|---|---|",
    ]
    for name, values in results["seed_spread"].items():
        accuracy, ratio = values["all"], values["flops_ratio"]
        lines.append(
            f"| {name} | {np.mean(accuracy):.3f} | {' / '.join(f'{a:.3f}' for a in accuracy)} | {np.mean(ratio):.3f} | "
            f"{' / '.join(f'{r:.3f}' for r in ratio)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a toy VISOR checkpoint with packing modules (packing_factors [2, 4])")
    parser.add_argument("--out", required=True, help="folder for router_packing.json and router_packing.md")
    parser.add_argument("--label-images", type=int, default=300, help="labelling pictures (5 questions each)")
    parser.add_argument("--test-images", type=int, default=TEST_IMAGES, help="held-out pictures (5 questions each)")
    parser.add_argument("--routing-packing", default=",".join(map(str, ROUTING_FACTORS)), help="routing factors to measure")
    parser.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    parser.add_argument("--router-steps", type=int, default=2000, help="steps of each head (on cached router inputs)")
    parser.add_argument("--verify", type=int, default=20, help="test questions on which the two passes run for real")
    parser.add_argument("--head-seeds", default="0,1,2", help="training seeds of every head (rows: the first; spread: all)")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logfile = out / "log.txt"
    start, cpu = time.time(), time.process_time()
    model = load(args.model)
    label = eval_set(LABEL_SEED_BASE // 1_000_000, args.label_images)  # = the recipe's router-labelling records
    test = eval_set(TEST_SEED, args.test_images)
    results = study(
        model,
        label,
        test,
        routing_factors=[int(k) for k in args.routing_packing.split(",")],
        thresholds=[float(t) for t in args.thresholds.split(",")],
        router_steps=args.router_steps,
        verify=args.verify,
        seeds=[int(s) for s in args.head_seeds.split(",")],
        batch_size=args.batch_size,
        logfile=logfile,
    )
    results.update(
        {
            "model": str(args.model),
            "label_set": {"seed": LABEL_SEED_BASE // 1_000_000, "images": args.label_images, "questions": len(label)},
            "test_set": {"seed": TEST_SEED, "images": args.test_images, "questions": len(test)},
            "configurations": model.config.configurations,
            "router_layer": model.config.router_layer,
            "wall_seconds": round(time.time() - start, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1),
            "load_average": os.getloadavg(),
            "args": vars(args),
        }
    )
    dump(out / "router_packing.json", results)
    text = table(results) + "\n" + spread_table(results)
    (out / "router_packing.md").write_text(text)
    print(text)
    log(f"done in {results['wall_seconds']} s (CPU {results['cpu_seconds']} s): {out / 'router_packing.md'}", logfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
