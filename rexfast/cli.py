"""The ``rexfast`` command line: info, train, eval, predict, demo, convert, export.

Bad input (missing file, unreadable image, empty text, wrong checkpoint, bad
config) ends with one ``rexfast: error: ...`` line on stderr and exit code 2
(under torchrun only rank 0 prints it; every rank exits with 2); outputs are
written atomically, so nothing is left half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

USER_ERRORS = (FileNotFoundError, ValueError, TypeError, KeyError, PermissionError, IsADirectoryError,
               NotADirectoryError, FileExistsError)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _cmd_info(args) -> int:
    import rexfast

    info = rexfast.info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    ops = info.pop("ops")
    width = max(map(len, info))
    for key, value in info.items():
        if key.startswith("backends_"):
            continue
        print(f"{key:<{width}}  {value}")
    for op, per_device in ops.items():
        for device, backends in per_device.items():
            if device == "cuda" and not info["cuda_available"]:
                continue
            runs = [b for b, why in backends.items() if why == "available"]
            print(f"{op} on {device}: {', '.join(runs)}")
            for b, why in backends.items():
                if why != "available":
                    print(f"    {b}: {why}")
    return 0


def _config_needed() -> str:
    """The message for ``train`` without ``--config``: what a config is and the ones at hand
    (the repository's ``configs/``, looked for beside the package and in the current folder)."""
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent
    for folder in (here / "configs", Path.cwd() / "configs"):
        found = sorted(p.name for p in folder.glob("*.y*ml")) + sorted(p.name for p in folder.glob("*.json"))
        if found:
            return (f"train needs a config: --config FILE (YAML or JSON with sections data, model, train); the "
                    f"configs in {folder}: {', '.join(found)} (or `rexfast demo` trains on synthetic data with none)")
    return ("train needs a config: --config FILE (YAML or JSON with sections data, model, train); no configs/ folder "
            "was found beside the package or in the current folder (the source repository's configs/ holds "
            "examples; `rexfast demo` trains on synthetic data with none)")


def _cmd_train(args) -> int:
    from .engine.config import load_config
    from .engine.trainer import train

    if not args.config and not args.set:  # a run may be given entirely as --set section.key=value
        raise ValueError(_config_needed())
    overrides = list(args.set or [])
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    cfg = load_config(args.config, overrides)
    summary = train(cfg, resume=args.resume, progress=not args.no_progress)
    if _rank() == 0:
        print(json.dumps(summary, indent=1))
    return 0


def _cmd_eval(args) -> int:
    from .engine.evaluator import evaluate_checkpoint
    from .metrics import format_table

    metrics = evaluate_checkpoint(
        args.checkpoint, split=args.split, overrides=args.set or [], out=args.out, batch_size=args.batch_size,
        device=args.device, max_samples=args.max_samples, tokenizer=args.tokenizer, precision=args.precision,
        compile=args.compile, progress=not args.no_progress,
    )
    print(format_table(metrics))
    return 0


def _cmd_predict(args) -> int:
    from .engine.inference import MASK_THRESHOLD, NO_TARGET_THRESHOLD
    from .engine.predictor import predict_to_files

    mask_threshold, no_target_threshold = args.mask_threshold, args.no_target_threshold
    if args.threshold is not None:
        if mask_threshold is not None or no_target_threshold is not None:
            raise ValueError("--threshold (deprecated) sets both thresholds: give it alone, or use --mask-threshold "
                             "and --no-target-threshold")
        print("rexfast: warning: --threshold is deprecated: it sets both --mask-threshold and "
              "--no-target-threshold; give those instead", file=sys.stderr)
        mask_threshold = no_target_threshold = args.threshold
    written, result = predict_to_files(
        args.checkpoint, args.image, args.text, out_dir=args.out_dir,
        mask_threshold=MASK_THRESHOLD if mask_threshold is None else mask_threshold,
        no_target_threshold=NO_TARGET_THRESHOLD if no_target_threshold is None else no_target_threshold,
        device=args.device, tokenizer=args.tokenizer, overrides=args.set or [], precision=args.precision,
        compile=args.compile)
    print(result.explanation)  # what was found, or which rule said "no target"
    for path in written:
        print(path)
    return 0


def _cmd_demo(args) -> int:
    from .engine.demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick, minutes=args.minutes, seed=args.seed, progress=not args.no_progress,
             model=args.model, precision=args.precision, compile=args.compile)
    return 0


def _cmd_convert(args) -> int:
    from .engine.convert import convert_official

    out = convert_official(args.official, args.out, model=args.model, tokenizer=args.tokenizer,
                          overrides=args.set or [])
    if not args.tokenizer:
        print("rexfast: note: no --tokenizer given, so the folder holds none; predict and eval will need "
              "--tokenizer (convert again with --tokenizer DIR for a self-contained folder)", file=sys.stderr)
    print(out)
    return 0


def _cmd_export(args) -> int:
    from .io import check_output_file

    # cheap checks first: nothing is loaded for a path that cannot be written
    out = check_output_file(args.out, "ONNX file")
    from .engine.builders import load_model

    loaded = load_model(args.checkpoint, device="cpu", overrides=args.set or [], require_tokenizer=False)
    model = loaded.model
    size = args.image_size or loaded.preprocessing.image_size  # the size the model was trained at
    try:
        from .engine.exporting import preprocessing_metadata
        from .export import export_onnx

        result = export_onnx(model, out, image_size=size, mode=args.mode, opset=args.opset,
                             verify=not args.no_verify,
                             metadata=preprocessing_metadata(loaded.config, loaded.tokenizer))
    except ImportError as exc:  # the export extra is missing
        raise ValueError(str(exc)) from None
    print(json.dumps({
        "onnx": str(result.path), "model": result.model_type, "mode": result.mode, "opset": result.opset,
        "image_size": list(result.image_size), "inputs": list(result.input_names), "outputs": list(result.output_names),
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in result.dynamic_axes.items()},
        "rexfast_nodes": {op: n for (domain, op), n in sorted(result.op_counts.items()) if domain == "rexfast"},
        "megabytes": round(result.bytes / 2**20, 2),
        "onnxruntime_vs_torch_max_abs_error": result.max_abs_error or "not verified (--no-verify)",
    }, indent=1))
    return 0


def _image_size(text: str):
    """``480`` or ``480x640`` (height x width), positive multiples of 32."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or HxW, got {text!r}") from None
    if len(values) not in (1, 2) or any(v <= 0 or v % 32 for v in values):
        raise argparse.ArgumentTypeError(f"image size must be positive multiples of 32 (H or HxW), got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (where it has one worth showing: not None, not the
    off state of a flag, not one the help already states), descriptions kept as written."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "%(default)" in help or "default" in help.lower() or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS or not action.option_strings:
            return help
        return help + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in the same one-line form (exit 2) and the defaults in the help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if _rank() == 0:
            print(f"rexfast: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


MODEL_SOURCE_HELP = ("a model folder, a training checkpoint (best.pt, last.pt), the authors' released .pth (with "
                     "--tokenizer) or a Hugging Face Hub id owner/name (read from its cache; downloaded only when "
                     "not cached and HF_HUB_OFFLINE is unset)")
TOKENIZER_HELP = ("a local vocab.txt or BERT folder: needed with a released .pth or a model folder written before "
                  "folders stored their tokenizer; replaces the source's own otherwise")
DESCRIPTION = ("Referring expression segmentation (CGFormer, ReLA): train, evaluate, predict, export.\n"
               "Bad input ends with one 'rexfast: error: ...' line and exit code 2, before any long work.")
DEVICE_HELP = "auto (the first GPU when torch sees one, else cpu), cpu, cuda, cuda:N or mps"
VERBOSE_HELP = "log which backend each op runs, and more (also accepted after the command)"
PRECISION_HELP = ("fp32 | bf16 | auto (bf16 where the CPU has native bf16: AMX or AVX512-BF16; fp32 elsewhere; "
                  "on a GPU auto keeps fp32 weights)")


def _precision_flags(p, default, compile_too=True):
    from .engine.precision import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default=default, help=PRECISION_HELP)
    if compile_too:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the inference graph (the first call compiles: minutes on a small CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rexfast", description=DESCRIPTION, epilog="Each command's options: rexfast COMMAND --help.")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="versions, built extensions, the backends each op can run, device")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object (for scripts)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("train", help="train from a config file (works under torchrun for DDP)")
    p.add_argument("--config", help="YAML/JSON config (sections data, model, train): see configs/; needed unless "
                                    "--set gives the whole run")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--out", help="output directory (train.out_dir)")
    p.add_argument("--resume", metavar="CKPT", help="continue exactly from a training checkpoint (last.pt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default=None,
                   help=f"CPU training precision (train.precision; bf16 is autocast): {PRECISION_HELP}")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a split; prints and writes the metric table")
    p.add_argument("--checkpoint", required=True, help=MODEL_SOURCE_HELP)
    p.add_argument("--split", default=None, help="split name (default: the config's val split)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override e.g. data.root")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="samples per forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--max-samples", type=_positive_int, default=None, help="evaluate the first N samples only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    _precision_flags(p, "fp32")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="segment what a sentence names in one image")
    p.add_argument("--checkpoint", required=True, help=MODEL_SOURCE_HELP)
    p.add_argument("--image", required=True, help="the image file (JPEG, PNG, ...)")
    p.add_argument("--text", required=True, help='the referring expression, e.g. "the red circle on the left"')
    p.add_argument("--out-dir", default=".",
                   help="where <image>_<sentence>_<hash>_mask.png and ..._overlay.png go (one pair per sentence)")
    p.add_argument("--mask-threshold", type=float, default=None, metavar="P",
                   help="a pixel is in the mask where its mask probability exceeds P (0 < P < 1; default 0.5, "
                        "the authors' evaluators')")
    p.add_argument("--no-target-threshold", type=float, default=None, metavar="P",
                   help="the answer is 'no target' where the no-target head's probability exceeds P (0 < P < 1; "
                        "default 0.5, the authors' evaluators'); a model without the head says 'no target' for an "
                        "empty mask")
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="deprecated: sets both --mask-threshold and --no-target-threshold to P")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a model config field (model.eval_noise=false) or the input "
                        "(data.image_size=480, data.max_tokens=20)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    _precision_flags(p, "auto")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("demo", help="synthetic GRES data → train a small ReLA or CGFormer → evaluate → overlays")
    p.add_argument("--model", default="rela", choices=("rela", "cgformer"),
                   help="the model to train: rela (default) or cgformer (with its no-target head)")
    p.add_argument("--out", default="runs/demo", help="the folder for the data, the run, the tables and the figures")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test that every stage runs, not a demonstration: 96 training images, 6 steps, "
                        "32 test images, so its 'trained' column means nothing")
    p.add_argument("--minutes", type=float, default=15.0, help="training time budget (full mode)")
    p.add_argument("--seed", type=int, default=0, help="data, initial weights and sampling")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs and CI)")
    _precision_flags(p, "fp32")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("convert", help="turn the authors' released .pth into a self-contained model folder")
    p.add_argument("--official", required=True,
                   help="the released checkpoint (.pth); any other model source (best.pt, a folder) converts too")
    p.add_argument("--out", required=True, help="the model folder to write (config.json, model.safetensors, "
                                                "tokenizer, preprocessor_config.json, README.md)")
    p.add_argument("--tokenizer", help="the bert-base-uncased vocab.txt or folder the model was trained with: "
                                       "stored in the folder, so nothing else is needed to use it")
    p.add_argument("--model", default="auto", help="cgformer | rela | auto (from the checkpoint's keys)")
    p.add_argument("--set", action="append", metavar="model.FIELD=VALUE",
                   help="a model config field the weights cannot tell, e.g. model.swin.pwam_heads=[8,8,8,8] "
                        "(repeatable; the error message names the ones needed)")
    p.set_defaults(func=_cmd_convert)

    from .export import MODES, OPSETS

    p = sub.add_parser("export", help="export a checkpoint or model folder to ONNX (onnxruntime, TensorRT)")
    p.add_argument("--checkpoint", required=True, help=MODEL_SOURCE_HELP)
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--mode", choices=MODES, default="decomposed",
                   help="decomposed: standard ONNX operators only; hybrid: one rexfast::<op> node per op (a "
                        "TensorRT plugin when registered) with a local function holding its decomposition")
    p.add_argument("--image-size", type=_image_size, default=None, metavar="H[xW]",
                   help="the one input size of the file, multiples of 32 (default: the model's training size)")
    p.add_argument("--opset", type=int, choices=OPSETS, default=18, help="ONNX opset (TensorRT 10 parses up to 20)")
    p.add_argument("--no-verify", action="store_true", help="skip running the file with onnxruntime")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a model config field before exporting, e.g. model.eval_noise=false, or data.image_size "
                        "(repeatable)")
    p.set_defaults(func=_cmd_export)
    for command in sub.choices.values():  # -v after the command too; SUPPRESS leaves the top-level value alone
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def _one_line_warnings(fallback):
    """A ``warnings.showwarning`` that prints rexfast's own warnings (input cut or unknown, ...)
    as one ``rexfast: warning:`` line on rank 0 and hands everyone else's to ``fallback``."""

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.split(".")[0] != "rexfast":
            return fallback(message, category, filename, lineno, file, line)
        if _rank() == 0:
            print(f"rexfast: warning: {message}", file=sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("rexfast").setLevel(logging.INFO)
    from .models.loading import CheckpointError

    previous = warnings.showwarning
    warnings.showwarning = _one_line_warnings(previous)
    try:
        return args.func(args)
    except (CheckpointError, *USER_ERRORS) as exc:
        if _rank() == 0:  # under torchrun the other ranks exit quietly with the same code
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"rexfast: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rexfast: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
