"""thinwire: train one PyTorch model on machines joined by slow, far links.

Subpackages, in layer order (``docs/design.md``, "Layers"): ``thinwire.compression`` and
``thinwire.collectives`` (layer 1), ``thinwire.optim`` (layer 2), ``thinwire.rl`` (layer 3),
``thinwire.bench`` (layer 4).
Importing ``thinwire`` needs only torch, numpy and einops; triton and hivemind load lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
