"""Experiments and benchmarks (run as ``python -m experiments.<name>``)."""
