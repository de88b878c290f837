"""FedSVD's claim over the seeds of several `bench.fedsvd` results that share one base and one setup.

    python -m bench.fedsvd_seeds fedsvd fedsvd_seeds3to7 [--out fedsvd_seeds]

`bench.fedsvd` runs its seeds in one invocation; more seeds come from another invocation of the same plan
(`--seeds 3,4,5`), which pretrains its base again from the same seed. This joins such results: it refuses any
two that differ in what the seeds share (the base's eval losses, the hyperparameters, model, adapters, DP
budget, clients; `SHARED`) or that repeat a seed, then judges the claim over every seed with
`bench.fedsvd.claim` (FedSVD below both baselines on every seed and on the mean) and adds, per baseline, the
paired comparison the claim's "on the same seeds" asks for:

- `differences`: per seed, the baseline's final eval loss minus FedSVD's (positive: FedSVD ahead);
- `mean`, `std` (sample), and a two-sided paired t-test over the seeds (`scipy.stats.ttest_rel`: `t`, `p`);
- `fedsvd_wins`: on how many of the seeds FedSVD is ahead, and the two-sided sign test's `sign_p` for that count.

`paired_holds`: FedSVD ahead of both baselines on the mean with p < 0.05 in the paired t-test against each.
Writes bench/results/<out>.json (the joined rows, their per-method means, `claim`, `paired`, and
`paired_script_eval`: the same on the simulator's script eval) and <out>.png (bench.fedsvd's plot over every
seed).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import common
from bench.fedsvd import COLUMNS, METHODS, Hyper, aggregate, claim, plot
from bench.paired import ALPHA, ahead, compare

# What every joined result must hold the same: anything that differs makes the seeds not comparable.
SHARED = ("base_eval_loss", "base_script_eval_loss", "hp", "clients", "per_round", "model", "lowrank", "dp",
          "max_chars")


def load(name: str) -> dict[str, Any]:
    """A bench.fedsvd result by its name in bench/results (or a path to its JSON)."""
    path = Path(name) if name.endswith(".json") else common.RESULTS / f"{name}.json"
    doc: dict[str, Any] = json.loads(path.read_text())
    if "rows" not in doc or "claim" not in doc:
        raise ValueError(f"{path} is not a bench.fedsvd result (no rows and claim)")
    return doc


def shared(doc: dict[str, Any], key: str) -> Any:
    """`doc`'s `key` as the seeds share it; a result written before a hyperparameter existed (`hp` without
    `rank`, from before `--rank`) ran at that hyperparameter's default, so it is compared as having it."""
    value = doc.get(key)
    if key == "hp" and isinstance(value, dict):
        defaults = asdict(Hyper())
        return {**{k: defaults[k] for k in defaults.keys() - value.keys()}, **value}
    return value


def join(docs: list[tuple[str, dict[str, Any]]]) -> tuple[list[dict[str, Any]], list[int]]:
    """The DP rows of every result (their per-method mean rows dropped) and all their seeds, in order. Raises
    ValueError naming the results and the field where two differ, or a seed that two results both ran."""
    (first_name, first), *rest = docs
    for name, doc in rest:
        for key in SHARED:
            if shared(doc, key) != shared(first, key):
                raise ValueError(f"{name} and {first_name} differ in {key!r} ({shared(doc, key)!r} vs "
                                 f"{shared(first, key)!r}): their seeds are not comparable")
    rows: list[dict[str, Any]] = []
    seeds: list[int] = []
    for name, doc in docs:
        ran = list(doc["claim"]["seeds"])
        repeated = sorted(set(ran) & set(seeds))
        if repeated:
            raise ValueError(f"{name} repeats seed(s) {repeated} of an earlier result")
        seeds += ran
        rows += [r for r in doc["rows"] if r["dp"] and r["seed"] != "mean"]
    return rows, seeds


def paired(rows: list[dict[str, Any]], seeds: list[int], key: str = "final_eval_loss") -> dict[str, Any]:
    """Per baseline: FedSVD against it on the same seeds (see the module docstring)."""
    loss = {(r["method"], r["seed"]): float(r[key]) for r in rows}
    svd = [loss[("fedsvd", s)] for s in seeds]
    out: dict[str, Any] = {"metric": key, "seeds": seeds, "alpha": ALPHA}
    for kind in METHODS[1:]:
        result = compare([loss[(kind, s)] for s in seeds], svd)
        result["fedsvd_wins"] = result.pop("wins")
        out[kind] = result
    out["paired_holds"] = all(ahead(out[k]) for k in METHODS[1:])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="bench.fedsvd result names in bench/results (or JSON paths)")
    parser.add_argument("--out", default="fedsvd_seeds", help="result name in bench/results (default fedsvd_seeds)")
    args = parser.parse_args(argv)
    if len(args.results) < 2:
        parser.error("give at least two bench.fedsvd results to join")
    try:
        docs = [(name, load(name)) for name in args.results]
        rows, seeds = join(docs)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    missing = [(k, s) for k in METHODS for s in seeds if not any(r["method"] == k and r["seed"] == s for r in rows)]
    if missing:
        parser.error(f"the joined results lack the DP runs {missing}")
    first = docs[0][1]
    rows_and_means = rows + aggregate(rows)
    verdict = claim(rows_and_means, seeds)
    test = paired(rows, seeds)
    setup = {key: shared(first, key) for key in SHARED}
    common.write_result(args.out, "python -m bench.fedsvd_seeds " + " ".join(args.results), rows_and_means,
                 COLUMNS, joined=args.results, seeds=seeds, claim=verdict, paired=test,
                 paired_script_eval=paired(rows, seeds, "final_script_eval_loss"), **setup)
    print(f"wrote {plot({**setup, 'rows': rows}, common.RESULTS / f'{args.out}.png')}")
    for kind in METHODS[1:]:
        t = test[kind]
        print(f"{kind} - fedsvd: mean {t['mean']:+.5f} (std {t['std']:.5f}) over {len(seeds)} seeds, paired t "
              f"{t['t']:.2f}, p {t['p']:.3f}; FedSVD ahead on {t['fedsvd_wins']} (sign test p {t['sign_p']:.3f})")
    print(f"claim (every seed and mean): {verdict['holds']}; on the mean: {verdict['on_mean']}; "
          f"paired (p < {ALPHA} against both): {test['paired_holds']}")


if __name__ == "__main__":
    main()
