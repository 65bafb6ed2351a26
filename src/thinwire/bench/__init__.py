"""The bandwidth benchmark, its built-in model and data, and the codec demo.

``thinwire bench`` (also ``python -m thinwire.bench bench``) trains :class:`TinyGPT` on the
seeded :class:`MarkovLanguage` with every method side by side against plain all-reduce data
parallel, on real gloo processes under a simulated WAN, and reports bytes, loss and simulated
time (definitions in :mod:`thinwire.bench.report`). ``thinwire demo`` prints the codec table.
"""

from __future__ import annotations

from thinwire.bench.harness import BenchConfig, run_bench, run_rank
from thinwire.bench.methods import DEFAULT_METHODS, METHODS, Method, build_optimizer, inner_adamw
from thinwire.bench.tiny import ByteCorpus, MarkovLanguage, TinyConfig, TinyGPT, param_hash

__all__ = [
    "BenchConfig",
    "ByteCorpus",
    "DEFAULT_METHODS",
    "METHODS",
    "MarkovLanguage",
    "Method",
    "TinyConfig",
    "TinyGPT",
    "build_optimizer",
    "inner_adamw",
    "param_hash",
    "run_bench",
    "run_rank",
]
