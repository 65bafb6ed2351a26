"""The update rules of thinwire's optimizers as free functions over lists of tensors.

The functional half of the torch.optim split (as ``torch.optim.adamw.adamw`` is to
``torch.optim.AdamW``): the optimizer classes own state, schedule and communication, and call
these functions for the math, so a float64 oracle can test the math on its own.

* :func:`diloco_outer_step` — DiLoCo's outer step, SGD with (Nesterov) momentum on the global copy
  θ_g (Douillard et al., arXiv:2311.08105v3, Algorithm 1, OuterOpt; Nesterov momentum as
  ``torch.optim.SGD`` defines it, Sutskever et al. 2013);
* :func:`demo_update` — DeMo's parameter update, a signed step along the aggregated fast
  components (Peng et al., arXiv:2411.19870v1, Algorithm 1, last line, with the sign of the
  released implementation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["demo_update", "diloco_outer_step"]


def _same_length(**lists: Sequence[object]) -> None:
    sizes = {name: len(ts) for name, ts in lists.items()}
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"tensor lists must have the same length, got {shown}")


def diloco_outer_step(
    anchors: list[torch.Tensor],
    pseudo_grads: Sequence[torch.Tensor],
    momentum_bufs: list[torch.Tensor | None],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
) -> None:
    r"""DiLoCo's outer SGD step with momentum, in place over ``anchors`` and ``momentum_bufs``.

    For each global copy ``θ`` and its averaged pseudo-gradient ``Δ̄`` (``θ_g − θ_i`` averaged
    over workers, arXiv:2311.08105v3, Algorithm 1):

    .. code-block:: text

        b  ← Δ̄                      first step (momentum_bufs[i] is None)
        b  ← μ b + Δ̄                later steps
        d  = Δ̄ + μ b  if nesterov  else  b
        θ  ← θ − lr d

    This is ``torch.optim.SGD`` with ``dampening=0``, ``weight_decay=0`` and the same tensor
    operations, so it equals that optimizer's single-tensor step bit for bit. With ``momentum``
    0 no buffer is created or read (``d = Δ̄``), as in ``torch.optim.SGD``.

    Args:
        anchors: the global copies θ_g, updated in place.
        pseudo_grads: the averaged pseudo-gradients Δ̄, one per anchor (not modified).
        momentum_bufs: one buffer per anchor, updated in place; a ``None`` entry is replaced by a
            new buffer (a copy of its Δ̄), so read the list back into your state afterwards.
        lr: outer learning rate.
        momentum: momentum μ.
        nesterov: use Nesterov momentum.

    Raises:
        ValueError: the three lists differ in length.
    """
    _same_length(anchors=anchors, pseudo_grads=pseudo_grads, momentum_bufs=momentum_bufs)
    for i, (theta, grad) in enumerate(zip(anchors, pseudo_grads, strict=True)):
        if momentum != 0:
            buf = momentum_bufs[i]
            if buf is None:
                buf = torch.clone(grad).detach()
                momentum_bufs[i] = buf
            else:
                buf.mul_(momentum).add_(grad)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        theta.add_(grad, alpha=-lr)


def demo_update(
    params: Sequence[torch.Tensor], aggregates: Sequence[torch.Tensor], *, lr: float
) -> None:
    r"""DeMo's parameter update ``p ← p − lr · sign(U)``, in place over ``params``.

    ``U`` is the workers' aggregate of the fast momentum components (arXiv:2411.19870v1,
    Algorithm 1, last line ``x ← x − η Q``, with ``Q`` replaced by its sign as the released
    implementation ``bloc97/DeMo`` does). The sign is taken in ``U``'s dtype and cast to the
    parameter's; a zero coordinate of ``U`` leaves the parameter coordinate unchanged. Decoupled
    weight decay is applied by the optimizer before this step.

    Args:
        params: parameters, updated in place.
        aggregates: one aggregate per parameter, same shape (not modified).
        lr: learning rate η.

    Raises:
        ValueError: the two lists differ in length.
    """
    _same_length(params=params, aggregates=aggregates)
    for p, u in zip(params, aggregates, strict=True):
        p.add_(torch.sign(u).to(p.dtype), alpha=-lr)
