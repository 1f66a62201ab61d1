"""``SparseMLP``: a transformer MLP whose linears are ``BlockSparseLinear``, run as one module.

Two forms, for x ``(..., d)``:

* plain (ViT, BERT, GPT): ``drop(down(drop(act(up(x)))))``, the activation fused into the up projection's epilogue;
* gated (SwiGLU: Llama, Mistral, Qwen2): ``down(act(gate(x)) ⊙ up(x))``, the activation fused into the gate's.

With ``fused=True`` (the default) inference runs as one kernel (``kernels/fused_mlp.py``, the hidden activation
kept on chip) where ``dispatch.mlp_plan`` says it is faster; training, ``fused=False`` and everywhere else run
three products with the activation fused into the first one's epilogue.

The linears are registered under the names the dense module gave them (``gate_proj``, ``fc1``, ``0`` ...), so a
model's state dict keeps its keys; ``sparseblocks.integrations.sparsify.fuse_mlps`` builds these from a sparsified
model, and
``SparseLinearActivation`` (one linear and its activation, one product) where a model splits its MLP in two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseblocks.nn.linear import BlockSparseLinear
from sparseblocks.ops import sparse_mlp, spmm
from sparseblocks.reference import ACTIVATIONS


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS or activation is None:
        raise ValueError(f"activation must be one of {[a for a in ACTIVATIONS if a]}, got {activation!r}")


class SparseMLP(nn.Module):
    """``up``, ``down`` and (gated form) ``gate`` are ``BlockSparseLinear``; ``activation`` one of relu, gelu,
    gelu_tanh, silu; ``dropout`` the probabilities after the activation and after ``down``; ``names`` the
    attribute name of each role (default: the role itself); ``fused``: inference in one kernel (see above)."""

    def __init__(
        self,
        up: BlockSparseLinear,
        down: BlockSparseLinear,
        gate: BlockSparseLinear | None = None,
        activation: str = "gelu",
        dropout: tuple[float, float] = (0.0, 0.0),
        names: dict[str, str] | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        _check_activation(activation)
        if down.in_features != up.out_features or (gate is not None and gate.out_features != up.out_features):
            raise ValueError(
                f"hidden sizes disagree: up {up.out_features}, down takes {down.in_features}"
                + (f", gate {gate.out_features}" if gate is not None else "")
            )
        self.names = {"up": "up", "down": "down", "gate": "gate", **(names or {})}
        for role, layer in (("gate", gate), ("up", up), ("down", down)):
            if layer is not None:
                self.add_module(self.names[role], layer)
        self.gated, self.activation, self.dropout, self.fused = gate is not None, activation, dropout, fused

    def layer(self, role: str) -> BlockSparseLinear:
        """The linear playing ``role`` ("up", "down" or "gate")."""
        return self.get_submodule(self.names[role])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.layer("up"), self.layer("down")
        gate = self.layer("gate") if self.gated else None
        y = sparse_mlp(
            x,
            up.matrix,
            down.matrix,
            None if gate is None else gate.matrix,
            up.bias,
            down.bias,
            None if gate is None else gate.bias,
            self.activation,
            hidden_dropout=self.dropout[0] if self.training else 0.0,
            fused=self.fused,
        )
        return F.dropout(y, self.dropout[1], self.training)

    def extra_repr(self) -> str:
        form = "gated" if self.gated else "plain"
        return f"{form}, activation={self.activation}, dropout={self.dropout}, fused={self.fused}"


class SparseLinearActivation(nn.Module):
    """``activation(linear(x))`` as one ``spmm``, the activation in the product's epilogue rather than a separate
    pass over the output: for modules made of a linear and an activation, such as the first half of an MLP that
    BERT splits over two modules (``BertIntermediate``). ``name``: the linear's attribute name, so the state dict
    keeps the dense module's keys."""

    def __init__(self, linear: BlockSparseLinear, activation: str, name: str = "linear") -> None:
        super().__init__()
        _check_activation(activation)
        self.name, self.activation = name, activation
        self.add_module(name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.get_submodule(self.name)
        return spmm(x, linear.matrix, linear.bias, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
