"""Test-suite set-up shared by every test file.

* ``TRITON_INTERPRET=1`` is set before anything imports thinwire whenever CUDA is absent:
  ``@triton.jit`` decides at decoration time whether to interpret.
* A hypothesis ``ci`` profile: no deadline (the CPU is shared), derandomized, modest examples.
* Under ``CI=true`` a skipped test that is not marked ``gpu`` fails the run: only missing hardware
  justifies a skip.
"""

from __future__ import annotations

import os

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and "gpu" not in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"test {item.nodeid} was skipped under CI=true without the gpu marker"
