"""`shardyard report RUN_DIR`: an HTML page with plots from metrics.jsonl, tolerant of a cut last line."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from shardyard.platform.cli import main


def _run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "reported"
    run_dir.mkdir()
    lines = []
    for step in range(1, 9):
        shares = {f"moe/layer0/expert{e}_share": (e + step) / (4 * 1.5 + 4 * step) for e in range(4)}
        lines.append({"step": step, "kind": "train", "loss": 6.0 - 0.3 * step, "bpb": (6.0 - 0.3 * step) / 0.693,
                      "tokens_per_s": 1000.0 + step, **shares})
        if step % 4 == 0:
            lines.append({"step": step, "kind": "eval", "val_bpb": 8.0 - 0.2 * step})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9, "kind": "train", "lo'  # crash mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "spec.yaml").write_text("name: reported\n")
    return run_dir


def test_report_writes_html_with_plots_despite_a_cut_last_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = _run_dir(tmp_path)
    assert main(["report", str(run_dir)]) == 0
    assert f"report written: {run_dir / 'report.html'}" in capsys.readouterr().out
    page = (run_dir / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "Run reported" in page
    titles = re.findall(r"<h2>([^<]+)</h2><img", page)
    assert titles == ["Loss", "Throughput", "Expert load (layer 0)"]
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "val_bpb (final)</td><td>6.4" in page  # the last complete eval record
    assert "name: reported" in page  # the spec, escaped into the page

