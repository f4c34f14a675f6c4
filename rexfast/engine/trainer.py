"""Training loop: single process or torchrun DDP, AMP, accumulation, exact resume.

Exact resume means a run killed after any checkpoint and resumed with
``--resume`` ends with the same weights as an uninterrupted run with the same
seed. It rests on three things: the data order is a pure function of
(seed, epoch, step) (``sampling.py``); model randomness (dropout, Gumbel
seeds) comes from the torch RNG, re-seeded before every micro-batch from
(seed, step, step-global micro-batch index) — which also makes two DDP ranks
equal one process accumulating two micro-batches; and checkpoints are only
taken at optimizer-step boundaries.
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

from . import builders, checkpoint, distributed, sampling
from .config import Config, save_config
from .evaluator import evaluate

log = logging.getLogger("rexfast")

CRASH_ENV = "REXFAST_TEST_CRASH_AFTER_STEP"  # tests: die abruptly after this optimizer step


def _amp_dtype(cfg: Config, device: torch.device):
    mode = cfg.train.amp
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if mode == "off":
        return None
    if mode in ("bf16", "fp16"):
        return torch.bfloat16 if mode == "bf16" else torch.float16
    raise ValueError(f"train.amp must be auto, bf16, fp16 or off, got {mode!r}")


def _schedule(cfg: Config, total_steps: int, clock: dict):
    """LR factor per step. Under a time budget the decay follows whichever is
    further along: steps or the budget's elapsed fraction (``clock``)."""
    warm, kind = cfg.train.warmup_steps, cfg.train.schedule
    if kind not in ("poly", "cosine", "constant"):
        raise ValueError(f"train.schedule must be poly, cosine or constant, got {kind!r}")

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        t = min(1.0, max((step - warm) / max(1, total_steps - warm), clock.get("fraction", 0.0)))
        return 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else (1 - t) ** 0.9

    return factor


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class JsonlLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train(cfg: Config, *, resume: str | None = None, progress: bool = True) -> dict:
    """Train; returns a summary with the final step, the best metric and checkpoint paths."""
    info = distributed.init(cfg.train.device)
    try:
        return _train(cfg, info, resume=resume, progress=progress)
    finally:
        distributed.cleanup()


def _train(cfg: Config, info: distributed.DistInfo, *, resume: str | None, progress: bool) -> dict:
    tc = cfg.train
    out_dir = Path(tc.out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    torch.manual_seed(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    tokenizer = builders.build_tokenizer(cfg.data)
    train_set = builders.build_dataset(cfg.data, cfg.data.train_split, train=True, tokenizer=tokenizer)
    val_set = builders.build_dataset(cfg.data, cfg.data.val_split, train=False, tokenizer=tokenizer)
    task = builders.task_of(cfg.data)
    metric_name = tc.metric if tc.metric != "auto" else ("gIoU" if task == "gres" else "mIoU")

    model = builders.build_model(cfg, tokenizer).to(info.device)
    core = model
    if info.enabled:
        # CGFormer's released architecture holds parameters its forward never uses
        # (LoadToken.norm / .mlp), so DDP must look for unused ones every step.
        model = DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                                        find_unused_parameters=True)
    optimizer = torch.optim.AdamW(_param_groups(core, tc.weight_decay), lr=tc.lr)
    steps_epoch = sampling.steps_per_epoch(
        len(train_set), micro_batch=tc.batch_size, world=info.world_size, accum=tc.grad_accum
    )
    total_steps = tc.epochs * steps_epoch if tc.max_steps is None else min(tc.max_steps, tc.epochs * steps_epoch)
    clock: dict = {}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total_steps, clock))
    amp_dtype = _amp_dtype(cfg, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16)

    state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best": None, "best_epoch": None}
    if resume:
        ckpt = checkpoint.load(resume)
        if "optimizer" not in ckpt:
            raise checkpoint.CheckpointError(f"{resume} holds weights only; --resume needs a training checkpoint")
        core.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state.update(ckpt["train_state"])
        checkpoint.set_rng_state(ckpt["rng"][min(info.rank, len(ckpt["rng"]) - 1)])
        log.info("resumed from %s at epoch %d, step %d", resume, state["epoch"], state["step"])

    logger = JsonlLog(out_dir / "log.jsonl", info.is_main)

    def save(name: str) -> Path | None:
        rngs = distributed.all_gather_objects(checkpoint.rng_state(), info)
        if not info.is_main:
            return None
        payload = {
            "format": checkpoint.FORMAT,
            "config": cfg.to_dict(),
            "vocab": builders.vocab_of(tokenizer),
            "model": core.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "train_state": dict(state),
            "rng": rngs,
        }
        return checkpoint.atomic_save(payload, out_dir / name)

    crash_after = int(os.environ.get(CRASH_ENV, "0"))
    budget_s = None if tc.time_budget_min is None else 60.0 * tc.time_budget_min
    train_started = time.perf_counter()
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc="train", dynamic_ncols=True, leave=True)

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
                batch = builders.collate(
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
            if tc.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(core.parameters(), tc.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            state["step_in_epoch"] = step_in_epoch + 1

            names = sorted(totals)
            reduced = distributed.all_reduce_mean(torch.tensor([totals[n] for n in names]), info).tolist()
            totals = dict(zip(names, reduced))
            elapsed = time.perf_counter() - started
            images_per_s = tc.batch_size * tc.grad_accum * info.world_size / elapsed
            loss_total = sum(totals.values())
            if bar is not None:
                bar.set_postfix(loss=f"{loss_total:.4f}", img_s=f"{images_per_s:.1f}", epoch=epoch)
                bar.update(1)
            if state["step"] % tc.log_every == 0 or state["step"] == total_steps:
                logger.write(kind="train", step=state["step"], epoch=epoch, loss=loss_total, **totals,
                             lr=scheduler.get_last_lr()[0], images_per_s=images_per_s)
            if tc.ckpt_every and state["step"] % tc.ckpt_every == 0:
                save("last.pt")
            if crash_after and state["step"] >= crash_after:
                os._exit(3)  # simulate a kill: no cleanup, no final checkpoint
            if budget_s is not None:  # machine-dependent by design: a demo convenience
                clock["fraction"] = (time.perf_counter() - train_started) / budget_s
                if info.is_main and clock["fraction"] >= 1.0:
                    log.info("time budget of %.1f min spent at step %d", tc.time_budget_min, state["step"])
                    total_steps = state["step"]
                if info.enabled:  # every rank stops at the same step
                    total_steps = distributed.all_gather_objects(total_steps, info)[0]
            if state["step"] >= total_steps:
                break

        epoch_done = state["step_in_epoch"] >= steps_epoch
        if epoch_done:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
        finished = state["step"] >= total_steps
        if finished or (epoch_done and state["epoch"] % tc.eval_every == 0):
            metrics = None
            if info.is_main:
                metrics = evaluate(core, val_set, task=task, batch_size=tc.batch_size, device=info.device,
                                   amp_dtype=amp_dtype, progress=False)
                logger.write(kind="eval", step=state["step"], epoch=state["epoch"], **metrics)
                log.info("eval at step %d: %s", state["step"], metrics)
                if state["best"] is None or metrics[metric_name] > state["best"]:
                    state["best"], state["best_epoch"] = metrics[metric_name], state["epoch"]
                    checkpoint.atomic_save(_weights_only(cfg, tokenizer, core, metrics), out_dir / "best.pt")
            # rank 0 owns the best-metric bookkeeping; every rank checkpoints the same state
            state.update(distributed.all_gather_objects(dict(state), info)[0])
        if epoch_done or finished:
            save("last.pt")
            distributed.barrier(info)
    if bar is not None:
        bar.close()
    return {
        "steps": state["step"],
        "best_metric": metric_name,
        "best": state["best"],
        "best_epoch": state["best_epoch"],
        "last": str(out_dir / "last.pt"),
        "best_checkpoint": str(out_dir / "best.pt"),
    }


def _weights_only(cfg: Config, tokenizer, model: torch.nn.Module, metrics: dict | None) -> dict:
    return {
        "format": checkpoint.FORMAT,
        "config": cfg.to_dict(),
        "vocab": builders.vocab_of(tokenizer),
        "model": model.state_dict(),
        "metrics": metrics,
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
