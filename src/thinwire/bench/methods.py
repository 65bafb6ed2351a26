"""The methods the benchmark compares: the one method table of :mod:`thinwire.optim.methods`.

Re-exported here so ``thinwire.bench`` keeps its names; the table, its tuned settings and the
factory live in ``thinwire.optim`` (``ddp`` is :class:`thinwire.optim.DataParallel`).
"""

from __future__ import annotations

from thinwire.optim import DEFAULT_METHODS, METHODS, Method, build_optimizer, inner_adamw

__all__ = ["Method", "METHODS", "DEFAULT_METHODS", "build_optimizer", "inner_adamw"]
