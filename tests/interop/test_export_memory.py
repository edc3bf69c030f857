"""HF export streams: its peak memory above the process's baseline stays well below the model's size
(the consolidating export holds the model about twice). Measured in fresh subprocesses, as
benchmarks/interop.py does."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.interop import EXPORT_HF, EXPORT_OLD, TRAIN, python, spec_text

pytestmark = pytest.mark.slow


def test_hf_export_peak_memory_follows_the_largest_tensor_not_the_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    python(TRAIN, spec_text(256, 4, tmp_path), str(run_dir))
    hf = python(EXPORT_HF, str(run_dir), str(tmp_path / "hf"))
    old = python(EXPORT_OLD, str(run_dir), str(tmp_path / "old"))
    weights_mb = sum(f.stat().st_size for f in (tmp_path / "hf").glob("*.safetensors")) / 1e6
    assert weights_mb > 70  # 8 experts x 4 layers at width 256: ~79 MB
    largest_mb = 8 * 256 * 2 * 768 * 4 / 1e6  # one layer's expert stack w_up, fp32
    assert hf["peak_extra_mb"] < 3 * largest_mb < weights_mb, hf
    assert old["peak_extra_mb"] > weights_mb, old  # the peer holds the whole model
