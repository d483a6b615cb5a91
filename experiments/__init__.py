"""Experiments and benchmarks (run as ``python -m experiments.<name>``)."""

import kernels

# Every CLI serves backbone.scan_type='pallas' (and 'auto' on GPU) with the fused kernel;
# the library itself never imports the kernels package.
kernels.register_backends()
