"""`shardyard report`: one self-contained page about real runs (one resumed, wandb disabled, a cut last
line), comparing two runs, rendered by a real headless Chromium: no errors, every figure non-blank."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from shardyard.cli.main import main
from shardyard.platform.spec import load_spec_text
from shardyard.runtime import checkpoint as ckpt
from shardyard.runtime.worker import LocalReporter, Trainer
from tests.helpers import tiny_spec_yaml

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MOE = "{kind: moe, width: 32, depth: 2, heads: 2, ffn: {hidden: 32}, moe: {num_experts: 8, top_k: 2}}"


def _train(tmp_path: Path, name: str, steps: int, lr: float, resume: bool = False) -> Path:
    text = tiny_spec_yaml(
        name,
        tmp_path,
        model=MOE,
        resources="{workers: 1, cpus_per_worker: 1, max_failures: 0}",
        data="{paths: [stdlib], seq_len: 32, max_bytes: 400000}",
        optim=f"{{lr: {lr}, schedule: {{warmup: 2}}}}",
        tracking="{mode: disabled}",
        training=f"{{steps: {steps}, batch_size: 4, eval_every: 4, eval_bytes: 1024, log_every: 1}}",
        checkpoint=f"{{dir: {tmp_path}, every: 4, keep: 2}}",
    )
    spec = load_spec_text(text)
    run_dir = tmp_path / name
    run_dir.mkdir(exist_ok=True)
    (run_dir / "spec.yaml").write_text(text)
    trainer = Trainer(spec, run_dir, LocalReporter(run_dir, spec.checkpoint.keep))
    trainer.resume(ckpt.find_latest_checkpoint(run_dir) if resume else None)
    trainer.fit()
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    first = _train(root, "base", steps=4, lr=3e-3)
    _train(root, "base", steps=8, lr=3e-3, resume=True)  # a restart: continues from step 4
    with open(first / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "kind": "train", "lo')  # a crash mid-write
    second = _train(root, "hot", steps=8, lr=1e-2)
    return first, second


def test_one_run_report_from_the_run_directory_alone(runs: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    run_dir = runs[0]
    assert not (run_dir / "wandb").exists()  # tracking disabled: the page comes from the run directory
    assert main(["report", str(run_dir)]) == 0
    assert f"report written: {run_dir / 'report.html'}" in capsys.readouterr().out
    page = (run_dir / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "http://" not in page and "https://" not in page
    ids = re.findall(r"<figure class='fig' id='([^']+)'", page)
    assert ids == ["fig-loss", "fig-throughput", "fig-anatomy", "fig-memory", "fig-load-0-0", "fig-load-0-1"]
    rows = dict(re.findall(r"<tr><td[^>]*>([^<]+)</td><td>([^<]*)</td></tr>", page))  # summary table: label -> value
    assert rows["restarts"] == "1", rows  # one restart (the resume at step 4), in its own row
    assert rows["steps"] == "8", rows
    assert "name: base" in page


def test_the_comparison_table_gives_each_run_its_own_restart_count(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "compare.html"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    cells = re.findall(r"<tr><td[^>]*>([^<]+)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", out.read_text())
    rows = {label: (a, b) for label, a, b in cells}
    assert rows["restarts"] == ("1", "0"), rows  # base resumed once, hot never
    assert rows["steps"] == ("8", "8"), rows


def _render(page: Path, out_dir: Path) -> tuple[np.ndarray, dict]:
    """Screenshot of `page` and, from an instrumented copy, its figures' boxes and any page errors."""
    probe = out_dir / f"probe-{page.name}"
    text = page.read_text()
    catch = (
        "<script>window.__errors=[];addEventListener('error',e=>__errors.push(String(e.message||"
        "(e.target&&e.target.src)||'error')),true);console.error=(...a)=>__errors.push(a.join(' '));</script>"
    )
    measure = (
        "<script>addEventListener('load',()=>{const boxes=[...document.querySelectorAll('figure.fig')].map(f=>{"
        "const i=f.querySelector('img'),b=i.getBoundingClientRect();return {id:f.id,x:b.x,y:b.y+scrollY,w:b.width,"
        "h:b.height,loaded:i.complete&&i.naturalWidth>0};});const p=document.createElement('pre');p.id='probe';"
        "p.textContent=JSON.stringify({boxes,errors:__errors,height:document.documentElement.scrollHeight});"
        "document.body.appendChild(p);});</script>"
    )
    probe.write_text(text.replace("<head>", "<head>" + catch, 1).replace("</body>", measure + "</body>"))
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    dom = subprocess.run(
        [*base, "--window-size=1100,900", "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
    )
    found = re.search(r"<pre id=\"probe\">(.*?)</pre>", dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    info = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    shot = out_dir / f"{page.stem}.png"
    subprocess.run(
        [*base, f"--window-size=1100,{info['height']}", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    import matplotlib.image

    return matplotlib.image.imread(shot), info


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
def test_two_run_comparison_renders_in_headless_chromium(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "compare.html"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    page = out.read_text()
    assert "spec diff: base &rarr; hot" in page and "lr: 0.01" in page
    pixels, info = _render(out, tmp_path)
    assert info["errors"] == []
    visible = [b for b in info["boxes"] if b["w"] > 0]
    ids = {b["id"] for b in visible}
    assert {"fig-loss", "fig-throughput", "fig-anatomy", "fig-memory", "fig-load-0-0", "fig-load-1-0"} <= ids
    assert "fig-load-0-1" not in ids  # the layer selector shows one layer per run until another is picked
    for box in visible:
        assert box["loaded"], box
        y0, x0 = int(box["y"]), int(box["x"])
        region = pixels[y0 : y0 + int(box["h"]), x0 : x0 + int(box["w"]), :3]
        assert region.size and region.std() > 0.05, (box, float(region.std()))  # drawn, not blank
    if os.environ.get("SHARDYARD_DOCS_SCREENSHOT"):  # how docs/observing.md's picture is made
        shutil.copyfile(tmp_path / "compare.png", os.environ["SHARDYARD_DOCS_SCREENSHOT"])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
def test_layer_selector_works_without_javascript(runs: tuple[Path, Path], tmp_path: Path) -> None:
    assert main(["report", str(runs[0])]) == 0
    page = (runs[0] / "report.html").read_text()
    picked = page.replace("id='r0l0' checked", "id='r0l0'").replace("id='r0l1'", "id='r0l1' checked")
    out = tmp_path / "picked.html"
    out.write_text(picked)
    _, info = _render(out, tmp_path)
    visible = {b["id"] for b in info["boxes"] if b["w"] > 0}
    assert "fig-load-0-1" in visible and "fig-load-0-0" not in visible


def test_a_path_that_is_not_a_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no metrics.jsonl records" in err and "Traceback" not in err
