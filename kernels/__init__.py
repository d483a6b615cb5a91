"""Hand-written kernels for qpf's hot loops.

``oscillatory_scan`` holds the fused Pallas kernel of the v4 SSM recurrence (gate, damping,
Cayley rotation and the complex linear recurrence in one pass, forward and backward);
``reference`` holds the plain ``lax.scan`` form of the same op that the kernel is tested
against. Importing this package registers the kernel as qpf's ``pallas`` scan backend.
"""

from kernels.oscillatory_scan import oscillatory_scan_pallas
from kernels.reference import oscillatory_scan_reference
from qpf.ops.scan import register_scan_backend


def register_backends() -> None:
    """Register the kernels with qpf's scan dispatcher (``scan_type='pallas'``, and 'auto'
    on GPU). The one link between the packages: qpf itself never imports ``kernels``."""
    register_scan_backend("pallas", oscillatory_scan_pallas)


register_backends()

__all__ = ["oscillatory_scan_pallas", "oscillatory_scan_reference", "register_backends"]
