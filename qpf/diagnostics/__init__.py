"""Seeing inside a run: the philosophy metrics, model diagnostics and the run report."""
