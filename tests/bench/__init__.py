"""Smoke tests of the benchmark harness (bench/): a tiny corpus against the embedded system only."""
