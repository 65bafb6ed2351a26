"""State-dict helpers shared by thinwire optimizers.

``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's
dtype (``_process_value_according_to_param_policy``, called as ``Optimizer._...`` so a subclass
cannot override it). thinwire keeps some state wider than the parameter on purpose — float32
θ_g, error-feedback and momentum buffers for bf16 models — so those keys are put back at full
width after the base class has loaded (STYLE.md §3, "Pitfall").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__: list[str] = []


def load_keeping_width(
    opt: torch.optim.Optimizer,
    load: Callable[[dict[str, Any]], None],
    state_dict: dict[str, Any],
    params: list[torch.Tensor],
    keys: Iterable[str],
) -> None:
    """Run the base ``load(state_dict)`` of ``opt``, then restore ``keys`` at their saved dtype.

    ``params`` are in the order the base class numbers them (groups, then params in a group).
    Tensors that existed before the load are updated in place, so objects that hold references
    (an outer optimizer over θ_g) keep seeing them.
    """
    keys = tuple(keys)
    saved = {
        int(i): {k: v for k, v in st.items() if k in keys and isinstance(v, torch.Tensor)}
        for i, st in state_dict["state"].items()
    }
    before = {
        i: {k: opt.state[p][k] for k in keys if k in opt.state.get(p, {})}
        for i, p in enumerate(params)
    }
    load(state_dict)  # replaces opt.state with a new mapping
    for i, p in enumerate(params):
        st = opt.state[p]
        for k, v in saved.get(i, {}).items():
            old = before[i].get(k)
            if old is not None and old.shape == v.shape and old.dtype == v.dtype:
                old.copy_(v)
                st[k] = old
            else:
                st[k] = v.detach().to(device=p.device, copy=True)
