"""The codec floor: how factors are quantized, held in memory, packed and sized on disk.

Everything that reads or writes factors stands on this package (the methods that fit them, the
store format that writes them, reconstruction that decodes them); it imports nothing of tvbase
above ``errors``.

- :mod:`.bits`: bit widths and exact payload sizes (no torch);
- :mod:`.quantize`: per-column absmax quantization, :class:`QuantizedMatrix` and its byte payload;
- :mod:`.factors`: :class:`SharedBasis`, :class:`TaskTensor`, :func:`matrix_shape`;
- :mod:`.payload`: the payload array's chunking and compression, the order factors are packed in,
  and the size prediction a byte budget is planned with.
"""

import importlib

# name -> submodule; imported on first use, so that what needs no torch (bits, factors,
# payload) does not load it through this package
_EXPORTS = {
    "INDEX_ROW_DISK_BYTES": "payload", "PAYLOAD_CHUNK": "payload", "TASK_METADATA_DISK_BYTES": "payload",
    "commit_disk_bytes": "payload", "compressed_nbytes": "payload", "packing_order": "payload",
    "raw_bytes": "payload", "store_disk_bytes": "payload", "zarr_compressors": "payload",
    "QUANTIZERS": "bits", "parse_bits": "bits", "payload_nbytes": "bits",
    "SharedBasis": "factors", "TaskTensor": "factors", "matrix_shape": "factors",
}  # fmt: skip
# Quantization itself (QuantizedMatrix, quantize, dequantize) needs torch: import it from
# .quantize, whose name a package attribute could not share with its function.

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
