"""Triton kernels and launchers for the compression hot paths.

One module per fused op of :mod:`thinwire.compression.fused`: :mod:`.ef_quantize_pack`,
:mod:`.dct_topk`, :mod:`.decode_accumulate`, plus :mod:`._common` (shared ``@triton.jit``
helpers and launch constants). Nothing here is imported by ``import thinwire``: the dispatch rule
(:mod:`thinwire.compression._dispatch`) imports a launcher on the first call that needs it, so
triton stays optional. Under ``TRITON_INTERPRET=1`` (set before these modules are imported) the
kernels run in Triton's numpy interpreter on CPU tensors.
"""

from __future__ import annotations

__all__: list[str] = []
