"""Names shared by everything that shards arrays: the trainer's mesh and the kernels.

Kept in ``qpf.ops`` (the bottom layer) so that ``kernels`` can wrap its ``pallas_call`` in a
``shard_map`` over the batch axis without importing the trainer.
"""

from __future__ import annotations

DATA_AXIS = "data"  # the mesh axis over which batch rows are split (data parallelism)
