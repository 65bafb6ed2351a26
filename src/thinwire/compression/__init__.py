"""Compression toolkit: one implementation of every piece that crosses the wire.

Every thinwire optimizer is "transform -> select -> quantize -> pack -> send -> unpack ->
aggregate"; this package holds each step once (``docs/design.md``, "Wire format", describes the
bytes):

* geometry and transform: :class:`ChunkGeometry` / :func:`split`, the orthonormal DCT
  (:func:`dct_basis`, :func:`dct_tiles`, :func:`idct_tiles`);
* selection: :func:`topk_chunks` (ties go to the lower index), :func:`scatter_chunks`;
* quantizers: int8 / int4 absmax, SparseLoCo's 2-bit centroids, sign, fp8, FP4 E3M0, fp16/bf16;
* packing: :func:`pack_bits`, :func:`pack_uint`, index coders (fixed width and Elias-Fano);
* error feedback: :class:`ErrorFeedback`;
* wire format: :class:`DenseCodec`, :class:`SparseCodec`, :func:`build_codec`, :class:`PayloadError`;
* buckets: :class:`DenseBucket` / :class:`SparseBucket` frame many tensors as one payload on their
  own device, closed by the 4-byte :class:`Envelope`: a CRC32 keyed with the wire version, the
  codec settings and shapes and the contribution flag (:func:`crc32` computes it on device);
* fused hot paths with Triton kernels (``_triton/``) behind one dispatch rule: :func:`dct_topk`,
  :func:`ef_quantize_pack`, :func:`decode_accumulate` (each with its torch reference);
* aggregation: :func:`aggregate_sparse` (deterministic, bit-identical on every rank) and the
  robust rules of :func:`robust_mean` (norm clipping, trimmed mean, median).
"""

from __future__ import annotations

from thinwire.compression.aggregate import AGGREGATE_MODES, SparseMessage, aggregate_sparse, densify
from thinwire.compression.base import Codec
from thinwire.compression.bitpack import (
    pack12_pairs,
    pack_bits,
    pack_uint,
    packed_nbytes,
    uint_nbytes,
    unpack12_pairs,
    unpack_bits,
    unpack_uint,
)
from thinwire.compression.bucket import DenseBucket, SparseBucket, SparsePart, make_bucket
from thinwire.compression.bundle import bundle_nbytes, pack_bundle, unpack_bundle
from thinwire.compression.chunk import ChunkGeometry, split
from thinwire.compression.crc import crc32, crc32_rows
from thinwire.compression.dct import dct_basis, dct_chunks, dct_tiles, idct_chunks, idct_tiles
from thinwire.compression.error_feedback import (
    ErrorFeedback,
    error_feedback_subtract,
    error_feedback_update,
)
from thinwire.compression.fused import (
    EF_FORMAT_BITS,
    EF_FORMATS,
    dct_topk,
    decode_accumulate,
    ef_quantize_pack,
)
from thinwire.compression.index_coding import (
    INDEX_CODERS,
    EliasFanoIndexCoder,
    FixedIndexCoder,
    IndexCodingError,
    log2_binom,
)
from thinwire.compression.payload import PayloadError
from thinwire.compression.pipeline import (
    VALUE_FORMATS,
    DenseCodec,
    SparseCodec,
    SparseEncoding,
    ValueFormat,
    build_codec,
)
from thinwire.compression.quant import (
    QUANTIZERS,
    QuantResult,
    code_bits,
    dequantize_2bit_centroid,
    dequantize_cast,
    dequantize_fp4_e3m0,
    dequantize_fp8,
    dequantize_int4,
    dequantize_int8,
    dequantize_sign,
    quantize_2bit_centroid,
    quantize_cast,
    quantize_fp4_e3m0,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    quantize_sign,
    side_len,
)
from thinwire.compression.robust import ROBUST_RULES, clip_scales, clip_to_norm, robust_mean
from thinwire.compression.topk import k_for_chunk, scatter_chunks, topk_chunks
from thinwire.compression.wire import (
    ENVELOPE_BYTES,
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_REASONS,
    WIRE_VERSION,
    Envelope,
    layout_digest,
)

__all__ = [
    "AGGREGATE_MODES",
    "DenseBucket",
    "ENVELOPE_BYTES",
    "Envelope",
    "SparseBucket",
    "SparsePart",
    "STATUS_EMPTY",
    "STATUS_OK",
    "STATUS_REASONS",
    "WIRE_VERSION",
    "crc32",
    "crc32_rows",
    "layout_digest",
    "make_bucket",
    "ChunkGeometry",
    "EF_FORMATS",
    "EF_FORMAT_BITS",
    "Codec",
    "DenseCodec",
    "EliasFanoIndexCoder",
    "ErrorFeedback",
    "FixedIndexCoder",
    "INDEX_CODERS",
    "IndexCodingError",
    "PayloadError",
    "QUANTIZERS",
    "QuantResult",
    "ROBUST_RULES",
    "SparseCodec",
    "SparseEncoding",
    "SparseMessage",
    "VALUE_FORMATS",
    "ValueFormat",
    "aggregate_sparse",
    "build_codec",
    "bundle_nbytes",
    "pack_bundle",
    "unpack_bundle",
    "clip_scales",
    "clip_to_norm",
    "code_bits",
    "dct_basis",
    "dct_chunks",
    "dct_topk",
    "decode_accumulate",
    "dct_tiles",
    "densify",
    "ef_quantize_pack",
    "dequantize_2bit_centroid",
    "dequantize_cast",
    "dequantize_fp4_e3m0",
    "dequantize_fp8",
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_sign",
    "error_feedback_subtract",
    "error_feedback_update",
    "idct_chunks",
    "idct_tiles",
    "k_for_chunk",
    "log2_binom",
    "pack12_pairs",
    "pack_bits",
    "pack_uint",
    "packed_nbytes",
    "quantize_2bit_centroid",
    "quantize_cast",
    "quantize_fp4_e3m0",
    "quantize_fp8",
    "quantize_int4",
    "quantize_int8",
    "quantize_sign",
    "robust_mean",
    "scatter_chunks",
    "side_len",
    "split",
    "topk_chunks",
    "uint_nbytes",
    "unpack12_pairs",
    "unpack_bits",
    "unpack_uint",
]
