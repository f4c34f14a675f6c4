"""Training loop: single process or torchrun DDP, AMP, accumulation, exact resume.

Exact resume means a run killed after any checkpoint and resumed with
``--resume`` ends with the same weights as an uninterrupted run with the same
seed. It rests on three things: the data order is a pure function of
(seed, epoch, step) (``sampling.py``); model randomness (dropout, Gumbel
seeds) comes from the torch RNG, re-seeded before every micro-batch from
(seed, step, step-global micro-batch index) — which also makes two DDP ranks
equal one process accumulating two micro-batches; and checkpoints are only
taken at optimizer-step boundaries.

Everything that can fail on bad input (config, data, resume checkpoint, model
and input size) is checked before the run folder is created. The optimizer
groups are the model's (``param_groups``: the released per-group learning rates
and weight decays). Under a time budget the training clock excludes
evaluation; validation then also runs every ``train.eval_every_min`` minutes on
a fixed subset so the curve and ``best.pt`` mean something.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ..data import collate, task_of
from ..io import check_output_dir
from ..models.preprocessing import Preprocessing
from ..models.tokenizer import vocab_of
from . import builders, checkpoint, distributed, sampling
from .config import Config, save_config
from .evaluator import evaluate
from .precision import check_precision

log = logging.getLogger("rexfast")

CRASH_ENV = "REXFAST_TEST_CRASH_AFTER_STEP"  # tests: die abruptly after this optimizer step


def amp_dtype_of(mode: str, device: torch.device, precision: str = "fp32"):
    """The autocast dtype of a training run. On a GPU ``train.amp`` decides (auto: bf16);
    on a CPU an explicit ``train.amp`` wins, and ``auto`` hands over to ``train.precision``."""
    from .precision import resolve_precision

    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if resolve_precision(precision, device, name="train.precision") == "bf16" else None
    if mode == "off":
        return None
    if mode in ("bf16", "fp16"):
        return torch.bfloat16 if mode == "bf16" else torch.float16
    raise ValueError(f"train.amp must be auto, bf16, fp16 or off, got {mode!r}")


def _schedule(cfg: Config, total_steps: int, clock: dict):
    """LR factor per step. Under a time budget the decay follows whichever is
    further along: steps or the budget's elapsed fraction (``clock``)."""
    warm, kind = cfg.train.warmup_steps, cfg.train.schedule

    milestones = sorted(cfg.train.lr_steps or [])

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        if kind == "step":  # detectron2's multi-step schedule (ReLA: x0.1 at 110k and 140k)
            return cfg.train.lr_gamma ** sum(step >= m for m in milestones)
        t = min(1.0, max((step - warm) / max(1, total_steps - warm), clock.get("fraction", 0.0)))
        return 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else (1 - t) ** 0.9

    return factor


def validate_train_config(cfg: Config) -> None:
    """Every train/data setting that would otherwise fail mid-run."""
    tc = cfg.train
    if tc.schedule not in ("poly", "cosine", "constant", "step"):
        raise ValueError(f"train.schedule must be poly, cosine, constant or step, got {tc.schedule!r}")
    if tc.schedule == "step" and not (isinstance(tc.lr_steps, list) and tc.lr_steps
                                      and all(isinstance(m, int) and m > 0 for m in tc.lr_steps)):
        raise ValueError(f"train.schedule step needs train.lr_steps, a list of positive step numbers, "
                         f"got {tc.lr_steps!r}")
    check_precision(tc.precision, "train.precision")
    amp_dtype_of(tc.amp, torch.device("cpu"), tc.precision)
    for name in ("epochs", "batch_size", "grad_accum", "log_every", "eval_every"):
        if getattr(tc, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(tc, name)}")
    for name in ("max_steps", "eval_subset"):
        if getattr(tc, name) is not None and getattr(tc, name) < 1:
            raise ValueError(f"train.{name} must be >= 1 (or null), got {getattr(tc, name)}")
    for name in ("time_budget_min", "eval_every_min"):
        if getattr(tc, name) is not None and not getattr(tc, name) > 0:
            raise ValueError(f"train.{name} must be > 0 (or null), got {getattr(tc, name)}")
    if tc.lr <= 0:
        raise ValueError(f"train.lr must be > 0, got {tc.lr}")
    builders.check_input_size(cfg)


def resolve_paths(cfg: Config) -> None:
    """Make the data paths absolute, so checkpoints work from any folder."""
    data = cfg.data
    data.root = str(Path(data.root).resolve())
    if data.image_root:
        data.image_root = str(Path(data.image_root).resolve())
    if data.tokenizer:
        data.tokenizer = str(Path(data.tokenizer).resolve())


class JsonlLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _model_words(section) -> str:
    """"ReLA (preset tiny)" from a model section as a dict."""
    from ..models import registry

    section = section if isinstance(section, dict) else {}
    name = section.get("name", "?")
    try:
        name = registry.get(name).model_class.__name__
    except ValueError:
        pass
    preset = section.get("preset")
    return name + (f" (preset {preset})" if preset else "")


def _check_resume_model(resume, ckpt: dict, cfg: Config) -> None:
    """A checkpoint of another model is one sentence naming both, before any key is compared:
    their state dicts share almost nothing, and listing the keys explains nothing."""
    theirs = ckpt["config"].get("model") if isinstance(ckpt["config"].get("model"), dict) else {}
    if theirs.get("name", cfg.model.name) == cfg.model.name:
        return
    beside = Path(resume).parent / "config.yaml"
    hint = f" (beside it: {beside})" if beside.is_file() else ""
    raise checkpoint.CheckpointError(
        f"--resume {resume} is a training checkpoint of a {_model_words(theirs)}, but the config builds "
        f"a {_model_words(cfg.model.to_dict())}: resume with the config that run was trained with{hint}, or leave "
        "out --resume to start a new run")


def train(cfg: Config, *, resume: str | None = None, progress: bool = True) -> dict:
    """Train; returns a summary with the final step, the best metric and checkpoint paths."""
    info = distributed.init(cfg.train.device)
    try:
        return _train(cfg, info, resume=resume, progress=progress)
    finally:
        distributed.cleanup()


def _train(cfg: Config, info: distributed.DistInfo, *, resume: str | None, progress: bool) -> dict:
    tc = cfg.train
    # ---- everything that can fail on bad input, before anything is written
    validate_train_config(cfg)
    resolve_paths(cfg)
    out_dir = check_output_dir(Path(tc.out_dir).resolve(), "train.out_dir")
    tc.out_dir = str(out_dir)
    tokenizer = builders.build_tokenizer(cfg.data)
    train_set = builders.build_dataset(cfg.data, cfg.data.train_split, train=True, tokenizer=tokenizer)
    val_set = builders.build_dataset(cfg.data, cfg.data.val_split, train=False, tokenizer=tokenizer)
    task = task_of(cfg.data.dataset)
    if cfg.data.no_target_repeat != 1 and info.is_main:
        log.info("training samples per epoch: %d (%d refs; each no-target ref %d times, data.no_target_repeat)",
                 len(train_set), len(train_set.refs), cfg.data.no_target_repeat)
    metric_name = tc.metric if tc.metric != "auto" else ("gIoU" if task == "gres" else "mIoU")
    steps_epoch = sampling.steps_per_epoch(
        len(train_set), micro_batch=tc.batch_size, world=info.world_size, accum=tc.grad_accum
    )
    ckpt = None
    if resume:
        ckpt = checkpoint.load(resume)
        if "optimizer" not in ckpt:
            raise checkpoint.CheckpointError(f"{resume} holds weights only; --resume needs a training checkpoint "
                                             "(last.pt)")
        _check_resume_model(resume, ckpt, cfg)
    torch.manual_seed(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    model = builders.build_model(cfg, tokenizer).to(info.device)
    if ckpt is not None:
        try:
            checkpoint.load_weights(model, ckpt["model"], resume)
        except checkpoint.CheckpointError as exc:  # the same model, another architecture (preset, widths)
            raise checkpoint.CheckpointError(f"--resume {resume}: its {_model_words(ckpt['config'].get('model'))} "
                                             f"weights do not fit the config's {_model_words(cfg.model.to_dict())}: "
                                             f"{str(exc).split(': ', 1)[-1]}") from None
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    core = model
    if info.enabled:
        # The released architectures hold parameters their forward never uses
        # (CGFormer: LoadToken.norm / .mlp), so DDP must look for unused ones every step.
        model = DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                                        find_unused_parameters=True)
    # fused: one kernel for every parameter (on a 2-core CPU the demo's per-tensor AdamW loop was
    # ~10% of a step); the update is the same AdamW, rounded differently in the last bits
    groups = core.param_groups(tc)
    fused = info.device.type in ("cpu", "cuda") and all(p.dtype.is_floating_point for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay, amsgrad=tc.amsgrad,
                                  fused=fused or None)
    total_steps = tc.epochs * steps_epoch if tc.max_steps is None else min(tc.max_steps, tc.epochs * steps_epoch)
    clock: dict = {}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total_steps, clock))
    amp_dtype = amp_dtype_of(tc.amp, info.device, tc.precision)
    if info.is_main:
        from .precision import describe

        mode = (f"autocast {str(amp_dtype).replace('torch.', '')}" if amp_dtype is not None else "fp32")
        why = f"train.amp={tc.amp}" if info.device.type != "cpu" or tc.amp != "auto" else \
            f"train.precision {describe(tc.precision, info.device)}"
        log.info("training precision on %s: %s (%s)", info.device.type, mode, why)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16)

    state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best": None, "best_step": None, "train_seconds": 0.0}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state.update(ckpt["train_state"])
        checkpoint.set_rng_state(ckpt["rng"][min(info.rank, len(ckpt["rng"]) - 1)])
        log.info("resumed from %s at epoch %d, step %d", resume, state["epoch"], state["step"])

    logger = JsonlLog(out_dir / "log.jsonl", info.is_main)
    vocab = vocab_of(tokenizer)
    # best/ is a self-contained model folder: its tokenizer, its input size, and a card
    preprocessing = Preprocessing(image_size=cfg.data.image_size, max_tokens=cfg.data.max_tokens)
    best_card = {"preset": cfg.model.preset, "dataset": cfg.data.dataset,
                 "trained_on": f"{cfg.data.dataset}, split {cfg.data.train_split} (data.root {cfg.data.root})"}

    def save(name: str) -> Path | None:
        rngs = distributed.all_gather_objects(checkpoint.rng_state(), info)
        if not info.is_main:
            return None
        payload = {
            "format": checkpoint.FORMAT,
            "config": cfg.to_dict(),
            "vocab": vocab,
            "model": core.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "train_state": dict(state),
            "rng": rngs,
        }
        return checkpoint.atomic_save(payload, out_dir / name)

    def validate(full: bool) -> None:
        """Evaluate (the whole val split, or its fixed subset), log, keep the best model."""
        metrics = None
        if info.is_main:
            started = time.perf_counter()
            subset = None if full else tc.eval_subset
            metrics = evaluate(core, val_set, task=task, batch_size=tc.batch_size, device=info.device,
                               amp_dtype=amp_dtype, max_samples=subset)
            logger.write(kind="eval", step=state["step"], epoch=state["epoch"], subset=subset, **metrics)
            log.info("eval at step %d: %s", state["step"], metrics)
            if state["best"] is None or metrics[metric_name] > state["best"]:
                state["best"], state["best_step"] = metrics[metric_name], state["step"]
                checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": cfg.to_dict(), "vocab": vocab,
                                        "model": core.state_dict(), "metrics": metrics}, out_dir / "best.pt")
                where = f"{cfg.data.dataset} {cfg.data.val_split}" + (f" (its first {subset} samples)" if subset
                                                                      else "")
                core.save_pretrained(out_dir / "best", tokenizer=tokenizer, preprocessing=preprocessing,
                                     card=dict(best_card, metrics=metrics, metrics_on=f"{where}, at step {state['step']}"))
            clock["eval_seconds"] = clock.get("eval_seconds", 0.0) + time.perf_counter() - started
        # rank 0 owns the best-metric bookkeeping; every rank checkpoints the same state
        state.update(distributed.all_gather_objects(dict(state), info)[0])

    crash_after = int(os.environ.get(CRASH_ENV, "0"))
    budget_s = None if tc.time_budget_min is None else 60.0 * tc.time_budget_min
    periodic_s = None if tc.eval_every_min is None else 60.0 * tc.eval_every_min
    next_eval = (math.floor(state["train_seconds"] / periodic_s) + 1) * periodic_s if periodic_s else None
    resumed_seconds = state["train_seconds"]
    started_at = time.perf_counter()

    def train_seconds() -> float:  # training time so far, evaluation excluded
        return resumed_seconds + time.perf_counter() - started_at - clock.get("eval_seconds", 0.0)

    bar = _progress_bar(progress and info.is_main, budget_s, total_steps, state)
    while state["step"] < total_steps and state["epoch"] < tc.epochs:
        epoch = state["epoch"]
        batches = sampling.rank_micro_batches(
            len(train_set), seed=tc.seed, epoch=epoch, micro_batch=tc.batch_size,
            world=info.world_size, rank=info.rank, accum=tc.grad_accum,
        )
        for step_in_epoch in range(state["step_in_epoch"], steps_epoch):
            model.train()
            started = time.perf_counter()
            totals: dict[str, float] = {}
            for j in range(tc.grad_accum):
                indices = batches[step_in_epoch * tc.grad_accum + j]
                batch = collate(
                    [train_set.get(i, sampling.sample_seed(tc.seed, epoch, i)) for i in indices], info.device
                )
                torch.manual_seed(sampling.micro_batch_seed(tc.seed, state["step"], info.rank * tc.grad_accum + j))
                sync = j == tc.grad_accum - 1 or not info.enabled
                ctx = model.no_sync() if not sync else _null()
                with ctx:
                    with torch.autocast(info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        _, losses = model(batch["image"], batch["input_ids"], batch["attention_mask"],
                                          targets=batch["target"])
                    loss = sum(losses.values())
                    scaler.scale(loss / tc.grad_accum).backward()
                for name, value in losses.items():
                    totals[name] = totals.get(name, 0.0) + float(value.detach()) / tc.grad_accum
            if tc.clip_grad:  # over what the optimizer trains, as detectron2's full-model clipping does
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], tc.clip_grad,
                                               foreach=True)
            scaler.step(optimizer)
            scaler.update()
            core.zero_grad(set_to_none=True)  # parameters left out of the optimizer too
            scheduler.step()
            state["step"] += 1
            state["step_in_epoch"] = step_in_epoch + 1

            names = sorted(totals)
            reduced = distributed.all_reduce_mean(torch.tensor([totals[n] for n in names]), info).tolist()
            totals = dict(zip(names, reduced))
            elapsed = time.perf_counter() - started
            images_per_s = tc.batch_size * tc.grad_accum * info.world_size / elapsed
            loss_total = sum(totals.values())
            spent = train_seconds()
            state["train_seconds"] = spent
            if bar is not None:
                bar.set_postfix_str(f"step {state['step']} loss {loss_total:.4f} {images_per_s:.1f} img/s")
                bar.update((min(spent, budget_s) - bar.n) if budget_s else 1)
            if state["step"] % tc.log_every == 0 or state["step"] == total_steps:
                logger.write(kind="train", step=state["step"], epoch=epoch, loss=loss_total, **totals,
                             lr=scheduler.get_last_lr()[0], images_per_s=images_per_s, seconds=spent)
            if tc.ckpt_every and state["step"] % tc.ckpt_every == 0:
                save("last.pt")
            if crash_after and state["step"] >= crash_after:
                os._exit(3)  # simulate a kill: no cleanup, no final checkpoint
            if budget_s is not None:  # machine-dependent by design: a demo convenience
                clock["fraction"] = spent / budget_s
                if info.is_main and clock["fraction"] >= 1.0:
                    log.info("time budget of %.1f min spent at step %d", tc.time_budget_min, state["step"])
                    total_steps = state["step"]
                if info.enabled:  # every rank stops at the same step
                    total_steps = distributed.all_gather_objects(total_steps, info)[0]
            if next_eval is not None and spent >= next_eval and state["step"] < total_steps:
                validate(full=False)
                next_eval = (math.floor(train_seconds() / periodic_s) + 1) * periodic_s
            if state["step"] >= total_steps:
                break

        epoch_done = state["step_in_epoch"] >= steps_epoch
        if epoch_done:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
        finished = state["step"] >= total_steps
        if finished or (epoch_done and state["epoch"] % tc.eval_every == 0):
            validate(full=periodic_s is None)
        if epoch_done or finished:
            save("last.pt")
            distributed.barrier(info)
    if bar is not None:
        bar.close()
    if info.is_main:
        from .plots import training_curve

        training_curve(out_dir / "log.jsonl", out_dir / "training_curve.png", metric=metric_name)
    return {
        "steps": state["step"],
        "train_seconds": round(state["train_seconds"], 1),
        "best_metric": metric_name,
        "best": state["best"],
        "best_step": state["best_step"],
        "last": str(out_dir / "last.pt"),
        "best_checkpoint": str(out_dir / "best.pt"),
        "best_model": str(out_dir / "best"),
        "training_curve": str(out_dir / "training_curve.png"),
    }


def _progress_bar(enabled: bool, budget_s, total_steps: int, state: dict):
    """Under a time budget the bar measures training time against the budget
    (a step total would never be reached); otherwise optimizer steps."""
    if not enabled:
        return None
    from tqdm import tqdm

    if budget_s is not None:
        return tqdm(total=budget_s, initial=min(state["train_seconds"], budget_s), desc="train", unit="s",
                    dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
                                                   "[{elapsed}] {postfix}")
    return tqdm(total=total_steps, initial=state["step"], desc="train", dynamic_ncols=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
