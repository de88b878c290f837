"""Pure tensor codecs, bit packing and error feedback (no I/O, no transport).

`registry.build(codec, **params)` makes a compressor, `registry.decode(payload)` decodes any payload,
`error_feedback.ErrorFeedback` / `Mirror` wrap a compressor with EF14, EF21 or EControl.
"""

from compression.base import Compressor, SparseCompressor
from compression.error_feedback import ErrorFeedback, Mirror
from compression.payload import Payload, PayloadError
from compression.registry import build, decode, sparse_view, validate

__all__ = [
    "Compressor",
    "ErrorFeedback",
    "Mirror",
    "Payload",
    "PayloadError",
    "SparseCompressor",
    "build",
    "decode",
    "sparse_view",
    "validate",
]
