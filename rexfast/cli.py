"""The ``rexfast`` command line: info, train, eval, predict, demo, convert, export, serve.

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
    from .metrics import format_table

    if args.predictions is not None:
        metrics = _eval_predictions_file(args)
    else:
        from .engine.evaluator import evaluate_checkpoint

        if args.checkpoint is None:
            raise ValueError("eval needs --checkpoint M (evaluate a model) or --predictions F --config C "
                             "(score a predictions file)")
        if args.config is not None:
            raise ValueError("--config goes with --predictions; a checkpoint carries its own config "
                             "(change it with --set)")
        metrics = evaluate_checkpoint(
            args.checkpoint, split=args.split, overrides=args.set or [], out=args.out, batch_size=args.batch_size,
            device=args.device, max_samples=args.max_samples, tokenizer=args.tokenizer, precision=args.precision,
            compile=args.compile, save_predictions=args.save_predictions, progress=not args.no_progress,
        )
    print(format_table(metrics))
    return 0


def _flags_belong(given: list) -> str:
    """``--a belongs`` / ``--a, --b belong``: the flags a form does not take, as a sentence's subject."""
    return f"{', '.join(given)} {'belongs' if len(given) == 1 else 'belong'}"


def _eval_predictions_file(args) -> dict:
    """``eval --predictions F --config C``: score a file; the model-only flags make no sense here."""
    from .engine.evaluator import score_predictions

    given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--save-predictions", args.save_predictions),
                                      ("--tokenizer", args.tokenizer), ("--compile", args.compile)) if value]
    if given:
        raise ValueError(f"--predictions scores a file; {_flags_belong(given)} to evaluating a model")
    if args.config is None:
        raise ValueError("--predictions needs --config C: the config whose data section names the dataset")
    return score_predictions(args.predictions, args.config, split=args.split, overrides=args.set or [],
                             out=args.out, max_samples=args.max_samples)


def _cmd_predict(args) -> int:
    if _predict_form(args) != "--image":
        return _cmd_predict_batch(args)
    from .engine.predictor import predict_to_files

    mask_threshold, no_target_threshold = _predict_thresholds(args)
    written, result = predict_to_files(
        args.checkpoint, args.image, args.text, out_dir=args.out_dir or ".", mask_threshold=mask_threshold,
        no_target_threshold=no_target_threshold, device=args.device, tokenizer=args.tokenizer,
        overrides=args.set or [], precision=args.precision, compile=args.compile, explain=args.explain)
    print(result.explanation)  # what was found, or which rule said "no target"
    for path in written:
        print(path)
    return 0


def _predict_thresholds(args) -> tuple:
    """(mask threshold, no-target threshold) from --mask-threshold / --no-target-threshold, or
    the deprecated --threshold that sets both (with a warning on stderr)."""
    from .engine.inference import MASK_THRESHOLD, NO_TARGET_THRESHOLD, check_threshold

    mask_threshold, no_target_threshold = args.mask_threshold, args.no_target_threshold
    if args.threshold is not None:
        if mask_threshold is not None or no_target_threshold is not None:
            raise ValueError("--threshold (deprecated) sets both thresholds: give it alone, or use --mask-threshold "
                             "and --no-target-threshold")
        if _rank() == 0:
            print("rexfast: warning: --threshold is deprecated: it sets both --mask-threshold and "
                  "--no-target-threshold; give those instead", file=sys.stderr)
        mask_threshold = no_target_threshold = args.threshold
    mask_threshold = MASK_THRESHOLD if mask_threshold is None else mask_threshold
    no_target_threshold = NO_TARGET_THRESHOLD if no_target_threshold is None else no_target_threshold
    return (check_threshold(mask_threshold, "--mask-threshold"),
            check_threshold(no_target_threshold, "--no-target-threshold"))


# ----------------------------------------------------------------------------- predict: the batch forms
# the batch forms' own flags; --full-decode is not among them: --image always decodes in full (its
# overlay is drawn on the full image), so there it is accepted and changes nothing
BATCH_FLAGS = (("--batch-size", "batch_size"), ("--workers", "workers"), ("--save-masks", "save_masks"),
               ("--save-overlays", "save_overlays"), ("--skip-bad", "skip_bad"), ("--overwrite", "overwrite"))


def _predict_form(args) -> str:
    """Which of the three forms: --image (one pair), --pairs (a pairs file), --images (a folder)."""
    forms = [flag for flag, value in (("--image", args.image), ("--pairs", args.pairs), ("--images", args.images))
             if value is not None]
    if len(forms) != 1:
        raise ValueError("give exactly one of --image FILE (with --text), --pairs FILE (a .jsonl or .csv of image, "
                         f"text[, id] rows) or --images DIR (with --text){'; got ' + ' and '.join(forms) if forms else ''}")
    form = forms[0]
    if form == "--pairs" and args.text is not None:
        raise ValueError("--text goes with --image or --images; a pairs file has a text column")
    if form != "--pairs" and args.text is None:
        raise ValueError(f"{form} needs --text \"...\": the sentence naming what to segment")
    if form == "--image":
        given = [flag for flag, dest in BATCH_FLAGS if getattr(args, dest) not in (None, False)]
        if given:
            raise ValueError(f"{_flags_belong(given)} to the batch forms (--pairs, --images)")
    elif getattr(args, "explain", False):
        raise ValueError("--explain draws one figure for one pair: it goes with --image, not with --pairs or --images")
    elif args.out_dir is None:
        raise ValueError(f"{form} needs --out-dir D: predictions.jsonl (and the PNGs) go there")
    return form


def _cmd_predict_batch(args) -> int:
    from .data.pairs import folder_pairs, read_pairs
    from .engine.batch_predict import predict_pairs, run_arguments
    from .engine.precision import check_precision

    check_precision(args.precision, "--precision")
    mask_threshold, no_target_threshold = _predict_thresholds(args)
    # every row and image is checked here, before the model loads
    if args.pairs is not None:
        pairs = read_pairs(args.pairs, skip_bad=args.skip_bad)
    else:
        pairs = folder_pairs(args.images, args.text, skip_bad=args.skip_bad)
    overrides = list(args.set or [])
    record = run_arguments(args.checkpoint, pairs, mask_threshold=mask_threshold,
                           no_target_threshold=no_target_threshold, precision=args.precision, overrides=overrides,
                           tokenizer=args.tokenizer, save_masks=args.save_masks, save_overlays=args.save_overlays,
                           full_decode=args.full_decode)

    def load(device):
        from .engine.segmenter import Segmenter

        segmenter = Segmenter.from_pretrained(args.checkpoint, device=device, precision=args.precision,
                                              compile=args.compile, tokenizer=args.tokenizer, overrides=overrides,
                                              mask_threshold=mask_threshold, no_target_threshold=no_target_threshold)
        segmenter.processor.reduce_large_jpegs = not args.full_decode
        return segmenter

    summary = predict_pairs(pairs, args.out_dir, load, record, batch_size=args.batch_size or 8, workers=args.workers,
                            save_masks=args.save_masks, save_overlays=args.save_overlays, skip_bad=args.skip_bad,
                            overwrite=args.overwrite, progress=not args.no_progress, device=args.device)
    if _rank() == 0:
        print(f"rexfast predict: {summary.line()}")
    return 0


def _predict_batch_flags(p) -> None:
    p.add_argument("--pairs", metavar="FILE",
                   help="predict every row of a .jsonl or .csv pairs file (columns image, text, optional id; image "
                        "paths relative to the file) into --out-dir/predictions.jsonl")
    p.add_argument("--images", metavar="DIR",
                   help="predict --text on every image in DIR (sorted; the id is the file name)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="pairs per model call (default 8)")
    p.add_argument("--workers", type=_non_negative_int, default=None,
                   help="DataLoader worker processes decoding the images (default min(2, the CPUs this process may "
                        "run on); 0: in the main process)")
    p.add_argument("--save-masks", action="store_true", help="also write D/masks/<id>.png (0/255, empty for "
                                                              "'no target')")
    p.add_argument("--save-overlays", action="store_true", help="also write D/overlays/<id>.png")
    p.add_argument("--full-decode", action="store_true",
                   help="decode every JPEG in full (by default a JPEG whose shorter side is at least 4 times the "
                        "model's input side is decoded at the 1/2, 1/4 or 1/8 scale that keeps at least twice that "
                        "side: much faster, and 99.7-99.98%% of mask pixels agree); --image always decodes in full")
    p.add_argument("--skip-bad", action="store_true",
                   help="write bad rows (missing or unreadable image, empty text, ...) as {\"id\", \"error\"} lines "
                        "and go on, instead of stopping before the model loads")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out-dir that holds predictions of a run with other arguments (a rerun "
                        "with the same arguments continues where it stopped)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")


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
    from .engine.loading import load_model

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


def _cmd_serve(args) -> int:
    import socket

    from .engine.segmenter import Segmenter

    # cheap checks first: nothing is loaded for a port that is taken or a folder that is missing
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must lie in 1..65535, got {args.port}")
    if not args.max_megapixels > 0:
        raise ValueError(f"--max-megapixels must be > 0, got {args.max_megapixels}")
    try:
        from .serve import ServeLimits, build_app, launch
        from .serve.examples import demo_data_root, demo_examples, folder_examples
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    examples = folder_examples(args.examples) if args.examples else None
    try:
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.bind((args.host, args.port))
    except OSError as exc:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}): pick another --port") from None
    limits = ServeLimits(max_pixels=int(args.max_megapixels * 1e6), concurrency=args.concurrency,
                         max_queue=args.max_queue, max_file_size=args.max_upload_mb * 1024 * 1024)
    segmenters = [Segmenter.from_pretrained(source, device=args.device, precision=args.precision,
                                            tokenizer=args.tokenizer) for source in args.models]
    names = [type(seg.model).__name__ for seg in segmenters]
    named = {(f"{n} {i + 1}" if names.count(n) > 1 else n): seg for i, (n, seg) in enumerate(zip(names, segmenters))}
    if examples is None:
        for source, seg in zip(args.models, segmenters):
            root = demo_data_root(source, seg.config)
            if root is not None:
                examples = demo_examples(root)
                break
    app = build_app(named, examples=examples, limits=limits, sources=[str(m) for m in args.models])
    shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
    print(f"rexfast: serving {', '.join(named)} at http://{shown}:{args.port} "
          f"({len(examples or [])} example rows; Ctrl+C stops)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"rexfast: warning: --host {args.host} makes the page reachable from other machines", file=sys.stderr)
    try:
        launch(app, host=args.host, port=args.port, block=True, quiet=True)
    except OSError as exc:
        raise ValueError(f"cannot serve on {args.host}:{args.port}: {exc}") from None
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


def _int_at_least(minimum: int, kind: str):
    """An argparse type: an integer >= ``minimum``, else a usage error naming ``kind``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


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


THREADS_HELP = ("torch's CPU threads for the model (torch.set_num_threads; default: torch's, one per core). "
                "On a machine shared with other busy processes, give the cores they leave free: bf16 slows "
                "several-fold when its threads wait for a core another process holds")


def _threads_flag(p) -> None:
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N", help=THREADS_HELP)


def _set_threads(threads) -> None:
    """``--threads N``: checked against the machine's CPUs, then ``torch.set_num_threads(N)``
    before any model loads (a thread pool sized once, for the whole command)."""
    if threads is None:
        return
    from .engine.device import usable_cpus

    cpus = usable_cpus()
    if threads > cpus:
        raise ValueError(f"--threads {threads} is more than the {cpus} CPU{'' if cpus == 1 else 's'} this process "
                         "may run on: more threads than cores only make them wait for each other")
    import torch

    torch.set_num_threads(threads)


def _precision_flags(p, default, compile_too=True):
    from .engine.precision import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default=default, help=PRECISION_HELP)
    if compile_too:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the inference graph (the first call compiles: minutes on a small CPU)")


def _eval_predictions_flags(p) -> None:
    p.add_argument("--predictions", metavar="F",
                   help="score this predictions file (JSONL, one line per sentence: id = the dataset's sentence id, "
                        "segmentation = COCO RLE) instead of a model; needs --config")
    p.add_argument("--config", metavar="C", help="with --predictions: the config whose data section names the dataset")
    p.add_argument("--save-predictions", metavar="F",
                   help="with --checkpoint: also write every prediction to this JSONL file (what --predictions reads)")


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
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value (model.FIELD also sets a runtime option, e.g. model.ops_backend="
                        "reference). Experimental, not released and measured as a loss on the demo (README): "
                        "model.mask_stride=2 (ReLA), data.no_target_repeat=R")
    p.add_argument("--out", help="output directory (train.out_dir)")
    p.add_argument("--resume", metavar="CKPT", help="continue exactly from a training checkpoint (last.pt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default=None,
                   help=f"CPU training precision (train.precision; bf16 is autocast): {PRECISION_HELP}")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint, or score a predictions file, on a split; prints and "
                                     "writes the metric table")
    p.add_argument("--checkpoint", help=MODEL_SOURCE_HELP)
    _eval_predictions_flags(p)
    p.add_argument("--split", default=None, help="split name (default: the config's val split)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override e.g. data.root; model.FIELD a model config field, or a runtime option that the "
                        "evaluated model keeps (e.g. model.ops_backend=reference)")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="samples per forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--max-samples", type=_positive_int, default=None, help="evaluate the first N samples only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    _precision_flags(p, "fp32")
    _threads_flag(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="segment what a sentence names in an image, or in every pair of a pairs file or folder")
    p.add_argument("--checkpoint", required=True, help=MODEL_SOURCE_HELP)
    p.add_argument("--image", help="one image file (JPEG, PNG, ...; with --text); or see --pairs, --images")
    p.add_argument("--text", help="the sentence naming what to segment (with --image or --images)")
    p.add_argument("--out-dir", default=None,
                   help="--image: where <image>_<sentence>_<hash>_mask.png and ..._overlay.png go (one pair per "
                        "sentence; default .); --pairs/--images: where predictions.jsonl goes")
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
    p.add_argument("--explain", action="store_true",
                   help="also write <...>_explain.png: what the model grouped (CGFormer: each token's pixels per "
                        "decoder stage; ReLA: the minimap and the strongest region masks it weights)")
    _precision_flags(p, "auto")
    _threads_flag(p)
    _predict_batch_flags(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("demo", help="synthetic GRES data → train a small ReLA or CGFormer → evaluate → overlays")
    p.add_argument("--model", default="rela", choices=("rela", "cgformer"),
                   help="the model to train: rela (default) or cgformer (with its no-target head)")
    p.add_argument("--out", default="runs/demo", help="the folder for the data, the run, the tables and the figures")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test that every stage runs, not a demonstration: 96 training images, 6 steps, "
                        "32 test images, so its 'trained' column means nothing; about 25 s on a quiet 2-core CPU")
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
                        "(repeatable; the error message names the ones needed). Runtime options (model.ops_backend, "
                        "...) are refused: a model folder does not hold them")
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

    p = sub.add_parser("serve", help="a local web page (Gradio) for one or more models: image + sentence → mask, "
                                     "side by side, what each model grouped, and an API (needs the serve extra)")
    p.add_argument("models", nargs="+", metavar="MODEL", help=f"one or more models, answering side by side: "
                                                             f"{MODEL_SOURCE_HELP}")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to others)")
    p.add_argument("--port", type=int, default=7860, help="the port to listen on")
    p.add_argument("--examples", metavar="DIR",
                   help="example rows: the images in DIR (a sentence for photo.jpg may sit in photo.txt); default: "
                        "the held-out synthetic scenes of a model trained by rexfast demo")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("--concurrency", type=_positive_int, default=1,
                   help="requests computed at once (default 1: torch already uses every core for one)")
    p.add_argument("--max-queue", type=_positive_int, default=64, help="requests waiting beyond those (default 64)")
    p.add_argument("--max-upload-mb", type=_positive_int, default=50, help="the largest upload in MiB (default 50)")
    p.add_argument("--max-megapixels", type=float, default=50.0,
                   help="the largest image, width × height in millions (default 50): a decompression-bomb guard")
    _precision_flags(p, "auto", compile_too=False)
    _threads_flag(p)
    p.set_defaults(func=_cmd_serve)
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
        _set_threads(getattr(args, "threads", None))  # predict, eval, serve: before anything loads
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
