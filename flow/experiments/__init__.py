"""Experiments on a feature cache: fit detectors per normal class, score the test split, sweeps, metrics, reports."""
