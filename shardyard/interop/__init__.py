"""Interop at the edge: Hugging Face conversion as pure functions per model family (families.py),
and HF model directories written and read one tensor at a time (hf_dir.py). Export, import and
upcycling (runtime/) call these; the models know nothing of HF."""

from __future__ import annotations

from shardyard.interop.families import (
    FAMILIES,
    Experts,
    Family,
    Rows,
    Unsupported,
    from_hf,
    hf_config,
    hf_names,
    layouts,
    pick_family,
    problems,
    spec_from_config,
    to_hf,
)

__all__ = [
    "FAMILIES",
    "Experts",
    "Family",
    "Rows",
    "Unsupported",
    "from_hf",
    "hf_config",
    "hf_names",
    "layouts",
    "pick_family",
    "problems",
    "spec_from_config",
    "to_hf",
]
