"""`shardyard report RUN [RUN ...]`: one self-contained HTML page about one run, or comparing several.

It reads only run directories (metrics.jsonl, expert_load.bin, run_info.json, spec.yaml), so it
works with wandb disabled and on a run still in progress or cut short by a crash. Figures are PNGs
inlined as data URIs (matplotlib, Agg): the page needs no network and no JavaScript. The expert
load heatmaps have one panel per layer and a layer selector made of radio buttons and CSS.

Figures: bits per byte (train and held-out, runs overlaid), throughput and MFU, step anatomy
(stacked per-step time), memory, expert load (layer x expert x step), all-to-all traffic; then the
final figures, the spec, and a spec diff when comparing. Restarts (resume events) are dashed
vertical lines on every curve over steps; a restart at another worker count (an elastic resize) is
a dotted line labelled with the worker counts.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import RunDir
from shardyard.tracking.anatomy import BETWEEN_STEPS, STEP_PARTS
from shardyard.tracking.expert_load import read_expert_load
from shardyard.tracking.logger import read_events, read_metrics

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
ANATOMY = [*STEP_PARTS, "other", *BETWEEN_STEPS]


@dataclass
class Run:
    name: str
    directory: Path
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    restarts: list[int]
    resizes: list[tuple[int, int, int]]  # (step, workers before, workers after) of each resize
    spec_text: str
    info: dict[str, Any] = field(default_factory=dict)
    expert_load: tuple[np.ndarray, list[np.ndarray]] | None = None

    def series(self, key: str, records: list[dict[str, Any]] | None = None) -> tuple[list[int], list[float]]:
        rows = [r for r in (self.train if records is None else records) if isinstance(r.get(key), (int, float))]
        return [r["step"] for r in rows], [float(r[key]) for r in rows]


def load_run(directory: Path) -> Run:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory (give a run directory, e.g. runs/<job name>)")
    records = read_metrics(directory)
    if not records:
        raise UserError(f"{directory}: no {RunDir(directory).metrics.name} records (is this a run directory?)")
    spec_file = RunDir(directory).spec_file
    info_file = RunDir(directory).run_info
    try:
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
    except ValueError:
        info = {}
    try:
        load = read_expert_load(directory)
    except (OSError, ValueError, KeyError):
        load = None
    return Run(
        name=directory.name,
        directory=directory,
        train=[r for r in records if r.get("kind") == "train"],
        evals=[r for r in records if r.get("kind") == "eval"],
        restarts=[int(e["step"]) for e in read_events(directory) if e.get("event") == "resume"],
        resizes=resizes(read_events(directory)),
        spec_text=spec_file.read_text(errors="replace") if spec_file.exists() else "(no spec.yaml)\n",
        info=info,
        expert_load=load,
    )


# ----------------------------------------------------------------------------------------- figures
def _png(fig) -> str:
    """The figure as base64 PNG; closes it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def resizes(events: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """(step, workers before, workers after) for each resume at another world size than the attempt before."""
    out: list[tuple[int, int, int]] = []
    world = None
    for event in events:
        if event.get("event") == "resume" and world is not None and event.get("world") != world:
            out.append((int(event["step"]), int(world), int(event["world"])))
        world = event.get("world", world)
    return out


def _mark_restarts(ax, runs: list[Run]) -> None:
    for i, run in enumerate(runs):
        colour = COLOURS[i % len(COLOURS)]
        resized = {step for step, _, _ in run.resizes}
        for step in run.restarts:
            if step not in resized:
                ax.axvline(step, color=colour, linestyle="--", linewidth=1, alpha=0.7)
        for step, before, after in run.resizes:
            ax.axvline(step, color=colour, linestyle=":", linewidth=1.5, alpha=0.9)
            ax.annotate(
                f"{before}->{after}",
                (step, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                color=colour,
                ha="left",
                va="top",
            )


def _finish(ax, runs: list[Run], ylabel: str) -> None:
    _mark_restarts(ax, runs)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _loss_figure(plt, runs: list[Run]) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, run in enumerate(runs):
        colour = COLOURS[i % len(COLOURS)]
        ax.plot(*run.series("bpb"), color=colour, alpha=0.6, label=f"{run.name} train")
        steps, values = run.series("val_bpb", run.evals)
        if steps:
            errors = [float(r.get("val_bpb_stderr", 0.0)) for r in run.evals if "val_bpb" in r]
            ax.errorbar(steps, values, yerr=errors, fmt="o-", color=colour, capsize=3, label=f"{run.name} held-out")
        for name in sorted({k for r in run.evals for k in r if k.startswith("val/") and k.endswith("_bpb")}):
            ax.plot(*run.series(name, run.evals), "s:", color=colour, label=f"{run.name} {name[4:]}")
    _finish(ax, runs, "bits per byte")
    return _png(fig)


def _throughput_figure(plt, runs: list[Run]) -> str:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.6), sharex=True)
    for i, run in enumerate(runs):
        top.plot(*run.series("tokens_per_s"), color=COLOURS[i % len(COLOURS)], label=run.name)
        steps, mfu = run.series("mfu")
        bottom.plot(steps, [100 * m for m in mfu], color=COLOURS[i % len(COLOURS)], label=run.name)
    top.set_ylabel("tokens / s (all workers)")
    top.grid(alpha=0.3)
    _mark_restarts(top, runs)
    _finish(bottom, runs, "MFU (%)")
    return _png(fig)


def _anatomy_figure(plt, runs: list[Run]) -> str | None:
    timed = [run for run in runs if any("time/step_ms" in r for r in run.train)]
    if not timed:
        return None
    fig, axes = plt.subplots(len(timed), 1, figsize=(7, 2.8 * len(timed)), squeeze=False, constrained_layout=True)
    for ax, run in zip(axes[:, 0], timed):
        rows = [r for r in run.train if "time/step_ms" in r]
        steps = [r["step"] for r in rows]
        layers = [[float(r.get(f"time/{part}_ms", 0.0)) for r in rows] for part in ANATOMY]
        ax.stackplot(steps, *layers, labels=ANATOMY, alpha=0.85)
        if any(r.get("time/a2a_ms", 0.0) > 0 for r in rows):
            ax.plot(
                steps,
                [float(r.get("time/a2a_ms", 0.0)) for r in rows],
                "k--",
                linewidth=1,
                label="all-to-all (inside forward + backward)",
            )
        ax.set_title(run.name, fontsize=9)
        _finish(ax, [run], "ms per step (mean over ranks)")
        ax.legend(fontsize=6, ncol=4, loc="upper left")
    return _png(fig)


def _memory_figure(plt, runs: list[Run]) -> str | None:
    if not any(any(k.startswith("mem/") for k in r) for run in runs for r in run.train):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, run in enumerate(runs):
        colour = COLOURS[i % len(COLOURS)]
        keys = sorted({k for r in run.train for k in r if k.startswith("mem/peak_") and k.endswith("_max")})
        for key, style in zip(keys, ["-", "-.", ":"]):
            ax.plot(*run.series(key), style, color=colour, label=f"{run.name} {key[4:]}")
        steps, predicted = run.series("mem/predicted_state_gib")
        if steps:
            ax.plot(steps, predicted, "--", color=colour, alpha=0.5, label=f"{run.name} predicted state")
    _finish(ax, runs, "GiB per worker")
    return _png(fig)


def _comm_figure(plt, runs: list[Run]) -> str | None:
    if not any("comm/bytes_sent" in r for run in runs for r in run.train):
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.6), sharex=True)
    for i, run in enumerate(runs):
        colour = COLOURS[i % len(COLOURS)]
        top.plot(*run.series("comm/bytes_sent"), color=colour, label=f"{run.name} sent")
        top.plot(*run.series("comm/bytes_remote"), "--", color=colour, label=f"{run.name} off-node")
        bottom.plot(*run.series("comm/a2a_ms"), color=colour, label=run.name)
    top.set_ylabel("all-to-all bytes / step")
    top.grid(alpha=0.3)
    top.legend(fontsize=7)
    _mark_restarts(top, runs)
    _finish(bottom, runs, "all-to-all ms / step")
    return _png(fig)


def _heatmap(plt, run: Run, layer: int) -> str:
    assert run.expert_load is not None
    steps, per_layer = run.expert_load
    counts = per_layer[layer]
    totals = counts.sum(axis=1, keepdims=True)
    util = np.divide(counts * counts.shape[1], totals, out=np.zeros_like(counts), where=totals > 0)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    image = ax.imshow(
        util.T,
        aspect="auto",
        origin="lower",
        cmap="viridis",
        vmin=0.0,
        vmax=2.0,
        interpolation="nearest",
        extent=(float(steps[0]) - 0.5, float(steps[-1]) + 0.5, -0.5, counts.shape[1] - 0.5),
    )
    fig.colorbar(image, ax=ax, label="load / fair share")
    for step in run.restarts:
        ax.axvline(step, color="white", linestyle="--", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("expert")
    ax.set_title(f"{run.name}: layer {layer}", fontsize=9)
    return _png(fig)


# ------------------------------------------------------------------------------------------- page
CSS = """
body{font-family:sans-serif;max-width:980px;margin:auto;padding:0 12px;color:#222}
figure{margin:10px 0 22px 0} figure img{max-width:100%;display:block}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto}
.layers input{display:none} .layers label{display:inline-block;padding:2px 8px;margin:2px;border:1px solid #999;cursor:pointer}
.layers .panel{display:none}
.diff .add{background:#e6ffed} .diff .del{background:#ffeef0}
"""


def _figure(fig_id: str, title: str, png: str, caption: str = "") -> str:
    return (
        f"<figure class='fig' id='{fig_id}'><h2>{html.escape(title)}</h2>"
        f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'/>"
        + (f"<figcaption>{html.escape(caption)}</figcaption>" if caption else "")
        + "</figure>"
    )


def _layer_selector(plt, run: Run, index: int) -> str:
    """Radio buttons + CSS: label i checks radio i, whose sibling panel i becomes visible."""
    assert run.expert_load is not None
    layers = len(run.expert_load[1])
    group = f"r{index}"
    radios = "".join(
        f"<input type='radio' name='{group}' id='{group}l{i}'{' checked' if i == 0 else ''}/>" for i in range(layers)
    )
    labels = "".join(f"<label for='{group}l{i}'>layer {i}</label>" for i in range(layers))
    panels = "".join(
        f"<div class='panel p{i}'>{_figure(f'fig-load-{index}-{i}', f'Expert load, {run.name}, layer {i}', _heatmap(plt, run, i))}</div>"
        for i in range(layers)
    )
    rules = "".join(f"#{group}l{i}:checked~.panels .p{i}{{display:block}}" for i in range(layers))
    return (
        f"<style>{rules}</style><div class='layers'>{radios}<div>{labels}</div><div class='panels'>{panels}</div></div>"
    )


def _summary_table(runs: list[Run]) -> str:
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(r.name)}</th>" for r in runs) + "</tr>"

    def row(label: str, values: list[str]) -> str:
        return (
            f"<tr><td style='text-align:left'>{html.escape(label)}</td>"
            + "".join(f"<td>{v}</td>" for v in values)
            + "</tr>"
        )

    def last(run: Run, key: str, records: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        return next((r for r in reversed(run.train if records is None else records) if key in r), None)

    rows = [row("steps", [str(r.train[-1]["step"]) if r.train else "-" for r in runs])]
    for label, key, fmt in [
        ("train bits/byte", "bpb", "{:.4f}"),
        ("tokens / s", "tokens_per_s", "{:.0f}"),
        ("MFU", "mfu", "{:.2%}"),
        ("step ms", "time/step_ms", "{:.1f}"),
        ("peak RSS GiB (max rank)", "mem/peak_rss_gib_max", "{:.2f}"),
    ]:
        rows.append(row(label, [fmt.format(rec[key]) if (rec := last(r, key)) else "-" for r in runs]))
    values = []
    for r in runs:
        rec = last(r, "val_bpb", r.evals)
        values.append(f"{rec['val_bpb']:.4f} &plusmn; {rec.get('val_bpb_stderr', 0.0):.4f}" if rec else "-")
    rows.append(row("held-out bits/byte (final)", values))
    rows.append(row("restarts", [str(len(r.restarts)) for r in runs]))
    rows.append(
        row("FLOPs / token", [f"{r.info['flops_per_token']:.3g}" if "flops_per_token" in r.info else "-" for r in runs])
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _spec_section(runs: list[Run]) -> str:
    out = "".join(f"<h3>{html.escape(r.name)}</h3><pre>{html.escape(r.spec_text)}</pre>" for r in runs[:1])
    for other in runs[1:]:
        diff = difflib.unified_diff(
            runs[0].spec_text.splitlines(), other.spec_text.splitlines(), runs[0].name, other.name, lineterm="", n=1
        )
        lines = []
        for line in diff:
            cls = (
                "add"
                if line.startswith("+") and not line.startswith("+++")
                else "del"
                if line.startswith("-") and not line.startswith("---")
                else ""
            )
            lines.append(f"<span class='{cls}'>{html.escape(line)}</span>")
        body = "\n".join(lines) or "(identical specs)"
        out += f"<h3>spec diff: {html.escape(runs[0].name)} &rarr; {html.escape(other.name)}</h3><pre class='diff'>{body}</pre>"
    return out


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write the page; returns its path (default: <run>/report.html, or ./report-<a>-vs-<b>.html)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(Path(d)) for d in run_dirs]
    if out is None:
        out = (
            RunDir(runs[0].directory).report
            if len(runs) == 1
            else Path.cwd() / f"report-{'-vs-'.join(r.name for r in runs)}.html"
        )
    sections = [
        _figure(
            "fig-loss",
            "Bits per byte",
            _loss_figure(plt, runs),
            "train (line) and held-out (points, +- standard error); dashed verticals: restarts, dotted: "
            "resizes (workers before->after)",
        ),
        _figure(
            "fig-throughput",
            "Throughput and MFU",
            _throughput_figure(plt, runs),
            "MFU = FLOPs per token x tokens/s / (workers x peak FLOP/s of a worker)",
        ),
    ]
    for fig_id, title, png, caption in [
        (
            "fig-anatomy",
            "Step anatomy",
            _anatomy_figure(plt, runs),
            "where a training step's time goes; eval and checkpoint amortised over the steps between logs",
        ),
        (
            "fig-memory",
            "Memory",
            _memory_figure(plt, runs),
            "peak per worker (max over ranks) against the predicted training state",
        ),
        (
            "fig-comm",
            "All-to-all",
            _comm_figure(plt, runs),
            "expert dispatch and combine, per optimizer step (this rank)",
        ),
    ]:
        if png is not None:
            sections.append(_figure(fig_id, title, png, caption))
    for index, run in enumerate(runs):
        if run.expert_load is not None:
            sections.append(
                f"<h2>Expert load: {html.escape(run.name)}</h2>"
                "<p>Tokens each expert received over each logging window / its fair share "
                "(1 = balanced, 0 = dead); pick a layer:</p>" + _layer_selector(plt, run, index)
            )
    title = " vs ".join(r.name for r in runs)
    page = (
        f"<!doctype html><html><head><meta "
        f"charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head>"
        f"<body><h1>{'Run' if len(runs) == 1 else 'Runs'} {html.escape(title)}</h1>"
        f"{_summary_table(runs)}{''.join(sections)}<h2>Spec</h2>{_spec_section(runs)}</body></html>"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out
