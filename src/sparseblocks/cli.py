"""The ``sparseblocks`` command."""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from collections.abc import Collection
from pathlib import Path


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
    from sparseblocks.recipes.demo import run_demo

    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"sparseblocks demo needs scikit-learn and matplotlib ({error}): pip install scikit-learn "
                         "matplotlib, or `make demo`") from error  # fmt: skip
    error = run_demo(sparsity=args.sparsity, block_size=args.block, epochs=args.epochs, out=args.out)
    return 0 if error < 1e-4 else 1


_GPT_SETTINGS = {"steps": int, "layers": int, "heads": int, "width": int, "context": int, "batch_size": int,
                 "dropout": float, "lr": float, "seed": int}  # fmt: skip
_VIT_SETTINGS = {"epochs": int, "lr": float, "batch_size": int, "layers": int, "heads": int, "width": int,
                 "patch_size": int, "seed": int}  # fmt: skip


def _train_gpt(args: argparse.Namespace) -> int:
    from sparseblocks.recipes.experiments import Experiment
    from sparseblocks.recipes.training import ResumeError, train_gpt

    settings = {name: getattr(args, name) for name in _GPT_SETTINGS if getattr(args, name) is not None}
    try:
        train_gpt(args.data, args.out, args.method, args.sparsity, args.block, Experiment(**settings),
                  args.checkpoint_every, args.resume, args.stop_after, fsdp=args.fsdp)  # fmt: skip
    except (ResumeError, OSError, ValueError) as error:  # bad settings or data, a damaged checkpoint
        raise SystemExit(f"sparseblocks train gpt: {error}") from error
    return 0


def _train_vit(args: argparse.Namespace) -> int:
    from sparseblocks.recipes.training import ResumeError, ViTRecipe, train_vit

    settings = {name: getattr(args, name) for name in _VIT_SETTINGS if getattr(args, name) is not None}
    try:
        recipe = ViTRecipe(sparsity=args.sparsity, block=args.block, **settings)
        train_vit(args.data, args.out, recipe, args.image_size, args.resume, args.stop_after)
    except (ResumeError, OSError, ValueError, ImportError) as error:  # a folder without images, no scikit-learn
        raise SystemExit(f"sparseblocks train vit: {error}") from error
    return 0


def _bench_spmm(args: argparse.Namespace) -> int:
    from sparseblocks.bench import spmm

    spmm.run(
        quick=args.quick,
        dtypes=tuple(args.dtypes.split(",")) if args.dtypes else (),
        shapes=tuple(args.shapes.split(",")) if args.shapes else (),
        sweep=args.sweep and not args.quick,
        out_dir=args.out and Path(args.out),
        name=args.name,
        command="sparseblocks " + shlex.join(args.argv),
        fp32=args.fp32_precision,
        quantize=_quantize_kinds(args),
    )
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from sparseblocks.bench import train

    train.run(
        quick=args.quick,
        sections=tuple(args.sections.split(",")),
        shapes=tuple(args.shapes.split(",")),
        models=tuple(args.models.split(",")),
        steps=args.steps,
        data=Path(args.data),
        out_dir=args.out and Path(args.out),
        name=args.name,
        command="sparseblocks " + shlex.join(args.argv),
    )
    return 0


def _save_hf_folder(model, report, source, out, argv) -> int:
    """Print the report, save ``model`` as the sparse Hugging Face folder ``out`` (with ``source``'s tokenizer and a
    model card naming the command) and say how to load it; exit status 1 when nothing was sparsified."""
    import shlex

    from sparseblocks.integrations.huggingface import save_hf_sparse

    print(report)
    if not report.layers:
        return 1
    save_hf_sparse(model, source, out, command=shlex.join(["sparseblocks", *argv]))
    print(f"saved to {out}; load it with transformers' from_pretrained('{out}') after "
          "`import sparseblocks.integrations.huggingface`")  # fmt: skip
    return 0


def _sparsity_config(args: argparse.Namespace):
    """The ``SparsityConfig`` of ``sparsify`` and ``prune``'s options (2:4 implies sparsity 0.5)."""
    from sparseblocks import SparsityConfig

    sparsity = args.sparsity if args.sparsity is not None else (0.5 if args.pattern == "2:4" else 0.9)
    exclude = args.exclude.split(",") if args.exclude else []
    targets = args.targets.split(",")
    return SparsityConfig(sparsity, args.block, targets, exclude, fuse_mlp=args.fuse_mlp, pattern=args.pattern,
                          quantize=args.quantize)  # fmt: skip


def _folders(command: str, args: argparse.Namespace) -> tuple[Path, Path]:
    """The model folder and ``--out``, refused if they are one folder (the output would overwrite its source) or
    ``--out`` is a file (checked before the model loads: the save would fail only after all the work)."""
    source, out = Path(args.model_dir), Path(args.out)
    if out.resolve() == source.resolve():
        raise SystemExit(f"sparseblocks {command}: --out must be another folder than {source}")
    if out.exists() and not out.is_dir():
        args.command_parser.error(f"--out {out} is a file; name a folder (new or existing)")
    return source, out


def _sparsify(args: argparse.Namespace) -> int:
    from sparseblocks import sparsify
    from sparseblocks.integrations.huggingface import load_pretrained

    source, out = _folders("sparsify", args)
    try:
        config = _sparsity_config(args)
        model = load_pretrained(source)[0]  # with its head (a causal LM keeps lm_head)
        report = sparsify(model, config)
    except (OSError, ValueError) as error:
        raise SystemExit(f"sparseblocks sparsify: {error}") from error
    return _save_hf_folder(model, report, source, out, args.argv)


def _prune(args: argparse.Namespace) -> int:
    import torch

    from sparseblocks.integrations.huggingface import calibration_tokens, load_pretrained, prune_pretrained
    from sparseblocks.pruning.scores import SCORES

    source, out = _folders("prune", args)
    text = None
    if SCORES[args.method].needs or args.reconstruct:  # read before the model loads: a wrong path fails at once
        if args.calibration is None:
            what = "--reconstruct" if args.reconstruct else f"--method {args.method}"
            raise SystemExit(f"sparseblocks prune: {what} needs --calibration FILE (plain text)")
        try:
            text = Path(args.calibration).read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            raise SystemExit(f"sparseblocks prune: cannot read --calibration {args.calibration}: {error}") from error
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"sparseblocks prune: --device {device}, but no CUDA GPU is visible")
    try:
        config = _sparsity_config(args)
        model, tokenizer, head = load_pretrained(source, device)
        tokens = None
        if text is not None:
            vocab = model.config.vocab_size
            tokens = calibration_tokens(text, tokenizer, vocab, args.samples, args.seq_len, args.seed)
            origin = args.calibration if tokenizer is not None else "random token ids (no tokenizer)"
            print(f"calibration: {len(tokens)} windows of {tokens.shape[1]} tokens from {origin}")
        report = prune_pretrained(model, config, args.method, tokens, head, tokenizer, args.seed, args.reconstruct)
    except (OSError, ValueError) as error:
        raise SystemExit(f"sparseblocks prune: {error}") from error
    return _save_hf_folder(model.cpu(), report, source, out, args.argv)


def _distill(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from sparseblocks.recipes.distill import DistillConfig, distill
    from sparseblocks.recipes.training import ResumeError

    source, out = _folders("distill", args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"sparseblocks distill: --device {device}, but no CUDA GPU is visible")
    names = {field.name for field in dataclasses.fields(DistillConfig)}
    settings = {name: value for name, value in vars(args).items() if name in names and value is not None}
    try:
        config = DistillConfig(**settings)
        distill(source, args.data, out, config, args.eval, device, args.teacher_device, args.resume,
                args.checkpoint_every, args.stop_after, args.allow_random_ids,
                command=shlex.join(["sparseblocks", *args.argv]))  # fmt: skip
    except (ResumeError, OSError, ValueError) as error:
        raise SystemExit(f"sparseblocks distill: {error}") from error
    return 0


def _report(args: argparse.Namespace) -> int:
    if args.model:
        from sparseblocks.integrations.model_card import model_card

        try:
            print(model_card(args.model), end="")
        except ValueError as error:
            raise SystemExit(f"sparseblocks report: {error}") from error
        return 0
    from sparseblocks.bench.report import write

    results = Path(args.results)
    if not results.is_dir():
        raise SystemExit(f"sparseblocks report: {results}: no such results folder")
    print(f"wrote {write(results, Path(args.out) if args.out else results / 'REPORT.md')}")
    return 0


def _comma_list(text: str | None, kind: type) -> tuple:
    """A comma-separated option's values, each made a ``kind`` (empty for an option not given)."""
    return tuple(kind(v) for v in (text or "").split(",") if v)


def _shape_names(text: str, known: Collection[str], what: str) -> tuple[str, ...]:
    """``--shapes``' names, refused unless each is in ``known``."""
    shapes = _comma_list(text, str)
    unknown = set(shapes) - set(known)
    if unknown:
        raise SystemExit(f"unknown {what} {sorted(unknown)}; known: {', '.join(known)}")
    return shapes


def _grid(args: argparse.Namespace) -> dict[str, tuple]:
    """``--tokens``, ``--sparsities`` and ``--blocks`` (empty where not given: the default or --quick grid)."""
    try:
        return {"tokens": _comma_list(args.tokens, int), "sparsities": _comma_list(args.sparsities, float),
                "blocks": _comma_list(args.blocks, int)}  # fmt: skip
    except ValueError as error:
        raise SystemExit(f"sparseblocks bench {args.bench}: {error}") from error


def _bench_decode(args: argparse.Namespace) -> int:
    from sparseblocks.bench import decode

    shapes = _shape_names(args.shapes, decode.SHAPES, "decode shapes") if args.shapes else decode.SHAPES
    command = "sparseblocks " + shlex.join(args.argv)
    decode.run(args.quick, args.out and Path(args.out), args.name, command, _quantize_kinds(args), shapes,
               **_grid(args))  # fmt: skip
    return 0


def _bench_mlp(args: argparse.Namespace) -> int:
    from sparseblocks.bench import mlp

    shapes = _shape_names(args.shapes, mlp.SHAPES, "MLP shapes")
    mlp.run(args.quick, shapes, args.out and Path(args.out), args.name, "sparseblocks " + shlex.join(args.argv),
            _quantize_kinds(args), **_grid(args))  # fmt: skip
    return 0


def _bench_e2e(args: argparse.Namespace) -> int:
    from sparseblocks.bench import e2e

    options = {"batches": (args.batches, int), "dtypes": (args.dtypes, str), "sparsities": (args.sparsities, float),
               "blocks": (args.blocks, int), "targets": (args.targets, str), "modes": (args.modes, str),
               "impls": (args.impls, str)}  # fmt: skip
    grid = None
    try:
        kind = e2e.model_kind(e2e.model_config(args.model))  # an unknown model fails here, before anything runs
        given = {k: _comma_list(t, f) for k, (t, f) in options.items() if t is not None}
        if args.prefill_tokens is not None:
            given["prefill_tokens"] = args.prefill_tokens
        if given:
            grid = e2e.Grid(**{**e2e.DEFAULT_GRIDS[kind].__dict__, **given})
    except (OSError, ValueError) as error:
        raise SystemExit(f"sparseblocks bench e2e: {error}") from error
    command = "sparseblocks " + shlex.join(args.argv)
    e2e.run(args.model, grid, args.dry_run, args.out and Path(args.out), args.name, command, args.fp32_precision)
    return 0


def _add_quantize(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--quantize", help="also our kernels on quantized tiles (16-bit cases): comma-separated, from "
                                          "int8,fp8,fp8-w8a8; and the dense fp8 baseline (dense_fp8)")  # fmt: skip


def _add_grid(bench: argparse.ArgumentParser) -> None:
    for option, what in [("tokens", "token counts"), ("sparsities", "sparsities"), ("blocks", "block sizes")]:
        bench.add_argument(f"--{option}", help=f"comma-separated {what} (default: the full grid, or --quick's)")


def _quantize_kinds(args: argparse.Namespace) -> tuple[str, ...]:
    return _comma_list(args.quantize, str)


def _add_fp32_precision(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--fp32-precision", default="ieee", choices=("ieee", "tf32x3"),
                       help="how our kernels multiply fp32 tiles (sparseblocks.fp32_precision); dense keeps "
                            "PyTorch's TF32 setting (off)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseblocks", description="Block-sparse transformers: tools and demo.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, GPU and which path the ops take").set_defaults(run=_info)
    demo = commands.add_parser("demo", help="train a small ViT dense and sparse on digits, convert, compare, plot")
    demo.add_argument("--sparsity", type=float, default=0.9, help="fraction of MLP tiles pruned (default 0.9)")
    demo.add_argument("--block", type=int, default=16, choices=(16, 32, 64, 128), help="block size (default 16)")
    demo.add_argument("--epochs", type=int, default=30, help="training epochs of each model (default 30)")
    demo.add_argument("--out", default="sparseblocks-demo", help="folder for the plot, numbers and model")
    demo.set_defaults(run=_demo)

    from sparseblocks.integrations.layouts import sparsify_patterns
    from sparseblocks.pruning.scores import SCORES
    from sparseblocks.recipes.experiments import METHODS, Experiment  # torch is loaded with the package: cheap here
    from sparseblocks.recipes.training import ViTRecipe

    train = commands.add_parser("train", help="training recipes: prune while training, convert, save; resumable")
    recipes = train.add_subparsers(dest="recipe", required=True)
    resumable = argparse.ArgumentParser(add_help=False)
    resumable.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    resumable.add_argument("--stop-after", type=int, metavar="STEPS", help="stop after this step (then --resume)")
    train_gpt = recipes.add_parser(
        "gpt", parents=[resumable], help="a character GPT pruned by one method (the tinyshakespeare experiment)"
    )
    train_gpt.add_argument("--data", required=True, metavar="FILE", help="text file, e.g. tinyshakespeare.txt")
    train_gpt.add_argument("--method", default="fisher", choices=METHODS, help="pruning method (default fisher)")
    train_gpt.add_argument("--sparsity", type=float, default=0.9, help="fraction of MLP tiles pruned (default 0.9)")
    train_gpt.add_argument("--block", type=int, default=32, choices=(16, 32, 64, 128), help="block size (default 32)")
    train_gpt.add_argument("--out", default="sparseblocks-gpt", help="checkpoints and model (default %(default)s)")
    train_gpt.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS", help="(default 500)")
    train_gpt.add_argument(
        "--fsdp", action="store_true", help="FSDP2 over the ranks of torchrun (NCCL on GPUs, gloo on CPUs); no --resume"
    )
    for name, kind in _GPT_SETTINGS.items():
        train_gpt.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"default {getattr(Experiment, name)}")
    train_gpt.set_defaults(run=_train_gpt)
    train_vit = recipes.add_parser(
        "vit", parents=[resumable], help="a small ViT from scratch with Supermask on its MLPs (superblock)"
    )
    train_vit.add_argument(
        "--data", default="digits", help="digits, or imagefolder:PATH (PATH/<class>/<image>; train/ and test/ if split)"
    )
    train_vit.add_argument("--sparsity", type=float, default=0.9, help="fraction of MLP tiles pruned, 0: dense")
    train_vit.add_argument("--block", type=int, default=16, choices=(16, 32, 64, 128), help="block size (default 16)")
    train_vit.add_argument("--out", default="sparseblocks-vit", help="checkpoints and model (default %(default)s)")
    train_vit.add_argument("--image-size", type=int, help="side images are resized to (imagefolder; default 32)")
    for name, kind in _VIT_SETTINGS.items():
        default = getattr(ViTRecipe, name)
        default = "a quarter of the image side" if default is None else default
        train_vit.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"default {default}")
    train_vit.set_defaults(run=_train_vit)

    sparsity_options = argparse.ArgumentParser(add_help=False)  # what _sparsity_config reads
    sparsity_options.add_argument("--sparsity", type=float, help="fraction of tiles pruned (default 0.9; 0.5 for 2:4)")
    sparsity_options.add_argument(
        "--pattern",
        default="block",
        choices=sparsify_patterns(),
        help="tiles, or 2 of every 4 weights (2:4)",
    )
    sparsity_options.add_argument(
        "--quantize",
        choices=("int8", "fp8", "fp8-w8a8"),
        help="quantize the kept tiles for inference (float32 scale per tile row; fp8 needs an sm_89+ GPU)",
    )
    sparsity_options.add_argument(
        "--block", type=int, default=32, choices=(16, 32, 64, 128), help="block size (default 32)"
    )
    sparsity_options.add_argument(
        "--targets", default="mlp", help="comma-separated presets, globs or re:<regex> (default mlp)"
    )
    sparsity_options.add_argument(
        "--exclude", default="", help="comma-separated presets, globs or re:<regex> to leave dense"
    )
    sparsity_options.add_argument(
        "--fuse-mlp",
        action="store_true",
        help="run known MLPs as one SparseMLP module (BERT's first half as one product)",
    )
    sparsify = commands.add_parser(
        "sparsify", parents=[sparsity_options], help="sparsify a Hugging Face model folder and save it"
    )
    sparsify.add_argument("model_dir", help="a Hugging Face model folder (config.json and weights)")
    sparsify.add_argument("--out", required=True, help="output folder")
    sparsify.set_defaults(run=_sparsify, command_parser=sparsify)

    prune = commands.add_parser(
        "prune", parents=[sparsity_options], help="prune a Hugging Face model folder from calibration text and save it"
    )
    prune.add_argument("model_dir", help="a Hugging Face model folder (config.json, weights, tokenizer)")
    prune.add_argument(
        "--method",
        default="magnitude",
        choices=tuple(SCORES),
        help="tile scores: weights, weights x input norms, or weights^2 x Fisher (default magnitude)",
    )
    prune.add_argument("--calibration", metavar="FILE", help="plain text for activation_magnitude and fisher")
    prune.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    prune.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    prune.add_argument("--seed", type=int, default=0, help="seed of masking, random directions, random ids")
    prune.add_argument("--reconstruct", action="store_true",
                       help="refit the kept weights layer by layer on the calibration text")  # fmt: skip
    prune.add_argument("--device", help="where to run the calibration (default cuda when there is one, else cpu)")
    prune.add_argument("--out", required=True, help="output folder")
    prune.set_defaults(run=_prune, command_parser=prune)

    distill = commands.add_parser(
        "distill", help="prune a Hugging Face model folder gradually while distilling it from its dense self; save it"
    )
    distill.add_argument("model_dir", help="a Hugging Face model folder (config.json, weights, tokenizer)")
    distill.add_argument("--data", required=True, metavar="TEXT", help="plain text to distil on")
    distill.add_argument("--eval", metavar="TEXT", help="held-out text (default: the last --held-out of --data)")
    distill.add_argument("--out", required=True, help="output folder: checkpoint, sparse model, distill.json/.png")
    distill.add_argument("--sparsity", type=float, default=0.7, help="fraction of tiles pruned overall (default 0.7)")
    distill.add_argument("--block", type=int, default=32, choices=(16, 32, 64, 128), help="block size (default 32)")
    distill.add_argument("--targets", default="mlp", help="mlp, attention, all-linear or comma-separated patterns")
    distill.add_argument("--exclude", help="comma-separated patterns to leave dense")
    distill.add_argument("--method", default="fisher", choices=("fisher", "activation_magnitude", "magnitude",
                         "prune_grow"), help="tile scores, or blocked prune-and-grow (default fisher)")  # fmt: skip
    distill.add_argument("--allocation", default="uniform", choices=("uniform", "global", "sensitivity"),
                         help="each layer at the target, tiles ranked across layers, or each layer's sparsity "
                         "from its Fisher sensitivity (default uniform)")  # fmt: skip
    distill.add_argument("--permute", action="store_true", help="reorder MLP hidden units to gather saliency in tiles")
    distill.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    distill.add_argument("--prune-fraction", type=float, help="fraction of the steps the cubic ramp takes "
                         "(default 0.5; 0: one shot before training)")  # fmt: skip
    distill.add_argument("--prune-every", type=int, help="steps between mask updates (default: 50 updates)")
    distill.add_argument("--batch-size", type=int, help="windows per micro-batch (default 8)")
    distill.add_argument("--accumulation", type=int, help="micro-batches per step (default 1)")
    distill.add_argument("--seq-len", type=int, help="tokens per window (default 128)")
    distill.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    distill.add_argument("--warmup", type=float, help="fraction of the steps of linear warm-up (default 0.05)")
    distill.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    distill.add_argument("--clip", type=float, help="gradient norm clipping (default 1; 0: none)")
    distill.add_argument("--logits-weight", type=float, help="weight of the logits KL (default 1)")
    distill.add_argument("--hidden-weight", type=float, help="weight of the per-layer state loss (default 1)")
    distill.add_argument("--cosine-weight", type=float, help="weight of the embedding cosine (default 1)")
    distill.add_argument("--temperature", type=float, help="of the logits KL (default 1)")
    distill.add_argument("--no-teacher", dest="teacher", action="store_false", default=None,
                         help="plain fine-tuning on the model's own loss instead (LMs; a baseline)")  # fmt: skip
    distill.add_argument("--teacher-dtype", choices=("float32", "bfloat16", "float16"), help="default float32")
    distill.add_argument("--teacher-device", help="where the teacher runs (default: --device)")
    distill.add_argument("--held-out", type=float, help="fraction of --data held out without --eval (default 0.1)")
    distill.add_argument("--eval-windows", type=int, help="held-out windows evaluated (default 64)")
    distill.add_argument("--eval-every", type=int, help="steps between evaluations (default: 10 of them)")
    distill.add_argument("--calibration", type=int, help="windows of the dense Fisher and input norms (default 16)")
    distill.add_argument("--dropout", action="store_true", default=None, help="the student's dropout on")
    distill.add_argument("--fuse-mlp", action="store_true", default=None, help="run known MLPs as one SparseMLP")
    distill.add_argument("--seed", type=int, help="of batches and masking (default 0)")
    distill.add_argument("--device", help="default cuda when there is one, else cpu")
    distill.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    distill.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    distill.add_argument("--stop-after", type=int, help="stop after this many steps (continue with --resume)")
    distill.add_argument("--allow-random-ids", action="store_true",
                         help="a folder without a tokenizer trains on random token ids")  # fmt: skip
    distill.set_defaults(run=_distill, command_parser=distill)

    report = commands.add_parser("report", help="one Markdown page of the stored benchmark and accuracy results")
    report.add_argument("--results", default="benchmarks/results", help="results folder (default benchmarks/results)")
    report.add_argument("--out", help="the page to write (default RESULTS/REPORT.md)")
    report.add_argument("--model", metavar="FOLDER", help="print a sparse model folder's model-card section instead")
    report.set_defaults(run=_report)

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
    _add_fp32_precision(bench_spmm)
    _add_quantize(bench_spmm)
    bench_spmm.add_argument("--name", default="spmm", help="result file stem (default spmm)")
    bench_spmm.add_argument("--out", help="folder for spmm.json and plots (default benchmarks/results/<gpu>)")
    bench_spmm.set_defaults(run=_bench_spmm)

    bench_decode = benches.add_parser("decode", help="Y = X·Wᵀ at 1-64 tokens on Llama-1B/8B MLP shapes")
    bench_decode.add_argument("--quick", action="store_true", help="1 and 16 tokens, 50%% and 90%%, block 64")
    _add_quantize(bench_decode)
    bench_decode.add_argument("--shapes", help="comma-separated, of llama_1b|llama_8b _up|_down|_mlp (default all)")
    _add_grid(bench_decode)
    bench_decode.add_argument("--name", default="decode", help="result file stem (default decode)")
    bench_decode.add_argument("--out", help="folder for decode.json (default benchmarks/results/<gpu>)")
    bench_decode.set_defaults(run=_bench_decode)

    bench_mlp = benches.add_parser("mlp", help="whole ViT-B and Llama MLPs, fused and unfused, 1 to 50k tokens")
    bench_mlp.add_argument("--quick", action="store_true", help="fewest and most tokens, 50%% and 90%%, block 64")
    _add_quantize(bench_mlp)
    bench_mlp.add_argument("--shapes", default="vit_b,llama_1b,llama_8b", help="comma-separated MLP shapes")
    _add_grid(bench_mlp)
    bench_mlp.add_argument("--name", default="mlp", help="result file stem (default mlp)")
    bench_mlp.add_argument("--out", help="folder for mlp.json (default benchmarks/results/<gpu>)")
    bench_mlp.set_defaults(run=_bench_mlp)

    what = "whole models: ViT-B/16 images/s, Llama decode tokens/s and prefill, encoder sentences/s"
    bench_e2e = benches.add_parser("e2e", help=what)
    models = "vit_b_16, llama-3.2-1b, llama-3.1-8b or a HF folder (causal LM, ViT or BERT-style encoder)"
    bench_e2e.add_argument("--model", required=True, help=models)
    # the defaults are e2e.DEFAULT_GRIDS, by model kind (ViT, Llama-style causal LM, BERT-style encoder)
    for option, what, default in [
        ("batches", "batch sizes", "ViT 1,16,64,256,512; Llama 1,8; encoder 1,32,256"),
        ("dtypes", "bf16,fp32", "ViT and encoder bf16,fp32; Llama bf16"),
        ("sparsities", "sparsities", "ViT 0.7,0.8,0.9; Llama 0.8,0.9,0.95; encoder 0.5,0.7,0.9"),
        ("blocks", "block sizes", "ViT 16,32,64; Llama 64; encoder 16,32"),
        ("targets", "target sets, each presets joined by +", "ViT mlp,mlp+attention; the others mlp"),
        ("modes", "eager,compiled,cuda_graph,compiled_graph", "ViT eager,compiled; Llama cuda_graph; "
                                                              "encoder eager,cuda_graph"),
        ("impls", "sparse paths: torch_bsr,sparseblocks, and ours on quantized tiles: sparseblocks_int8,"
                  "sparseblocks_fp8,sparseblocks_fp8_w8a8; dense_fp8, the targeted linears in dense fp8 (16-bit "
                  "models)", "torch_bsr,sparseblocks"),
    ]:  # fmt: skip
        bench_e2e.add_argument(f"--{option}", help=f"comma-separated {what} (default: {default})")
    bench_e2e.add_argument("--prefill-tokens", type=int, help="causal LMs: the timed prefill's tokens (default 2048; "
                                                              "0: decode only)")  # fmt: skip
    bench_e2e.add_argument("--dry-run", action="store_true", help="tiny inputs, two repeats; runs on a CPU")
    _add_fp32_precision(bench_e2e)
    bench_e2e.add_argument("--name", default="e2e", help="result file stem (default e2e)")
    bench_e2e.add_argument("--out", help="folder for e2e.json (default benchmarks/results/<gpu>)")
    bench_e2e.set_defaults(run=_bench_e2e)

    bench_train = benches.add_parser("train", help="forward+backward of layers and MLPs, a GPT training step")
    bench_train.add_argument("--quick", action="store_true", help="90%% sparsity, blocks 64/128, a 4-layer GPT")
    bench_train.add_argument(
        "--sections", default="linear,mlp,train_step,convergence", help="comma-separated, from the default"
    )
    bench_train.add_argument("--shapes", default="vit_b,llama_1b", help="MLP shapes of the layer sections")
    bench_train.add_argument(
        "--models", default="gpt2_small,llama-3.2-1b", help="models of the train_step section (comma-separated)"
    )
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
