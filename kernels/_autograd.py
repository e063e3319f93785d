"""Double backward for the Triton ops: their backward kernels are not themselves differentiable,
so under ``create_graph=True`` (gradient penalties, Hessian-vector products) the gradients are
recomputed through the op's torch reference on the saved inputs, which autograd can differentiate
again. First-order backward never takes this path."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def reference_grads(reference: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None],
                    needs: Sequence[bool], grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """d reference(*inputs) / d inputs under ``grad_out``, with a graph (None where not needed)."""
    with torch.enable_grad():
        out = reference(*inputs)
    wanted = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)
