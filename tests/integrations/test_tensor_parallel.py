"""Tensor parallelism on gloo ranks (CPU): a SwiGLU sparse MLP, a tiny HF Llama and the recipes' GPT split over
2 ranks compute what one process computes, forward and backward; splits balance stored tiles; plans the model
cannot take are refused."""

from __future__ import annotations

import pytest
import torch
from distributed_ranks import run_ranks

from conftest import relative_error
from sparseblocks import BlockSparseLinear, SparseMLP, SparsityConfig, sparsify
from sparseblocks.integrations.distributed.tensor_parallel import PlanError, split_units
from sparseblocks.recipes.gpt import GPT, GPTConfig


def _swiglu() -> SparseMLP:
    """64 -> 128 -> 64, 16x16 tiles at 75% with block rows of unequal tile counts (random patterns)."""
    torch.manual_seed(0)
    gate, up = (BlockSparseLinear(64, 128, 0.75, 16) for _ in range(2))
    return SparseMLP(up, BlockSparseLinear(128, 64, 0.75, 16), gate, activation="silu", fused=False)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    sparsify(model, SparsityConfig(0.5, 16, targets="mlp"))
    return model


def _gpt(heads: int = 2, attention_block: int | None = None) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=17, context=8, layers=2, heads=heads, width=64))
    sparsify(model, SparsityConfig(0.5, 16, targets="mlp", fuse_mlp=True))
    if attention_block:
        sparsify(model, SparsityConfig(0.5, attention_block, targets="attention"))
    return model


def _x() -> torch.Tensor:
    return torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(vocab, (2, 8), generator=torch.Generator().manual_seed(2))


def _run_mlp(mlp) -> dict:
    x = _x().requires_grad_()
    y = mlp(x)
    y.square().sum().backward()
    grads = {role: mlp.layer(role).values.grad for role in ("gate", "up", "down")}
    return {"y": y.detach(), "x_grad": x.grad, "grads": grads}


def _run_lm(model, ids, embedding) -> dict:
    logits = model(ids).logits if hasattr(model, "config") and not isinstance(model, GPT) else model(ids)[0]
    logits.float().logsumexp(-1).mean().backward()
    return {"logits": logits.detach(), "embedding_grad": embedding(model).weight.grad}


def _tp_worker(rank: int, world: int) -> dict:
    from sparseblocks.integrations.distributed import ParallelGroup, gpt_plan, llama_plan, parallelize_sparse

    mlp = _swiglu()
    report = parallelize_sparse(mlp, {"": ParallelGroup(("gate", "up"), ("down",), input_name="x")})
    result = {"mlp": _run_mlp(mlp), "mlp_report": report[""]}
    result["sources"] = {role: mlp.layer(role).tile_source for role in ("gate", "up", "down")}
    llama = _llama()
    parallelize_sparse(llama, llama_plan())
    result["llama"] = _run_lm(llama, _ids(32), lambda m: m.model.embed_tokens)
    gpt = _gpt()
    parallelize_sparse(gpt, gpt_plan())
    result["gpt"] = _run_lm(gpt, _ids(17), lambda m: m.token_embedding)
    errors = {}
    for key, model in (("heads", _gpt(heads=1)), ("tiles", _gpt(heads=4, attention_block=32))):
        with pytest.raises(PlanError) as error:
            parallelize_sparse(model, gpt_plan())
        errors[key] = str(error.value)
    with pytest.raises(PlanError, match="match no module") as error:
        parallelize_sparse(_gpt(), {"decoder.*": ParallelGroup(("fc",), ("proj",))})
    return {**result, "errors": errors}


def test_tensor_parallel_swiglu_llama_and_gpt_match_one_process():
    """Column (gate, up; q, k, v) then row (down; o) parallel, one all-reduce each way: outputs and input
    gradients as one process (fp32, 1e-6 relative), each rank's tile gradients those of its tiles in one process;
    the tiles per rank balanced within one unit's worth; refusals name the cause."""
    ranks = run_ranks(_tp_worker, 2)
    whole = _run_mlp(_swiglu())
    llama, gpt = _llama(), _gpt()
    expected_llama = _run_lm(llama, _ids(32), lambda m: m.model.embed_tokens)
    expected_gpt = _run_lm(gpt, _ids(17), lambda m: m.token_embedding)
    held = []
    for rank, result in enumerate(ranks):
        assert relative_error(result["mlp"]["y"], whole["y"]) < 1e-6
        assert relative_error(result["mlp"]["x_grad"], whole["x_grad"]) < 1e-6
        for role in ("gate", "up", "down"):
            source = result["sources"][role]
            assert relative_error(result["mlp"]["grads"][role], whole["grads"][role][source]) < 1e-6, (rank, role)
        held.append(result["mlp_report"]["units"])
        for key, expected in (("llama", expected_llama), ("gpt", expected_gpt)):
            assert relative_error(result[key]["logits"], expected["logits"]) < 1e-6, key
            assert relative_error(result[key]["embedding_grad"], expected["embedding_grad"]) < 1e-6, key
        assert "cannot split 1 units over 2 ranks" in result["errors"]["heads"]
        assert "blocks.0.attn.qkv" in result["errors"]["tiles"] and "32-wide tiles" in result["errors"]["tiles"]
    assert sorted(held[0] + held[1]) == list(range(8))  # every hidden block once
    stored = ranks[0]["mlp_report"]["stored_per_rank"]
    assert max(stored) - min(stored) <= 3 * 3 * 16 * 16  # within one unit: at most 3 tiles in each of 3 linears


def test_split_units_balances_cost_not_count():
    # a heavy unit alone on one rank, the light ones together on the other
    assert split_units([8.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2) == [[0], [1, 2, 3, 4, 5]]
    costs = [3.0, 3.0, 2.0, 2.0, 2.0, 5.0, 1.0]
    held = split_units(costs, 3)
    loads = [sum(costs[u] for u in units) for units in held]
    assert sorted(u for units in held for u in units) == list(range(7)) and max(loads) - min(loads) <= max(costs)
    with pytest.raises(PlanError, match="cannot split 2 units over 4 ranks"):
        split_units([1.0, 1.0], 4)
