"""The one check `validate`, `run` and `submit` share: load the spec file, apply `--set`, predict a
worker's memory (refused when it exceeds what a worker is given) and, for the commands that show a
summary, gather what the summary says about the job (parameters, FLOPs, the data it will read).

Everything fails here, on the user's machine, before any cluster is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardyard.platform.schema import JobSpec
from shardyard.platform.spec import load_spec

if TYPE_CHECKING:
    from shardyard.runtime.worker_memory import MemoryPrediction


@dataclass(frozen=True)
class JobFacts:
    """What the summary reports beyond the spec's own fields."""

    parameters: int
    active_parameters: int  # per token
    flops_per_token: float  # forward + backward, counted on the meta device
    data_files: int
    corpus_bytes: int  # capped at data.max_bytes


@dataclass(frozen=True)
class Preflight:
    spec: JobSpec
    source: str  # the spec file, as the user named it
    memory: MemoryPrediction
    facts: JobFacts | None  # None when the command shows no summary
    checkpoint_warning: str | None


def preflight(spec_file: str, overrides: list[str], describe: bool = True) -> Preflight:
    """Load and check a job spec. `describe=False` (submit) skips the facts: a submitted job's data
    paths need only exist on the cluster."""
    # torch comes with these; imported here so that `shardyard schema` or `status` do not pay for it
    from shardyard.runtime.preemption import checkpoint_warning
    from shardyard.runtime.worker_memory import check_spec_memory

    spec = load_spec(spec_file, overrides)
    memory = check_spec_memory(spec, spec_file)
    facts = job_facts(spec, spec_file) if describe else None
    return Preflight(spec, spec_file, memory, facts, checkpoint_warning(spec))


def job_facts(spec: JobSpec, source: str) -> JobFacts:
    """Parameters and FLOPs of the spec's model (built on the meta device) and the size of its data;
    SpecError when a data path matches nothing."""
    from shardyard.data.corpus import resolve_files
    from shardyard.data.sources import resolve_units
    from shardyard.data.tokenize import vocab_size_for
    from shardyard.models import count_parameters
    from shardyard.models.flops import training_flops_per_token
    from shardyard.runtime.worker_memory import build_meta_model

    total, active = count_parameters(build_meta_model(spec, source))
    flops = training_flops_per_token(spec.model, spec.data.seq_len, vocab_size_for(spec.data))
    if spec.data.prepared:
        units = resolve_units(spec.data)
        files, corpus_bytes = len(units), sum(u.size for u in units)
    else:
        paths = resolve_files(spec.data)
        files, corpus_bytes = len(paths), sum(f.stat().st_size for f, _ in paths)
    if spec.data.max_bytes is not None:
        corpus_bytes = min(corpus_bytes, spec.data.max_bytes)
    return JobFacts(total, active, flops, files, corpus_bytes)
