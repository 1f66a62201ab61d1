"""Layer-wise reconstruction: refit the weights a block mask keeps so that each pruned layer still computes what
its dense weight computed on calibration data (the idea of OBC / SparseGPT, here exact for a fixed block mask).

For one linear with dense weight ``W`` ``(N, K)``, calibration inputs ``X`` ``(T, K)`` and a block mask, the kept
weights of each block row ``r`` (output rows ``R``, kept input columns ``S``) solve the damped least squares

    min_w ||X_S w - X W_Rᵀ||² + λ ||w||²   ⇒   w = (G_SS + λI)⁻¹ (G W_Rᵀ)_S,   G = XᵀX,

so one ``K × K`` Gram matrix per layer serves every block row. Layers are refit in model order, each on the inputs
that the already-refit layers before it produce, so later layers correct the error of earlier ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from sparseblocks.masks import expand_block_mask


def fit_block_rows(
    gram: torch.Tensor, weight: torch.Tensor, block_mask: torch.Tensor, block: tuple[int, int], damping: float
) -> torch.Tensor:
    """The refit weight ``(N, K)``, zero outside ``block_mask``.

    gram: ``XᵀX`` ``(K, K)`` of the calibration inputs; weight: the dense ``(N, K)``; block_mask: bool
    ``(ceil(N/bn), ceil(K/bk))``; damping: λ as a fraction of the mean diagonal of each block row's ``G_SS``
    (keeps the solve well-posed where calibration features are rare or dead). Solved in float64.
    """
    gram, weight = gram.double(), weight.double()
    n, k = weight.shape
    bn, bk = block
    targets = gram @ weight.T  # (K, N): the right-hand sides of every row at once
    fitted = torch.zeros_like(weight)
    for r in range(block_mask.shape[0]):
        rows = slice(r * bn, min((r + 1) * bn, n))
        columns = (block_mask[r].nonzero().flatten()[:, None] * bk + torch.arange(bk)).flatten()
        columns = columns[columns < k]
        if columns.numel() == 0:
            continue
        system = gram[columns][:, columns]
        ridge = damping * system.diagonal().mean().clamp_min(1e-12)
        system = system + ridge * torch.eye(columns.numel(), dtype=system.dtype, device=system.device)
        fitted[rows, columns] = torch.linalg.solve(system, targets[columns, rows]).T
    return fitted


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    block: tuple[int, int],
    calibrate: Callable[[], object],
    damping: float = 0.01,
) -> dict[str, float]:
    """Refit, in model order, every ``nn.Linear`` named in ``masks`` (bool block masks) so that on the inputs that
    ``calibrate()`` (forward passes of ``model`` over calibration data) feeds it, it reproduces its current (dense)
    weight's outputs with only the kept tiles. Call it on the still-dense model, after choosing the masks and
    before applying them (e.g. ``Pruner.update_masks()``, then this, then ``Pruner.finalize()``).

    Returns each layer's relative output error on its calibration inputs, ``||X(W' - W)ᵀ|| / ||XWᵀ||``.
    """
    layers = {name: module for name, module in model.named_modules() if name in masks}
    missing = set(masks) - set(layers)
    if missing:
        raise ValueError(f"no linear named {sorted(missing)[:3]} in the model")
    errors = {}
    for name, layer in layers.items():  # named_modules order: the order of definition, for transformers that of use
        gram = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=layer.weight.device)

        def accumulate(module, args, gram=gram):
            x = args[0].detach().reshape(-1, module.in_features).double()
            gram.add_(x.T @ x)

        handle = layer.register_forward_pre_hook(accumulate)
        try:
            calibrate()
        finally:
            handle.remove()
        dense = layer.weight.detach()
        fitted = fit_block_rows(gram, dense, masks[name].cpu(), block, damping).to(gram.device)
        difference = fitted - dense.double()
        error = torch.einsum("nk,kl,nl->", difference, gram, difference)
        reference = torch.einsum("nk,kl,nl->", dense.double(), gram, dense.double())
        errors[name] = (error / reference.clamp_min(1e-30)).sqrt().item()
        kept = expand_block_mask(masks[name], block, dense.shape)
        layer.weight.copy_(fitted.to(dense.dtype) * kept.to(dense.dtype))
    return errors
