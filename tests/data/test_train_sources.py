"""Tiny training jobs (one process, no Ray) on each kind of source and on BPE tokens."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from shardyard.platform.spec import load_spec_text
from shardyard.runtime.worker import LocalReporter, Trainer
from shardyard.tracking.logger import read_metrics
from tests.data.test_prepare import documents, write_hf, write_jsonl, write_parquet
from tests.helpers import tiny_spec_yaml

MODEL = "{kind: moe, width: 32, depth: 2, heads: 2, ffn: {hidden: 64}, moe: {num_experts: 4, top_k: 2}}"


def train_tiny(tmp_path: Path, data: str) -> list[dict]:
    spec = load_spec_text(
        tiny_spec_yaml(
            "src",
            tmp_path,
            model=MODEL,
            data=data,
            resources="{workers: 1, cpus_per_worker: 1, max_failures: 0}",
            training="{steps: 4, batch_size: 4, eval_every: 4, eval_bytes: 1024, log_every: 2}",
            optim="{lr: 3.0e-3, schedule: {warmup: 1}}",
        )
    )
    run_dir = tmp_path / "run"
    Trainer(spec, run_dir, LocalReporter(run_dir, 1)).fit()
    return read_metrics(run_dir)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf", "bpe", "mixture"])
def test_tiny_job_trains_on_each_source(tmp_path: Path, fmt: str) -> None:
    docs = documents(80)
    prep = tmp_path / "prep"
    if fmt in ("jsonl", "bpe"):
        sources = f"[{{path: {write_jsonl(tmp_path / 'c.jsonl', docs)}}}]"
    elif fmt == "parquet":
        sources = f"[{{path: {write_parquet(tmp_path / 'c.parquet', docs)}, text_field: body}}]"
    elif fmt == "hf":
        sources = f"[{{path: {write_hf(tmp_path / 'saved', docs)}}}]"
    else:
        sources = (
            f"[{{path: {write_jsonl(tmp_path / 'a.jsonl', docs[:40])}, weight: 3}}, "
            f"{{path: {write_parquet(tmp_path / 'b.parquet', docs[40:])}, text_field: body, weight: 1}}]"
        )
    tokenizer = "'bpe:300'" if fmt == "bpe" else "bytes"
    records = train_tiny(tmp_path, f"{{sources: {sources}, tokenizer: {tokenizer}, seq_len: 32, prepared_dir: {prep}}}")
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in train] == [2, 4] and all(math.isfinite(r["loss"]) for r in train)
    assert evals and 0 < evals[-1]["val_bpb"] < 12
    ratio = train[-1]["bytes_per_s"] / train[-1]["tokens_per_s"]
    assert ratio > 1.5 if fmt == "bpe" else ratio == pytest.approx(1.0)
