"""Tensor-level storage: encodings of sparse tensors and safetensors files with a JSON header.

``encodings`` is pure tensor math (dense, bitmask, csr, packed N:M); ``io`` writes and reads
one safetensors file holding many encoded tensors, atomically and with per-tensor checksums.
"""

from sparsecraft.formats.encodings import (
    COMMON_NM,
    ENCODINGS,
    choose_encoding,
    decode,
    encode,
    encoded_nbytes,
    is_nm,
    tensor_stats,
    theoretical_nbytes,
)
from sparsecraft.formats.io import (
    FORMAT_VERSION,
    claims_sparsecraft,
    describe,
    read_header,
    read_tensors,
    write_tensors,
)

__all__ = [
    "COMMON_NM",
    "ENCODINGS",
    "FORMAT_VERSION",
    "choose_encoding",
    "claims_sparsecraft",
    "decode",
    "describe",
    "encode",
    "encoded_nbytes",
    "is_nm",
    "read_header",
    "read_tensors",
    "tensor_stats",
    "theoretical_nbytes",
    "write_tensors",
]
