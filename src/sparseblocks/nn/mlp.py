"""``SparseMLP``: a transformer MLP whose linears are ``BlockSparseLinear``, run as one module.

Two forms, for x ``(..., d)``:

* plain (ViT, BERT, GPT): ``drop(down(drop(act(up(x)))))``, the activation fused into the up projection's epilogue;
* gated (SwiGLU: Llama, Mistral, Qwen2): ``down(act(gate(x)) ⊙ up(x))``, the activation fused into the gate's.

The hidden activation still goes through memory between the products (the one-kernel fused MLP of issue #5 is
not written yet). What the module saves today is the activation's own pass over the hidden tensor.

The linears are registered under the names the dense module gave them (``gate_proj``, ``fc1``, ``0`` ...), so a
model's state dict keeps its keys; ``sparseblocks.patch.fuse_mlps`` builds these from a sparsified model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseblocks.nn.linear import BlockSparseLinear
from sparseblocks.ops import spmm
from sparseblocks.reference import ACTIVATIONS


class SparseMLP(nn.Module):
    """``up``, ``down`` and (gated form) ``gate`` are ``BlockSparseLinear``; ``activation`` one of relu, gelu,
    gelu_tanh, silu; ``dropout`` the probabilities after the activation and after ``down``; ``names`` the
    attribute name of each role (default: the role itself)."""

    def __init__(
        self,
        up: BlockSparseLinear,
        down: BlockSparseLinear,
        gate: BlockSparseLinear | None = None,
        activation: str = "gelu",
        dropout: tuple[float, float] = (0.0, 0.0),
        names: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS or activation is None:
            raise ValueError(f"activation must be one of {[a for a in ACTIVATIONS if a]}, got {activation!r}")
        if down.in_features != up.out_features or (gate is not None and gate.out_features != up.out_features):
            raise ValueError(
                f"hidden sizes disagree: up {up.out_features}, down takes {down.in_features}"
                + (f", gate {gate.out_features}" if gate is not None else "")
            )
        self.names = {"up": "up", "down": "down", "gate": "gate", **(names or {})}
        for role, layer in (("gate", gate), ("up", up), ("down", down)):
            if layer is not None:
                self.add_module(self.names[role], layer)
        self.gated, self.activation, self.dropout = gate is not None, activation, dropout

    def layer(self, role: str) -> BlockSparseLinear:
        """The linear playing ``role`` ("up", "down" or "gate")."""
        return self.get_submodule(self.names[role])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.layer("gate"), self.layer("up")
            hidden = spmm(x, gate.matrix, gate.bias, self.activation) * up(x)
        else:
            up = self.layer("up")
            hidden = spmm(x, up.matrix, up.bias, self.activation)
        hidden = F.dropout(hidden, self.dropout[0], self.training)
        return F.dropout(self.layer("down")(hidden), self.dropout[1], self.training)

    def extra_repr(self) -> str:
        return f"{'gated' if self.gated else 'plain'}, activation={self.activation}, dropout={self.dropout}"
