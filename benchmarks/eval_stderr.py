"""How good is the validation standard error? Check both estimators against the design's true spread.

Validation windows are a systematic sample of the held-out split (data/validation.py). This scores
every non-overlapping window of the split once with a trained model, then takes all k systematic
sub-samples of every k-th window (k = 2, 4, 8, ...): their k means are k draws of the validation
figure a job with eval_bytes = split / k would report, so their standard deviation is the true
standard error of that design. Next to it, each estimator averaged over the k sub-samples:

- iid:  sample s.d. of the windows / sqrt(n), the textbook formula (ignores that windows are spread
        evenly over files that differ a lot from one another, so it overstates the error);
- sd:   the successive-difference estimator for systematic samples (Wolter 1984),
        sqrt(sum (y_i+1 - y_i)^2 / (2 (n - 1)) / n): neighbouring windows share a file or topic,
        so it measures the variation left once the sample's even spread is accounted for;
- cv:   what shardyard reports for byte data: the regression estimator with the windows' byte
        n-gram bits per byte as control variates (data/ngram_control.py). Its true error is the
        spread of the k *corrected* means, printed next to the plain means' spread, with its bias
        (mean of the k corrected means minus the figure over every window).

Also times one pass at the job's batch size and at larger eval batches (single process).

    python benchmarks/eval_stderr.py RUN_DIR [--batch 8 64 256]
    python benchmarks/eval_stderr.py --smoke    # trains a tiny run in a temp dir first (seconds)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardyard.data.ngram_control import NGramControl  # noqa: E402
from shardyard.data.training_data import load_training_data  # noqa: E402
from shardyard.data.validation import batch_windows  # noqa: E402
from shardyard.runtime.evaluation import per_window_bits  # noqa: E402
from shardyard.runtime.export import load_for_inference  # noqa: E402


def iid_stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values)))


def successive_difference_stderr(values: np.ndarray) -> float:
    diffs = np.diff(values)
    return float(np.sqrt(np.sum(diffs * diffs) / (2 * (len(values) - 1)) / len(values)))


def regression_estimate(y: np.ndarray, x: np.ndarray, x_means: np.ndarray) -> tuple[float, float]:
    """(estimate, standard error) of the regression estimator, straight from numpy's least squares."""
    design = np.column_stack([np.ones(len(y)), x - x.mean(axis=0)])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residuals = y - design @ coef
    dof = len(y) - x.shape[1] - 1
    return float(y.mean() + coef[1:] @ (x_means - x.mean(axis=0))), float(np.sqrt(residuals @ residuals / dof / len(y)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="eval batch sizes (default 8 64 256)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="train a tiny run in a temp dir and use it (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        from benchmarks.smoke import smoke_dir, tiny_run_dir

        args.run_dir = args.run_dir or tiny_run_dir(smoke_dir("eval_stderr"))
        args.batch = args.batch or [8, 64]
    if args.run_dir is None:
        parser.error("RUN_DIR is required (or --smoke)")
    args.batch = args.batch or [8, 64, 256]

    spec, model = load_for_inference(args.run_dir)
    data = load_training_data(spec.data)
    text = data.held_out
    seq_len = spec.data.seq_len
    starts = np.arange((len(text.data) - 1) // seq_len, dtype=np.int64) * seq_len
    print(
        f"# {args.run_dir}: {len(starts)} windows of {seq_len} bytes, {len(text.data):,} held-out bytes; "
        f"load {os.getloadavg()[0]:.1f}, {args.threads} thread(s)"
    )

    timings = {}
    values = None
    for batch in args.batch:
        batches = batch_windows(text.data, starts, seq_len, batch)
        t0 = time.perf_counter()
        bits = per_window_bits(model, batches, torch.device("cpu"))
        timings[batch] = time.perf_counter() - t0
        values = bits if values is None else values
        assert np.allclose(values, bits, atol=1e-4), "batch size changed the per-window figures"
    for batch, seconds in timings.items():
        print(
            f"eval batch {batch:4d}: {seconds:6.2f} s for {len(starts)} windows "
            f"({len(starts) * seq_len / seconds / 1e3:.1f} KB/s, {timings[args.batch[0]] / seconds:.2f}x batch "
            f"{args.batch[0]})"
        )

    t0 = time.perf_counter()
    controls = NGramControl.fit(data.train).window_controls(text.data, starts, seq_len)
    control_s = time.perf_counter() - t0
    everything = values.mean()
    print(
        f"\nall windows: {everything:.4f} bpb, iid s.e. {iid_stderr(values):.4f}, "
        f"successive-difference s.e. {successive_difference_stderr(values):.4f}, "
        f"n-gram controls: R^2 {1 - 1 / _gain(values, controls.values):.3f} ({control_s:.2f} s to fit and apply)\n"
    )
    print(
        "| k | windows per sample | eval KB | true s.e. plain (s.d. of the k means) | iid s.e. | sd s.e. "
        "| true s.e. cv (s.d. of the k corrected means) | cv s.e. reported | cv bias | iid / true | cv reported "
        "/ cv true |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in (2, 4, 8, 16, 32, 64):
        picks = [np.arange(offset, len(values), k) for offset in range(k)]
        n = min(len(p) for p in picks)
        picks = [p[:n] for p in picks]
        means = np.array([values[p].mean() for p in picks])
        true = float(means.std(ddof=1))
        iid = float(np.mean([iid_stderr(values[p]) for p in picks]))
        sd = float(np.mean([successive_difference_stderr(values[p]) for p in picks]))
        corrected = [regression_estimate(values[p], controls.values[p], controls.means) for p in picks]
        cv_true = float(np.std([c[0] for c in corrected], ddof=1))
        cv_reported = float(np.mean([c[1] for c in corrected]))
        bias = float(np.mean([c[0] for c in corrected]) - everything)
        print(
            f"| {k} | {n} | {n * seq_len / 1e3:.0f} | {true:.4f} | {iid:.4f} | {sd:.4f} | {cv_true:.4f} | "
            f"{cv_reported:.4f} | {bias:+.4f} | {iid / true:.2f} | {cv_reported / cv_true:.2f} |"
        )


def _gain(y: np.ndarray, x: np.ndarray) -> float:
    design = np.column_stack([np.ones(len(y)), x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residuals = y - design @ coef
    return float(y.var() / residuals.var())


if __name__ == "__main__":
    main()
