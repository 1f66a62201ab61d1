"""What every benchmark shares: the GPU's measured ceilings, timing, physical floors and the result's head.

Timing: each implementation is captured in a CUDA graph of many calls that cycle through several input sets
(more bytes than the L2 holds, so no call reads warm inputs) and the graph is replayed; the median replay over
the number of calls is the time. Graph replay takes the host out: a launch that costs 20 µs of Python does not
hide a kernel that runs in 50 µs. Where a path cannot be captured (it syncs with the host), the harness falls
back to ``triton.testing.do_bench`` on the same rotating inputs and says so in the row (``"timer": "eager"``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sparseblocks.bench.results import new_result
from sparseblocks.dispatch import FP8_MIN_CAPABILITY

L2_FLUSH_BYTES = 2 * 64 * 2**20  # twice a Hopper L2 (50-60 MB)


@dataclass(frozen=True)
class Ceilings:
    """Measured in the same run: copy bandwidth and matrix rates (dense products of random data)."""

    copy_bytes_per_s: float  # bytes read + written per second
    bf16_flops: float
    fp32_flops: float  # true fp32 (no TF32)
    tf32_flops: float
    fp8_flops: float | None = None  # row-wise scaled fp8 products; None where the GPU has no fp8 tensor cores

    def matmul_flops(self, dtype: torch.dtype, tf32: bool) -> float:
        if dtype == torch.float8_e4m3fn:
            if self.fp8_flops is None:
                raise ValueError("no fp8 rate was measured: the GPU is below compute capability 8.9")
            return self.fp8_flops
        if dtype in (torch.bfloat16, torch.float16):
            return self.bf16_flops
        return self.tf32_flops if tf32 else self.fp32_flops

    def floor_ms(self, flops: float, bytes_moved: float, dtype: torch.dtype, tf32: bool = False) -> float:
        """The physical floor: max(arithmetic time, memory time), in milliseconds."""
        return 1e3 * max(flops / self.matmul_flops(dtype, tf32), bytes_moved / self.copy_bytes_per_s)


def measure_ceilings() -> Ceilings:
    """Copy bandwidth over 2 GiB, and 8192³ matrix products in bf16, fp32, tf32 and (from compute capability 8.9)
    fp8 × fp8 with row-wise scales, as the dense fp8 baseline multiplies."""
    import triton.testing

    from sparseblocks.bench.baselines import FP8Weight, fp8_product

    source = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    target = torch.empty_like(source)
    copy_ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=50, rep=300, return_mode="median")
    rates = {}
    for name, dtype, tf32 in [
        ("bf16", torch.bfloat16, False),
        ("fp32", torch.float32, False),
        ("tf32", torch.float32, True),
    ]:
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        ms = triton.testing.do_bench(lambda a=a, b=b: a @ b, warmup=100, rep=500, return_mode="median")
        torch.backends.cuda.matmul.allow_tf32 = previous
        rates[name] = 2 * 8192**3 / (ms * 1e-3)
    if torch.cuda.get_device_capability() >= FP8_MIN_CAPABILITY:
        a, b = (FP8Weight.quantize(torch.randn(8192, 8192, device="cuda")) for _ in range(2))
        ms = triton.testing.do_bench(lambda: fp8_product(*a, b, None, torch.bfloat16), warmup=100, rep=500,
                                     return_mode="median")  # fmt: skip
        rates["fp8"] = 2 * 8192**3 / (ms * 1e-3)
    copy_rate = 2 * source.numel() / (copy_ms * 1e-3)
    return Ceilings(copy_rate, rates["bf16"], rates["fp32"], rates["tf32"], rates.get("fp8"))


def input_sets(make: Callable[[], torch.Tensor], one_set_bytes: int) -> list[torch.Tensor]:
    """As many fresh inputs as it takes to exceed twice the L2 (at least 2, at most 8)."""
    count = min(8, max(2, math.ceil(L2_FLUSH_BYTES / max(one_set_bytes, 1))))
    return [make() for _ in range(count)]


def time_ms(fn: Callable[[torch.Tensor], object], inputs: Sequence[torch.Tensor]) -> tuple[float, str]:
    """Median milliseconds per call of ``fn`` cycling over ``inputs``; returns (ms, "cuda_graph" | "eager")."""
    import triton.testing

    for x in inputs:  # warm-up: compilation, autotuning, workspace allocation
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for x in inputs:
        fn(x)
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / len(inputs), 1e-3)
    calls = len(inputs) * max(1, min(200, math.ceil(5.0 / estimate / len(inputs))))  # about 5 ms a replay
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            for i in range(calls):
                fn(inputs[i % len(inputs)])
        torch.cuda.synchronize()
    except Exception as error:  # a path that syncs with the host cannot be captured
        print(f"  (CUDA graph capture failed, timing eagerly: {type(error).__name__}: {str(error)[:160]})", flush=True)
        torch.cuda.synchronize()
        counter = iter(range(10**9))
        ms = triton.testing.do_bench(
            lambda: fn(inputs[next(counter) % len(inputs)]), warmup=25, rep=200, return_mode="median"
        )
        return ms, "eager"
    replays = []
    for _ in range(7):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        replays.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(replays[1:]), "cuda_graph"


def gpu_folder(gpu_name: str) -> str:
    """Folder name for a GPU's results: 'NVIDIA H200' -> 'h200'."""
    return gpu_name.lower().replace("nvidia", "").strip().split()[0].replace(" ", "_")


def start_run(kind: str, command: str, out_dir: Path | None) -> tuple[dict, Path]:
    """An empty result of ``kind`` (:func:`sparseblocks.bench.results.new_result`) and the folder it goes to
    (``out_dir`` or ``benchmarks/results/<gpu>``); raises without a CUDA GPU."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"bench {kind} times GPU kernels: it needs a CUDA GPU")
    payload = new_result(kind, command)
    return payload, out_dir or results_folder(payload)


def results_folder(payload: dict) -> Path:
    """``benchmarks/results/<gpu>`` of a result's env."""
    return Path("benchmarks/results") / gpu_folder(payload["env"]["gpu"])
