"""The parallel delta rule (DeltaNet): token-level oracle (`naive`), chunkwise WY kernel
(`chunk`), sequence-sharded driver with "scan" and "pass" schedules (`sharded`), and the
`DeltaNet` layer. See README.md for the math."""

from .api import delta_rule
from .chunk import chunk_delta_rule
from .layer import DeltaNet, ShortConv
from .pieces import deltanet_in_pieces
from .sharded import sharded_delta_rule

__all__ = ["DeltaNet", "ShortConv", "chunk_delta_rule", "deltanet_in_pieces", "delta_rule",
           "sharded_delta_rule"]
