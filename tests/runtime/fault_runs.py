"""One job and its uninterrupted run, shared by the fault tests on Ray (test_ray_training.py) and on
gloo (test_fault_resume.py): every faulty run is compared with the uninterrupted one (the same spec
and schedule; checkpoint and evaluation cadence do not change training losses)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import assert_same_series, tiny_spec_yaml, train_grad_norms, train_losses

FAULT_TRAINING = "{steps: 12, batch_size: 4, eval_every: 6, eval_bytes: 2048, log_every: 1}"


def fault_spec(root: Path) -> Path:
    spec = root / "job.yaml"
    spec.write_text(
        tiny_spec_yaml(
            "clean", root / "runs", training=FAULT_TRAINING, checkpoint=f"{{dir: {root / 'runs'}, every: 4, keep: 3}}"
        )
    )
    return spec


def assert_same_losses(run_dir: Path, reference: Path, tolerance: float) -> None:
    """Every step's loss within `tolerance`, and its gradient norm before clipping within a relative
    1e-4 (clipping and Adam hide a constant gradient scale from the losses)."""
    losses, reference_losses = train_losses(run_dir), train_losses(reference)
    assert sorted(losses) == sorted(reference_losses)
    for step in reference_losses:
        assert abs(losses[step] - reference_losses[step]) < tolerance, (step, losses[step], reference_losses[step])
    assert_same_series(train_grad_norms(run_dir), train_grad_norms(reference), 1e-4, "grad_norm")
