"""What the training loader's worker processes hold in shared memory, checked before training.

DataLoader workers hand batches to their rank through shared memory (`/dev/shm` on Linux): each
keeps `prefetch_factor` batches ready, so one node holds about

    ranks on the node x workers x prefetch x (images + token ids of one batch)

A container's default `/dev/shm` is 64 MiB: float32 batches of 512 x 224^2 (294 MiB each) with 8
workers x prefetch 4 need ~9 GiB per rank, and the run dies with a bus error in a worker. uint8
images (clip_model/transforms.py, normalised on the device) are a quarter of that; what remains is
checked here, with an error naming the settings before the first step rather than a crash.
"""

from __future__ import annotations

import os
import warnings

__all__ = ["SharedMemoryError", "batch_bytes", "check_shared_memory"]

SHM = "/dev/shm"


class SharedMemoryError(RuntimeError):
    """The loader's batches in flight would not fit in shared memory."""


def batch_bytes(batch_size: int, image_size: int, context_length: int, image_bytes: int = 1) -> int:
    """One training batch: images (uint8: 1 byte a value) and int64 token ids."""
    return batch_size * (3 * image_size * image_size * image_bytes + context_length * 8)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_shared_memory(
    *,
    batch_size: int,
    image_size: int,
    context_length: int,
    workers: int,
    prefetch_factor: int,
    ranks_on_node: int = 1,
    image_bytes: int = 1,
    path: str = SHM,
) -> int:
    """Bytes the node's loaders need in shared memory; an error when `path` has less free, a
    warning past half of it. Nothing to check without worker processes or without `path`."""
    one = batch_bytes(batch_size, image_size, context_length, image_bytes)
    need = ranks_on_node * workers * prefetch_factor * one
    if workers == 0 or not os.path.isdir(path):
        return need
    stat = os.statvfs(path)
    free = stat.f_bavail * stat.f_frsize
    what = (
        f"{ranks_on_node} rank(s) x workers={workers} x prefetch {prefetch_factor} x a batch of "
        f"batch_size={batch_size} at {image_size} px ({_gib(one)}) need {_gib(need)} of {path}"
    )
    if need > free:
        raise SharedMemoryError(
            f"{what}, which has {_gib(free)} free: lower workers or batch_size, or give the "
            "machine more shared memory (docker run --shm-size, a Kubernetes emptyDir with "
            "medium: Memory on /dev/shm)"
        )
    if need > free / 2:
        warnings.warn(f"{what}, more than half of its {_gib(free)} free", stacklevel=2)
    return need
