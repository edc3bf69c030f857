"""Benchmark scripts (run them as scripts); a package so that tests import their helpers by name."""
