"""`shardyard report RUN_DIR`: plots and one HTML page from a run's metrics.jsonl."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

from shardyard.platform.errors import UserError
from shardyard.tracking.logger import METRICS_FILE, read_metrics


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise UserError(f"{run_dir}: no {METRICS_FILE} records (is this a run directory?)")
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    figures: list[tuple[str, str]] = []

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["bpb"] for r in train], label="train")
    if evals:
        ax.errorbar([r["step"] for r in evals], [r["val_bpb"] for r in evals],
                    yerr=[r.get("val_bpb_stderr", 0.0) for r in evals], fmt="o-", capsize=3, label="validation (+- s.e.)")
        for name in sorted({k for r in evals for k in r if k.startswith("val/") and k.endswith("_bpb")}):
            points = [r for r in evals if name in r]
            ax.errorbar([r["step"] for r in points], [r[name] for r in points],
                        yerr=[r.get(f"{name}_stderr", 0.0) for r in points], fmt="s--", capsize=3, label=name)
    ax.set_xlabel("step"), ax.set_ylabel("bits per byte"), ax.legend(), ax.grid(alpha=0.3)
    figures.append(("Loss", _png(fig)))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    ax.set_xlabel("step"), ax.set_ylabel("bytes / s"), ax.grid(alpha=0.3)
    figures.append(("Throughput", _png(fig)))
    plt.close(fig)

    share_keys = sorted({k for r in train for k in r if re.fullmatch(r"moe/layer0/expert\d+_share", k)},
                        key=lambda k: int(re.search(r"expert(\d+)", k).group(1)))
    if share_keys:
        fig, ax = plt.subplots(figsize=(6, 3))
        steps = [r["step"] for r in train]
        ax.stackplot(steps, *[[r.get(k, 0) for r in train] for k in share_keys],
                     labels=[k.split("/")[-1].removesuffix("_share") for k in share_keys])
        ax.set_xlabel("step"), ax.set_ylabel("token share, layer 0"), ax.legend(fontsize=6, ncol=4)
        figures.append(("Expert load (layer 0)", _png(fig)))
        plt.close(fig)

    last = train[-1] if train else {}
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.5g}</td></tr>" for k, v in last.items()
                   if isinstance(v, (int, float)) and not k.startswith("moe/layer"))
    if evals:
        final = evals[-1]
        for key in ["val_bpb", *sorted(k for k in final if k.startswith("val/") and k.endswith("_bpb"))]:
            stderr = final.get(f"{key}_stderr")
            error = f" +- {stderr:.2g}" if isinstance(stderr, float) else ""
            rows += f"<tr><td>{html.escape(key)} (final)</td><td>{final[key]:.5g}{error}</td></tr>"
    spec_file = run_dir / "spec.yaml"
    spec_text = html.escape(spec_file.read_text()) if spec_file.exists() else "(no spec.yaml)"
    body = "".join(f"<h2>{t}</h2><img src='data:image/png;base64,{img}'/>" for t, img in figures)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run_dir.name)}</title></head>"
            f"<body style='font-family:sans-serif;max-width:900px;margin:auto'><h1>Run {html.escape(run_dir.name)}</h1>"
            f"<table border=1 cellpadding=4>{rows}</table>{body}<h2>Spec</h2><pre>{spec_text}</pre></body></html>")
    out = run_dir / "report.html"
    out.write_text(page)
    return out
