"""Deterministic data order that makes resume and DDP exact.

An epoch is a seeded permutation of the dataset. An optimizer step consumes
``world * accum`` micro-batches of ``micro_batch`` samples; micro-batch ``m``
of a step goes to rank ``m // accum`` as its accumulation step ``m % accum``.
So two ranks with no accumulation see exactly the micro-batches that one
process with ``accum=2`` sees — BatchNorm statistics included — and a run
resumed at step ``s`` of an epoch continues with the micro-batches it would
have seen. Per-sample randomness (which sentence of a ref) is derived from
(seed, epoch, index), never from a shared stateful RNG.
"""

from __future__ import annotations

import torch


def epoch_permutation(num_samples: int, *, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))
    return torch.randperm(num_samples, generator=g).tolist()


def steps_per_epoch(num_samples: int, *, micro_batch: int, world: int, accum: int) -> int:
    per_step = micro_batch * world * accum
    if num_samples < per_step:
        raise ValueError(
            f"the training set has {num_samples} samples, fewer than one optimizer step needs "
            f"(batch_size {micro_batch} × processes {world} × grad_accum {accum} = {per_step})"
        )
    return num_samples // per_step


def rank_micro_batches(
    num_samples: int, *, seed: int, epoch: int, micro_batch: int, world: int, rank: int, accum: int
) -> list[list[int]]:
    """This rank's micro-batches for ``epoch``, ``accum`` per optimizer step, in order."""
    perm = epoch_permutation(num_samples, seed=seed, epoch=epoch)
    per_step = micro_batch * world * accum
    out = []
    for step in range(steps_per_epoch(num_samples, micro_batch=micro_batch, world=world, accum=accum)):
        base = step * per_step
        for j in range(accum):
            m = rank * accum + j
            out.append(perm[base + m * micro_batch : base + (m + 1) * micro_batch])
    return out


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's randomness in one epoch."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (2**64)
    x ^= x >> 31
    return x % (2**63 - 1)


def micro_batch_seed(seed: int, step: int, micro_index: int) -> int:
    """The torch RNG seed for one micro-batch's model randomness (dropout,
    Gumbel seeds). ``micro_index`` is the step-global index ``rank * accum + j``,
    so DDP ranks and single-process accumulation draw the same numbers for the
    same samples, and a resumed run draws what the uninterrupted run drew."""
    return sample_seed(seed ^ 0x5DEECE66D, step, micro_index)
