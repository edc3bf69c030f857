"""Test hooks reach Ray workers: every SHARDYARD_* variable of the driver is forwarded, except the
spec itself (a submitted job carries it explicitly)."""

from __future__ import annotations

import pytest

from shardyard import envvars


def test_forwarded_holds_shardyard_variables_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(envvars.FAULT_STEP, "12")
    monkeypatch.setenv(envvars.FAKE_RANKS_PER_NODE, "2")
    monkeypatch.setenv(envvars.SPEC_JSON, "{}")
    monkeypatch.setenv("NOT_SHARDYARD_X", "1")
    forwarded = envvars.forwarded()
    assert forwarded[envvars.FAULT_STEP] == "12" and forwarded[envvars.FAKE_RANKS_PER_NODE] == "2"
    assert envvars.SPEC_JSON not in forwarded
    assert all(name.startswith(envvars.PREFIX) for name in forwarded)
