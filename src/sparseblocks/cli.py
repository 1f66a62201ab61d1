"""The ``sparseblocks`` command."""

from __future__ import annotations

import argparse
import platform
import shlex
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


def _bench_spmm(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sparseblocks.bench import spmm

    spmm.run(
        quick=args.quick,
        dtypes=tuple(args.dtypes.split(",")) if args.dtypes else (),
        shapes=tuple(args.shapes.split(",")) if args.shapes else (),
        sweep=args.sweep and not args.quick,
        out_dir=args.out and Path(args.out),
        name=args.name,
        command="sparseblocks " + shlex.join(args.argv),
    )
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sparseblocks.bench import train

    train.run(
        quick=args.quick,
        sections=tuple(args.sections.split(",")),
        shapes=tuple(args.shapes.split(",")),
        steps=args.steps,
        data=Path(args.data),
        out_dir=args.out and Path(args.out),
        name=args.name,
        command="sparseblocks " + shlex.join(args.argv),
    )
    return 0


def _sparsify(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from transformers import AutoModel

    from sparseblocks import SparsityConfig, save_sparse, sparsify

    source, out = Path(args.model_dir), Path(args.out)
    model = AutoModel.from_pretrained(source)
    targets = args.targets.split(",")
    exclude = args.exclude.split(",") if args.exclude else []
    report = sparsify(model, SparsityConfig(args.sparsity, args.block, targets, exclude, fuse_mlp=args.fuse_mlp))
    print(report)
    save_sparse(model, out)
    # The rest of the folder (config, tokenizer) comes along, so OUT is a Hugging Face folder again.
    for path in source.iterdir():
        if path.is_file() and path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            shutil.copy2(path, out / path.name)
    print(f"saved to {out}; load it with sparseblocks.checkpoint.load_hf_sparse('{out}')")
    return 0 if report.layers else 1


def _bench_decode(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sparseblocks.bench import decode

    decode.run(args.quick, args.out and Path(args.out), args.name, "sparseblocks " + shlex.join(args.argv))
    return 0


def _bench_mlp(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sparseblocks.bench import mlp

    shapes = tuple(s for s in args.shapes.split(",") if s)
    unknown = set(shapes) - set(mlp.SHAPES)
    if unknown:
        raise SystemExit(f"unknown MLP shapes {sorted(unknown)}; known: {', '.join(mlp.SHAPES)}")
    mlp.run(args.quick, shapes, args.out and Path(args.out), args.name, "sparseblocks " + shlex.join(args.argv))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseblocks", description="Block-sparse transformers: tools and demo.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, GPU and which path the ops take").set_defaults(run=_info)
    demo = commands.add_parser("demo", help="sparsify a small real-shaped model and check it")
    demo.add_argument("--sparsity", type=float, default=0.9, help="fraction of blocks pruned (default 0.9)")
    demo.add_argument("--block", type=int, default=32, choices=(16, 32, 64, 128), help="block size (default 32)")
    demo.set_defaults(run=_demo)

    sparsify = commands.add_parser("sparsify", help="sparsify a Hugging Face model folder and save it")
    sparsify.add_argument("model_dir", help="a Hugging Face model folder (config.json and weights)")
    sparsify.add_argument("--sparsity", type=float, default=0.9, help="fraction of tiles pruned (default 0.9)")
    sparsify.add_argument("--block", type=int, default=32, choices=(16, 32, 64, 128), help="block size (default 32)")
    sparsify.add_argument("--targets", default="mlp", help="comma-separated presets, globs or re:<regex> (default mlp)")
    sparsify.add_argument("--exclude", default="", help="comma-separated presets, globs or re:<regex> to leave dense")
    sparsify.add_argument("--fuse-mlp", action="store_true", help="run known MLPs as one SparseMLP module")
    sparsify.add_argument("--out", required=True, help="output folder")
    sparsify.set_defaults(run=_sparsify)

    bench = commands.add_parser("bench", help="GPU benchmarks against dense and the other sparse paths")
    benches = bench.add_subparsers(dest="bench", required=True)
    bench_spmm = benches.add_parser("spmm", help="Y = X·Wᵀ on ViT-B and Llama-1B layer shapes")
    bench_spmm.add_argument(
        "--quick", action="store_true", help="a small grid: sparsity 0.5 and 0.9, blocks 32 to 128, no batch sweep"
    )
    bench_spmm.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, from bf16,fp32 (default both)")
    bench_spmm.add_argument(
        "--shapes", default="vit_b_fc1,vit_b_fc2,llama_1b_up,llama_1b_down", help="comma-separated layer shapes"
    )
    bench_spmm.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the ViT fc1 batch sweep")
    bench_spmm.add_argument("--name", default="spmm", help="result file stem (default spmm)")
    bench_spmm.add_argument("--out", help="folder for spmm.json and plots (default benchmarks/results/<gpu>)")
    bench_spmm.set_defaults(run=_bench_spmm)

    bench_decode = benches.add_parser("decode", help="Y = X·Wᵀ at 1-64 tokens on Llama-1B/8B MLP shapes")
    bench_decode.add_argument("--quick", action="store_true", help="1 and 16 tokens, 50%% and 90%%, block 64")
    bench_decode.add_argument("--name", default="decode", help="result file stem (default decode)")
    bench_decode.add_argument("--out", help="folder for decode.json (default benchmarks/results/<gpu>)")
    bench_decode.set_defaults(run=_bench_decode)

    bench_mlp = benches.add_parser("mlp", help="whole ViT-B and Llama MLPs, fused and unfused, 1 to 50k tokens")
    bench_mlp.add_argument("--quick", action="store_true", help="fewest and most tokens, 50%% and 90%%, block 64")
    bench_mlp.add_argument("--shapes", default="vit_b,llama_1b,llama_8b", help="comma-separated MLP shapes")
    bench_mlp.add_argument("--name", default="mlp", help="result file stem (default mlp)")
    bench_mlp.add_argument("--out", help="folder for mlp.json (default benchmarks/results/<gpu>)")
    bench_mlp.set_defaults(run=_bench_mlp)

    bench_train = benches.add_parser("train", help="forward+backward of layers and MLPs, a GPT training step")
    bench_train.add_argument("--quick", action="store_true", help="90%% sparsity, blocks 64/128, a 4-layer GPT")
    bench_train.add_argument(
        "--sections", default="linear,mlp,train_step,convergence", help="comma-separated, from the default"
    )
    bench_train.add_argument("--shapes", default="vit_b,llama_1b", help="MLP shapes of the layer sections")
    bench_train.add_argument("--steps", type=int, default=300, help="steps of the convergence run (default 300)")
    bench_train.add_argument(
        "--data", default="../shared/data/tinyshakespeare.txt", help="text file for the convergence run"
    )
    bench_train.add_argument("--name", default="train", help="result file stem (default train)")
    bench_train.add_argument("--out", help="folder for train.json and plots (default benchmarks/results/<gpu>)")
    bench_train.set_defaults(run=_bench_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
