"""Hand-written kernels for qpf's hot loops.

``oscillatory_scan`` holds the fused Pallas kernel of the v4 SSM recurrence (gate, damping,
Cayley rotation and the complex linear recurrence in one pass, forward and backward);
``reference`` holds the plain ``lax.scan`` form of the same op that the kernel is tested
against.
"""

from kernels.oscillatory_scan import oscillatory_scan_pallas
from kernels.reference import oscillatory_scan_reference

__all__ = ["oscillatory_scan_pallas", "oscillatory_scan_reference"]
