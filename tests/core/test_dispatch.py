"""``sparseblocks.dispatch``: the recorded decisions replayed, and ``force_plan``."""

import contextlib
import gzip
import json
import threading
from pathlib import Path

import pytest
import torch

from sparseblocks import dispatch
from sparseblocks.backend import fp32_precision
from sparseblocks.dispatch import Device, Plan, Tiles, force_plan

# Which kernel each op chose over a grid of problems with the GPU's properties faked, recorded before the rules moved
# into one module (by tools/record_dispatch_decisions.py of commit 6d3ab50, which imported the rules from their old
# places): the module must reproduce every decision.
RECORDED = Path(__file__).parent / "data" / "dispatch_decisions.json.gz"


# The two MLP paths were named "fused" and "gated" when the table was recorded.
RENAMED = {"fused": "fused_mlp", "gated": "gated_rows"}


def _recorded() -> list[dict]:
    with gzip.open(RECORDED, "rt") as f:
        rows = json.load(f)["rows"]
    for row in rows:
        if "inference" in row:
            row["inference"] = RENAMED.get(row["inference"], row["inference"])
    return rows


def _aligned(*widths: int, dtype: torch.dtype) -> bool:
    """Rows of these widths (contiguous, 16-byte aligned bases) are addressable by descriptor."""
    size = torch.empty(0, dtype=dtype).element_size()
    return all(width * size % 16 == 0 for width in widths)


def _replay(row: dict) -> dict:
    dtype = getattr(torch, row["dtype"])
    device = Device(tuple(row["capability"]), row["multiprocessors"])
    fits = lambda mode, *widths: dispatch.descriptors_allowed(dtype, mode, device) and _aligned(*widths, dtype=dtype)
    block = tuple(row["block"])
    m = row["M"]
    if row["layer"]:
        n, k = row["N"], row["K"]
        tiles = Tiles((n, k), block, row["nnz"])
        out = {"forward": dispatch.forward_plan(m, tiles, device, fits("forward", n, k)).value}
        if out["forward"] == "few_tokens":
            out["tiles_per_program"] = dispatch.few_token_tiles_per_program(tiles, device)
        out["input_grad"] = dispatch.row_loads(m, tiles, fits("input_grad", k, n), "input_grad").value
        out["activation_grad"] = dispatch.row_loads(m, tiles, fits("activation_grad", n, k, n)).value
        out["gated_hidden"] = dispatch.row_loads(m, tiles, fits("gated_hidden", n, k)).value
        out["bias_grad"] = dispatch.bias_grad_plan(m * n).value
        return out
    k, h = row["K"], row["H"]
    up = Tiles((h, k), block, row["up_nnz"])
    down = Tiles((k, h), block[::-1], row["down_nnz"])
    gate = up if row["gated"] else None
    on_chip = down.block[1] == up.block[0] and down.nnz > 0 and fits("hidden_grad", h, k, k)
    return {
        "inference": dispatch.mlp_plan(m, up, down, gate, device).value,
        "hidden_grad": dispatch.hidden_grad_plan(on_chip).value,
    }


def test_the_module_makes_every_recorded_decision():
    rows = _recorded()
    assert len(rows) > 60_000
    wrong = []
    for row in rows:
        precision = row["fp32_precision"]
        with fp32_precision(precision) if precision else contextlib.nullcontext():
            replayed = _replay(row)
        expected = {key: row[key] for key in replayed}
        if replayed != expected:
            wrong.append((row, replayed))
    assert not wrong, f"{len(wrong)} decisions changed, e.g. {wrong[:3]}"


def test_the_recorded_grid_takes_every_plan():
    rows = _recorded()
    seen = {row[key] for row in rows for key in ("forward", "inference", "hidden_grad", "bias_grad") if key in row}
    assert {p.value for p in Plan} <= seen


def test_force_plan_overrides_and_restores():
    tiles, device = Tiles((256, 256), (32, 32), 16), Device((9, 0), 132)
    assert dispatch.forward_plan(8, tiles, device, True) == Plan.FEW_TOKENS
    with force_plan(forward="rows_descriptors"):
        assert dispatch.forward_plan(8, tiles, device, True) == Plan.ROWS_DESCRIPTORS
        with force_plan(forward=Plan.ROWS):
            assert dispatch.forward_plan(8, tiles, device, True) == Plan.ROWS
        assert dispatch.forward_plan(8, tiles, device, True) == Plan.ROWS_DESCRIPTORS
    assert dispatch.forward_plan(8, tiles, device, True) == Plan.FEW_TOKENS


def test_a_forced_plan_the_inputs_cannot_run_is_refused():
    tiles, device = Tiles((256, 256), (32, 32), 16), Device((9, 0), 132)
    with force_plan(forward="one_token"), pytest.raises(ValueError, match="one row of x, got 8"):
        dispatch.forward_plan(8, tiles, device, True)
    with force_plan(forward="rows_descriptors"), pytest.raises(ValueError, match="descriptor"):
        dispatch.forward_plan(100, tiles, device, False)
    with force_plan(mlp="fused_mlp"), pytest.raises(ValueError, match="block rows"):
        dispatch.mlp_plan(100, tiles, Tiles((256, 256), (16, 16), 16), None, device)
    with pytest.raises(ValueError, match="unknown decision"), force_plan(forwards="rows"):
        pass
    with pytest.raises(ValueError, match="takes one of"), force_plan(bias_grad="rows"):
        pass


def test_forced_plans_belong_to_their_thread():
    tiles, device = Tiles((256, 256), (32, 32), 16), Device((9, 0), 132)
    inside, started, release = [], threading.Event(), threading.Event()

    def other_thread():
        started.wait()
        inside.append(dispatch.forward_plan(8, tiles, device, True))
        release.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with force_plan(forward="rows"):
        started.set()
        release.wait(10)
    thread.join()
    assert inside == [Plan.FEW_TOKENS]


def test_device_facts_of_a_cpu_tensor_are_the_interpreters():
    assert dispatch.device_facts(torch.device("cpu")) == dispatch.INTERPRETER
