"""The codec floor: how factors are quantized, held in memory, packed and sized on disk.

Everything that reads or writes factors stands on this package (the methods that fit them, the
store format that writes them, reconstruction that decodes them); it imports nothing of tvbase
above ``errors``.

- :mod:`.quantize`: per-column absmax quantization, :class:`QuantizedMatrix` and its byte payload;
- :mod:`.factors`: :class:`SharedBasis`, :class:`TaskTensor`, :func:`matrix_shape`;
- :mod:`.payload`: the payload array's chunking and compression, the order factors are packed in,
  and the size prediction a byte budget is planned with.
"""

from .factors import SharedBasis, TaskTensor, matrix_shape
from .payload import (
    INDEX_ROW_DISK_BYTES,
    PAYLOAD_CHUNK,
    TASK_METADATA_DISK_BYTES,
    commit_disk_bytes,
    compressed_nbytes,
    packing_order,
    store_disk_bytes,
    zarr_compressors,
)
from .quantize import QUANTIZERS, QuantizedMatrix, dequantize, parse_bits, payload_nbytes, quantize

__all__ = [
    "INDEX_ROW_DISK_BYTES",
    "PAYLOAD_CHUNK",
    "QUANTIZERS",
    "QuantizedMatrix",
    "SharedBasis",
    "TASK_METADATA_DISK_BYTES",
    "TaskTensor",
    "commit_disk_bytes",
    "compressed_nbytes",
    "dequantize",
    "matrix_shape",
    "packing_order",
    "parse_bits",
    "payload_nbytes",
    "quantize",
    "store_disk_bytes",
    "zarr_compressors",
]
