"""The ``sparseblocks`` command."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    import sparseblocks
    from sparseblocks.backend import describe

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"sparseblocks {sparseblocks.__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__}")
    print(f"triton       {triton_version}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"gpu          {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB")
    else:
        print("gpu          none")
    print(f"ops run      {describe()}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sparseblocks.demo import run_demo

    error = run_demo(sparsity=args.sparsity, block_size=args.block)
    return 0 if error < 1e-4 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseblocks", description="Block-sparse transformers: tools and demo.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, GPU and which path the ops take").set_defaults(run=_info)
    demo = commands.add_parser("demo", help="sparsify a small real-shaped model and check it")
    demo.add_argument("--sparsity", type=float, default=0.9, help="fraction of blocks pruned (default 0.9)")
    demo.add_argument("--block", type=int, default=32, choices=(16, 32, 64, 128), help="block size (default 32)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
