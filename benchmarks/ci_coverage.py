"""Simulated coverage of the paired bootstrap 95% CI of a difference in mean AUROC, as the report
computes it (medpeft.metrics.compare.bootstrap_auroc_difference[_over_seeds], percentile interval).

    python benchmarks/ci_coverage.py [--simulations 1000] [--n 300] [--resamples 2000] [--out benchmarks/results]

Each simulated test set has n images; each label is positive with its prevalence, independently.
Binormal scores with a known true AUROC: model m scores an image d_m y + z + u_m (one label), z ~ N(0,
0.6) shared by both models (the same image is easy or hard for both: correlation 0.6) and u_m ~ N(0,
0.4) its own, so AUROC_m = Phi(d_m / sqrt(2 (0.6 + 0.4))) and the true difference is the mean over
labels of AUROC_a - AUROC_b. "Seeds": every seed adds its own N(0, 0.25) to each model's scores of the
same images (the variance in the AUROC formula becomes 1.25 per seed) and the CI is of the seed mean.
Coverage = share of the simulations whose CI holds the true difference, with its binomial standard
error, and that of the basic (reverse percentile) interval from the same resamples, (2 estimate -
high, 2 estimate - low), for comparison; "p < 0.05" = share with a bootstrap p-value under 0.05 (the test's size where the true
difference is 0, its power elsewhere). Writes ci_coverage.json and ci_coverage.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

from medpeft.files import write_json_atomic, write_text_atomic
from medpeft.metrics.compare import bootstrap_auroc_difference_over_seeds

ROOT = Path(__file__).resolve().parents[1]
SHARED, OWN, SEED_NOISE = 0.6, 0.4, 0.25  # variances of the image effect, each model's own noise, each seed's
# name: (prevalence per label, separation d_a and d_b per label, seeds, stratified)
SETTINGS = {
    "binary": ([0.3], [1.2], [1.0], 1, True),
    "binary unstratified": ([0.3], [1.2], [1.0], 1, False),
    "binary no true difference": ([0.3], [1.0], [1.0], 1, True),
    "binary rare label (5%)": ([0.05], [1.2], [1.0], 1, True),
    "3 labels": ([0.1, 0.3, 0.5], [1.2, 1.0, 1.5], [1.0, 1.0, 1.2], 1, True),
    "3 labels unstratified": ([0.1, 0.3, 0.5], [1.2, 1.0, 1.5], [1.0, 1.0, 1.2], 1, False),
    "3 labels 3 seeds averaged": ([0.1, 0.3, 0.5], [1.2, 1.0, 1.5], [1.0, 1.0, 1.2], 3, True),
}


def true_difference(d_a: list[float], d_b: list[float], seeds: int) -> float:
    """Mean over labels of the binormal AUROC_a - AUROC_b: Phi(d / sqrt(2 var)), var of one score."""
    variance = SHARED + OWN + (SEED_NOISE if seeds > 1 else 0.0)
    return float(np.mean(norm.cdf(np.array(d_a) / math.sqrt(2 * variance))
                         - norm.cdf(np.array(d_b) / math.sqrt(2 * variance))))


def simulate(rng: np.random.Generator, n: int, prevalence, d_a, d_b, seeds: int) -> list[tuple]:
    """One test set: a (targets, scores_a, scores_b) per seed, the same images and targets."""
    y = (rng.random((n, len(prevalence))) < prevalence).astype(float)
    shared = rng.normal(0, math.sqrt(SHARED), y.shape)
    a = np.array(d_a) * y + shared + rng.normal(0, math.sqrt(OWN), y.shape)
    b = np.array(d_b) * y + shared + rng.normal(0, math.sqrt(OWN), y.shape)
    if seeds == 1:
        return [(y, a, b)]
    return [(y, a + rng.normal(0, math.sqrt(SEED_NOISE), y.shape), b + rng.normal(0, math.sqrt(SEED_NOISE), y.shape))
            for _ in range(seeds)]


def run_setting(setting: tuple, simulations: int, n: int, resamples: int, seed: int) -> dict:
    prevalence, d_a, d_b, seeds, stratified = setting
    truth = true_difference(d_a, d_b, seeds)
    rng = np.random.default_rng(seed)
    covered, basic, significant, widths, lost, start = 0, 0, 0, [], 0, time.perf_counter()
    for i in range(simulations):
        samples = simulate(rng, n, prevalence, d_a, d_b, seeds)
        result = bootstrap_auroc_difference_over_seeds(samples, n_resamples=resamples, seed=i, stratify=stratified)
        covered += result.ci_low <= truth <= result.ci_high
        basic += 2 * result.estimate - result.ci_high <= truth <= 2 * result.estimate - result.ci_low
        significant += result.p_value < 0.05
        widths.append(result.ci_high - result.ci_low)
        lost += result.n_label_lost
    coverage = covered / simulations
    return {"prevalence": prevalence, "d_a": d_a, "d_b": d_b, "seeds": seeds, "stratified": stratified,
            "true_difference": round(truth, 5), "simulations": simulations, "coverage": coverage,
            "coverage_se": math.sqrt(coverage * (1 - coverage) / simulations),
            "basic_interval_coverage": basic / simulations,
            "p_below_0.05": significant / simulations, "mean_ci_width": float(np.mean(widths)),
            "label_lost_per_resample": lost / (simulations * resamples),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulations", type=int, default=1000)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    rows = {}
    for index, name in enumerate(args.settings.split(",")):
        rows[name] = run_setting(SETTINGS[name], args.simulations, args.n, args.resamples, seed=index)
        print(name, rows[name], flush=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs",
              "n_images": args.n, "n_resamples": args.resamples, "confidence": 0.95, "interval": "percentile",
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "ci_coverage.json", result)
    lines = ["# Coverage of the paired bootstrap 95% CI of a difference in mean AUROC", "",
             f"{args.n} images per simulated test set, {args.resamples} resamples, percentile interval; "
             f"binormal scores (see benchmarks/ci_coverage.py); {result['machine']}; "
             f"`python benchmarks/ci_coverage.py --simulations {args.simulations}`.", "",
             "| setting | true difference | simulations | coverage | ± SE | basic interval coverage | p < 0.05 "
             "| mean CI width | label lost per resample | s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {name} | {r['true_difference']:.4f} | {r['simulations']} | {100 * r['coverage']:.1f}% | "
              f"{100 * r['coverage_se']:.1f} | {100 * r['basic_interval_coverage']:.1f}% | "
              f"{100 * r['p_below_0.05']:.1f}% | {r['mean_ci_width']:.4f} | "
              f"{100 * r['label_lost_per_resample']:.2f}% | {r['seconds']} |" for name, r in rows.items()]
    write_text_atomic(args.out / "ci_coverage.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
