"""Autotuned launches that stay cheap on the CPU: the tuning keys, config sets and pruning the kernels share, and
``TunedKernel``, which remembers what Triton's autotuner chose.

Triton's autotuner picks a config once per tuning key, but every later call pays to find that choice again:
``Autotuner.run`` builds a dict of every argument, a key with ``str(dtype)`` of each tensor, and the config's
keyword arguments, before ``JITFunction.run``. On an H200 host that made issuing the pointer row kernel cost 55 µs
of CPU against 19 µs for the same JIT kernel called with the chosen config (``benchmarks/diagnose/launch_overhead.py``),
and on small layers that CPU time, not the GPU's, is the layer's time. A ``TunedKernel`` keeps the autotuner's
choice under a key the caller builds from values it has anyway, and later calls go straight to the JIT kernel,
which still does its own specialization and binary caching: a remembered config can only ever be a slower choice,
never a wrong result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import triton

from sparseblocks.kernels import prepared

# The row kernel's autotuning key, in both its versions (pointer loads, tensor descriptors).
ROW_KERNEL_TUNING_KEY = ["M_BUCKET", "OUT", "IN", "BN", "BK", "TRANSPOSED", "DENSITY_BUCKET", "HAS_BIAS", "ACTIVATION",
                         "GRAD_EPILOGUE", "BIAS_GRAD", "INPUT_PRECISION", "GATED", "HAS_GATE_BIAS", "QUANTIZED",
                         "X_FP8"]  # fmt: skip


# Host-side integer helpers: triton.cdiv and triton.next_power_of_2 are constexpr functions (Triton 3.6), ~3 µs a
# call from Python, several times per launch.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ ``n`` (1 for n ≤ 1)."""
    return 1 << max(n - 1, 0).bit_length()


def m_bucket(m: int) -> int:
    """The autotuners' key for M (``M_BUCKET``): its next power of two, capped, so M alone does not retune."""
    return min(next_power_of_2(m), 1 << 16)


def density_bucket(density: float) -> int:
    """The autotuners' key for a pattern's density (``DENSITY_BUCKET``): steps of 5%."""
    return round(density * 20)


def prune_large_m_tiles(configs: list, named_args: dict, **kwargs) -> list:
    """Autotuner pruning: drop M tiles far larger than M itself (they only multiply padding), from its bucket."""
    largest_useful = max(64, named_args["M_BUCKET"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= largest_useful]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


# A gated launch holds two fp32 accumulators (up's and the gate's): past this many of their registers per thread the
# compiler spills them to local memory. A config's accumulators cost BLOCK_M · BN / (32 · num_warps) registers each.
MAX_ACCUMULATOR_REGISTERS = 128


def prune_row_kernel_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Autotuner pruning for the row kernel: ``prune_large_m_tiles``, and in the ``GATED`` mode configs whose two
    accumulators would not fit in ``MAX_ACCUMULATOR_REGISTERS`` (the one with the fewest kept if none fits)."""
    kept = prune_large_m_tiles(configs, named_args, **kwargs)
    if not kwargs.get("GATED"):
        return kept
    registers = lambda c: 2 * c.kwargs["BLOCK_M"] * kwargs["BN"] / (32 * c.num_warps)
    return [c for c in kept if registers(c) <= MAX_ACCUMULATOR_REGISTERS] or [min(kept, key=registers)]


def m_tile_grid(m: int, blocks: int) -> Callable[[dict], tuple[int]]:
    """The grid of a launch whose config picks ``BLOCK_M``: ``cdiv(M, BLOCK_M) · blocks`` programs."""
    return lambda meta: (cdiv(m, meta["BLOCK_M"]) * blocks,)


def stream_capturing() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class TunedKernel:
    """A Triton kernel under the autotuner, launched through :meth:`launch`; see the module docstring.

    ``configs`` and ``key`` (and ``options``, e.g. ``prune_configs_by``, ``cache_results``) go to
    ``triton.autotune``; ``kernel`` is the plain JIT function, launched directly once a key's config is known.
    """

    def __init__(self, kernel: Any, configs: list[triton.Config], key: Sequence[str], **options: Any) -> None:
        self.kernel, self.configs = kernel, configs
        self.autotuner = triton.autotune(configs=configs, key=list(key), **options)(kernel)
        self._chosen: dict[Hashable, tuple[triton.Config, dict]] = {}
        self._tuning = threading.Lock()  # the autotuner's `best_config` is shared: one tuning call at a time

    def launch(self, key: Hashable, grid: Any, args: Sequence, meta: dict) -> triton.Config:
        """Run the kernel on the positional ``args`` with the constexprs ``meta``, in the config chosen for ``key``
        and ``meta``, tuning it on the first call (then through the autotuner, whose own cache and disk cache
        still apply). ``grid``: a tuple, or a callable of the launch's constexprs (config included).

        ``key`` plus ``meta`` must determine the autotuner's key (the runtime values it is keyed on, and the
        argument dtypes); finer is fine (more tuning calls). A first call inside a CUDA-graph capture runs the first
        config without tuning (the graph keeps it). Returns the config the launch ran with.
        """
        key = (key, *meta.items())
        chosen = self._chosen.get(key)
        if chosen is None and stream_capturing():
            # Tuning times each config and synchronizes, which breaks a CUDA-graph capture: the first config (every
            # list puts its smallest first) runs unremembered, and the first call outside a capture tunes.
            chosen = (self.configs[0], self.configs[0].all_kwargs())
        elif chosen is None:
            with self._tuning:
                self.autotuner[grid](*args, **meta)
                config = self.autotuner.best_config
                self._chosen[key] = (config, config.all_kwargs())
            prepared.not_replayable("autotuned in this call")
            return config
        config, launch_kwargs = chosen
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(self.kernel.arg_names, args, strict=False)), **meta, **launch_kwargs})
            prepared.not_replayable("a config pre-hook ran")
        prepared.launch(self.kernel, grid, args, {**meta, **launch_kwargs})
        return config

    def forget(self) -> None:
        """Drop the remembered choices and the autotuner's in-memory cache (tests and tuning scripts)."""
        self._chosen.clear()
        self.autotuner.cache.clear()


def autotune_row_kernel(
    kernel: Any,
    launch_configs: list[tuple[int, int, int]],
    pre_hook: Callable | None = None,
    extra_key: tuple[str, ...] = (),
    **options: Any,
) -> TunedKernel:
    """One version of the row kernel under the autotuner: its ``(BLOCK_M, num_warps, num_stages)`` configs, keyed
    on ``ROW_KERNEL_TUNING_KEY`` plus ``extra_key`` (that version's own modes), pruned by
    ``prune_row_kernel_configs``."""
    configs = [triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages, pre_hook=pre_hook)
               for block_m, warps, stages in launch_configs]  # fmt: skip
    return TunedKernel(kernel, configs, [*ROW_KERNEL_TUNING_KEY, *extra_key],
                       prune_configs_by={"early_config_prune": prune_row_kernel_configs}, **options)  # fmt: skip
