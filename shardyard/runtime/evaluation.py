"""Held-out bits per byte with a standard error: one path for in-training evaluation and `shardyard eval`.

Bits per byte = the windows' summed token cross-entropy (nats) / ln 2 / the bytes their target tokens
cover, so runs with different tokenizers compare on one axis. With bytes every window covers
data.seq_len bytes and this is the mean of the per-window figures; with a tokenizer windows cover
different byte counts, and the figure is the ratio of sums. Its standard error is the ratio
estimator's (delta method): sqrt(sum_i (bits_i - R bytes_i)^2 / (n (n - 1))) / mean(bytes), which
for equal windows is the sample standard deviation of per-window bits per byte / sqrt(n). Ranks
all-reduce six float64 sums (count, bits, bytes, bits^2, bytes^2, bits*bytes), so the result does
not depend on how the windows were split.

With byte data and an n-gram control model (data/ngram_control.py) the figure is the regression
estimator instead: the sample mean corrected by the windows' n-gram bits per byte against their
known mean over the whole text, with the residuals' standard error, typically 2-3x smaller from the
same windows. Ranks then also all-reduce the controls' sums, cross products and products with the
per-window figure.

Windows are a systematic sample (data/validation.py), for which the i.i.d. standard error is a
conservative estimate. Two models evaluated on the same data score the same windows, so their
difference can be judged window by window (`window_bits_per_byte`), which is far tighter than
comparing the two error bars.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from shardyard.data.ngram_control import NGramControl, WindowControls
from shardyard.platform.schema import JobSpec

LN2 = math.log(2)
CONTROL_MIN_WINDOWS = 24  # fewer windows: the plain estimator (the slope needs ~8 windows per control)

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class EvalResult:
    bpb: float  # mean bits per byte over windows
    stderr: float  # standard error of that mean (nan with fewer than 2 windows)
    windows: int  # windows scored, all ranks
    bytes: int  # bytes scored, all ranks
    control_gain: float = 1.0  # plain-estimator variance / this estimator's (1 = no control variates)


def window_bits_and_bytes(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each window's summed bits and the bytes its targets cover, float64 [batch] each
    (`token_bytes[id]`: bytes of token id; None = one byte per token)."""
    logits, _ = model(inputs, targets)
    return logits_bits_and_bytes(logits, targets, token_bytes)


def logits_bits_and_bytes(
    logits: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`window_bits_and_bytes` from the windows' logits."""
    nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    bits = nats.view(targets.shape).double().sum(dim=1) / LN2
    if token_bytes is None:
        covered = torch.full_like(bits, float(targets.shape[1]))
    else:
        covered = token_bytes.to(targets.device)[targets].double().sum(dim=1)
    return bits, covered


def window_bits_per_byte(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor | None = None
) -> torch.Tensor:
    """Bits per byte of each window of the batch, float64 [batch]."""
    bits, covered = window_bits_and_bytes(model, inputs, targets, token_bytes)
    return bits / covered.clamp(min=1)


def summarize(count: float, total: float, total_sq: float, bytes_per_window: float) -> EvalResult:
    """Mean and standard error from the count, sum and sum of squares of per-window values."""
    n = int(round(count))
    if n == 0:
        return EvalResult(float("nan"), float("nan"), 0, 0)
    mean = total / n
    if n < 2:
        return EvalResult(mean, float("nan"), n, int(round(bytes_per_window * n)))
    variance = max(total_sq - n * mean * mean, 0.0) / (n - 1)
    return EvalResult(mean, math.sqrt(variance / n), n, int(round(bytes_per_window * n)))


def summarize_ratio(sums: list[float]) -> EvalResult:
    """Bits per byte (ratio of sums) and its delta-method standard error from
    [count, bits, bytes, bits^2, bytes^2, bits*bytes]."""
    count, bits, covered, bits_sq, bytes_sq, cross = sums
    n = int(round(count))
    if n == 0 or covered <= 0:
        return EvalResult(float("nan"), float("nan"), n, int(round(covered)))
    ratio = bits / covered
    if n < 2:
        return EvalResult(ratio, float("nan"), n, int(round(covered)))
    residual_sq = max(bits_sq - 2 * ratio * cross + ratio * ratio * bytes_sq, 0.0)
    mean_bytes = covered / n
    return EvalResult(ratio, math.sqrt(residual_sq / (n * (n - 1))) / mean_bytes, n, int(round(covered)))


def summarize_regression(sums: list[float], control_means: np.ndarray) -> EvalResult:
    """The regression estimator of the mean bits per byte over every window of the text, from equal-length
    windows' [count, bits, bytes, bits^2, bytes^2, bits*bytes] followed by the controls' sums (p), cross
    products (p x p) and products with bits per byte (p); `control_means`: the controls over every window."""
    plain = summarize_ratio(sums[:6])
    p = len(control_means)
    n = sums[0]
    if n < max(CONTROL_MIN_WINDOWS, p + 3) or not math.isfinite(plain.stderr):
        return plain
    length = sums[2] / n  # bytes per window
    mean_y = sums[1] / length / n
    s_yy = sums[3] / length**2 - n * mean_y * mean_y
    x_sum = np.array(sums[6 : 6 + p])
    mean_x = x_sum / n
    s_xx = np.array(sums[6 + p : 6 + p + p * p]).reshape(p, p) - n * np.outer(mean_x, mean_x)
    s_xy = np.array(sums[6 + p + p * p : 6 + 2 * p + p * p]) - n * mean_x * mean_y
    slope = np.linalg.lstsq(s_xx, s_xy, rcond=1e-10)[0]
    residual_ss = max(s_yy - float(slope @ s_xy), 0.0)
    if residual_ss <= 0.0:
        return plain
    estimate = mean_y + float(slope @ (np.asarray(control_means) - mean_x))
    stderr = math.sqrt(residual_ss / (n - p - 1) / n)
    return EvalResult(estimate, stderr, plain.windows, plain.bytes, (plain.stderr / stderr) ** 2)


@contextlib.contextmanager
def training_accounting_kept(model: torch.nn.Module) -> Iterator[None]:
    """Evaluation forwards must not count toward the training step's bookkeeping: MoE layers sum
    per-expert token counts and losses into buffers between optimizer steps (their
    `take_step_stats()` reads and resets them; the aux-free bias update and the logged expert loads
    use them). Set them aside, evaluate, drop what evaluation added, put them back."""
    layers = [m for m in model.modules() if callable(getattr(m, "take_step_stats", None))]
    saved = [layer.take_step_stats() for layer in layers]
    try:
        yield
    finally:
        for layer, stats in zip(layers, saved):
            layer.take_step_stats()
            for name, value in stats.items():
                getattr(layer, name).copy_(value)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """No grad, eval mode and untouched training bookkeeping; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), training_accounting_kept(model):
            yield
    finally:
        model.train(was_training)


def evaluate(
    model: torch.nn.Module,
    batches: list[Batch],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    world: int = 1,
    group: dist.ProcessGroup | None = None,
    token_bytes: torch.Tensor | None = None,
    controls: WindowControls | None = None,
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
) -> EvalResult:
    """Bits per byte of `model` over this rank's `batches`, combined over the `world` ranks (collective
    when world > 1: every rank calls it, with the same number of batches for expert-parallel models).
    `token_bytes`: bytes each token id covers (None: bytes, one each). `controls`: the windows' n-gram
    control variates in batch order (used with bytes only; the same on every rank or None on every rank).
    `logits_of`: a batch's logits when `model` is one pipeline rank's part (Pipeline.logits): the last
    stage's ranks score the windows, the others run their stages and add nothing."""
    use_controls = controls is not None and token_bytes is None
    p = controls.values.shape[1] if use_controls else 0
    # windows, bits, bytes, bits^2, bytes^2, bits*bytes; then sum x, x x^T, x * bpb of the controls
    sums = torch.zeros(6 + 2 * p + p * p, dtype=torch.float64)
    seen = 0
    with eval_mode(model):
        for inputs, targets in batches:
            with autocast():
                if logits_of is None:
                    bits, covered = window_bits_and_bytes(model, inputs.to(device), targets.to(device), token_bytes)
                else:
                    logits = logits_of(inputs.to(device), targets.to(device))
                    if logits is None:
                        continue
                    bits, covered = logits_bits_and_bytes(logits, targets.to(device), token_bytes)
            bits, covered = bits.cpu(), covered.cpu()
            sums[:6] += torch.stack(
                [
                    torch.tensor(float(len(bits)), dtype=torch.float64),
                    bits.sum(),
                    covered.sum(),
                    bits.square().sum(),
                    covered.square().sum(),
                    (bits * covered).sum(),
                ]
            )
            if use_controls:
                x = torch.from_numpy(controls.values[seen : seen + len(bits)])
                sums[6 : 6 + p] += x.sum(dim=0)
                sums[6 + p : 6 + p + p * p] += (x.T @ x).flatten()
                sums[6 + p + p * p :] += (x * (bits / covered)[:, None]).sum(dim=0)
            seen += len(bits)
    if world > 1:
        reduced = sums.to(device)
        dist.all_reduce(reduced, group=group)
        sums = reduced.cpu()
    if use_controls:
        return summarize_regression(sums.tolist(), controls.means)
    return summarize_ratio(sums.tolist())


def autocast_for(spec: JobSpec, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """The forward-pass autocast training uses (training.precision), as a context factory."""
    if spec.training.precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def eval_control(spec: JobSpec, data: Any) -> NGramControl | None:
    """The n-gram control model for training.eval_control (None: off, or tokenized data)."""
    if spec.training.eval_control != "ngram" or data.token_bytes is not None:
        return None
    return NGramControl.fit(data.train)


def evaluate_run(
    run_dir: Path, data_paths: list[str] | None = None, step: int | None = None, overrides: list[str] | None = None
) -> tuple[JobSpec, EvalResult]:
    """`shardyard eval`: a run's model (newest checkpoint, or `step`) on `data_paths` (every file under
    them; default: the run's own held-out split), through the same window selection and evaluation as
    training. The windows are those a job with the run's resources.workers (its max) would score, evaluated in
    one process, so with the run's held-out split the figure equals the run's logged val_bpb."""
    from shardyard.data.training_data import load_training_data
    from shardyard.data.validation import all_batches, all_controls, load_text
    from shardyard.platform.spec import load_spec_text, spec_to_yaml
    from shardyard.runtime.export import load_for_inference

    spec, model = load_for_inference(Path(run_dir), step)
    if overrides:
        spec = load_spec_text(spec_to_yaml(spec), f"{run_dir}/spec.yaml", overrides)
    data = load_training_data(spec.data)
    text = data.encode_text(load_text(data_paths, spec.data.extensions)) if data_paths else data.held_out
    token_bytes = None if data.token_bytes is None else torch.from_numpy(data.token_bytes)
    seq_len = spec.data.seq_len
    world = spec.resources.max_workers
    if (len(text.data) - 1) // seq_len < world:
        from shardyard.platform.errors import UserError

        raise UserError(f"--data: {len(text.data)} bytes hold fewer than {world} windows of {seq_len + 1} bytes")
    batches = all_batches(text, seq_len, spec.training.eval_bytes, spec.training.batch_size, world)
    controls = all_controls(text, seq_len, spec.training.eval_bytes, world, eval_control(spec, data))
    device = torch.device("cpu")
    return spec, evaluate(
        model, batches, device, autocast_for(spec, device), token_bytes=token_bytes, controls=controls
    )


def per_window_bits(
    model: torch.nn.Module,
    batches: list[Batch],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    token_bytes: torch.Tensor | None = None,
) -> np.ndarray:
    """Every window's bits per byte in batch order (single process): for paired comparisons."""
    out = []
    with eval_mode(model):
        for inputs, targets in batches:
            with autocast():
                out.append(
                    window_bits_per_byte(model, inputs.to(device), targets.to(device), token_bytes).cpu().numpy()
                )
    return np.concatenate(out) if out else np.zeros(0)
