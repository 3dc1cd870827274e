"""Solver speed against the reference's per-row / per-column ``np.average`` loop, in one run.

Usage: ``python benchmarks/bench_solver.py [--repeat N]``.  Prints wall time per solve and the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from flatnorm_dask import measure_scales


def loop_baseline(b: np.ndarray, w: np.ndarray, iterations: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The reference's style: masked log data, one np.average per row or column per update."""
    n_rows, n_exp = b.shape
    log_b = np.ma.masked_invalid(np.log(b))
    log_g = np.zeros(n_rows)

    def update_e(log_g):
        return np.array([np.average(log_b[:, j] - log_g, weights=w[:, j]) for j in range(n_exp)])

    log_e = update_e(log_g)
    for _ in range(iterations):
        log_g = np.array([np.average(log_b[i, :] - log_e, weights=w[i, :]) for i in range(n_rows)])
        log_e = update_e(log_g)
        log_g = log_g - np.log(np.average(np.exp(log_g), weights=w.sum(axis=1)))
    return np.exp(update_e(log_g)), np.exp(log_g)


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'shape':>10} {'loop (s)':>10} {'solver (s)':>11} {'speed-up':>9} {'max rel diff':>13}")
    for rows, exps in [(189, 50), (3024, 50), (3024, 500)]:
        b = np.outer(rng.uniform(0.7, 1.3, rows), rng.uniform(1e4, 4e4, exps))
        b *= np.exp(rng.normal(0, 0.01, b.shape))
        w = rng.uniform(5e5, 1e6, b.shape)
        e_ref, g_ref = loop_baseline(b, w)
        fit = measure_scales(b, w)
        diff = max(np.max(np.abs(fit.vectorE / e_ref - 1)), np.max(np.abs(fit.vectorG / g_ref - 1)))
        t_loop = best_of(lambda: loop_baseline(b, w), 1 if rows * exps > 500_000 else args.repeat)
        t_fast = best_of(lambda: measure_scales(b, w), args.repeat)
        print(f"{rows:>5}x{exps:<4} {t_loop:>10.4f} {t_fast:>11.5f} {t_loop / t_fast:>8.0f}x {diff:>13.1e}")


if __name__ == "__main__":
    main()
