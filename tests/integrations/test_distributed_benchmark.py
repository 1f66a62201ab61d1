"""benchmarks/distributed_step.py at toy size under torchrun on 2 gloo ranks: every section runs and reports."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from distributed_ranks import free_port

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "distributed_step.py"


def _run(arguments: list[str], ranks: int | None) -> list[dict]:
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(free_port())]
    command = [sys.executable, *(launcher if ranks else []), str(SCRIPT), *arguments, "--toy", "--repeats", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # timed out: end the launcher and its workers (their own process group)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output[-3000:]
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_every_section_runs_at_toy_size(tmp_path):
    rows = _run(["fsdp", "tp", "dcp-save", "--tokens", "2", "--checkpoint", str(tmp_path / "ckpt")], 2)
    rows += _run(["dcp-load", "--checkpoint", str(tmp_path / "ckpt")], None)  # one process reads 2 ranks' files
    assert [(row["section"], row["variant"]) for row in rows] == [
        ("fsdp_step", "dense"), ("fsdp_step", "sparse_mlp_90"), ("tp_decode", "dense"), ("tp_decode", "sparse_mlp_90"),
        ("dcp_save", "sparse_mlp_90"), ("dcp_load", "sparse_mlp_90"),
    ]  # fmt: skip
    assert all(row["ms"] > 0 for row in rows) and [row["world"] for row in rows] == [2, 2, 2, 2, 2, 1]
