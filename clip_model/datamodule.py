"""Training input: a dataset's WebDataset shards, decoded, cropped and tokenised in the workers.

The data order is a pure function of (seed, epoch, step, world size, workers), which is what makes
mid-epoch resume exact without replaying the epoch:

- Every (rank, worker) pair is a *slot*: slot `s = rank * workers + role` reads its own range
  of the epoch (clip_model/shard_plan.py: the shards, shuffled per epoch, read as one sequence
  of samples cut into consecutive ranges of exactly what each slot trains on), so every training
  sample is read once per epoch whatever the shard count and sizes, and no rank runs dry
  (docs/design.md, trap 7). Only a slot short of samples (a corrupt shard) reads on past its
  range, taking a few repeats rather than stopping.
- The epoch length comes from the manifest (and the Parquet keys when a validation split is held
  out): `train_samples // (world_size * batch_size)` batches on every rank, however uneven the
  shards, so DDP never waits on a rank that has stopped.
- A shuffle buffer, the random crop of each sample and the shard order are seeded from
  (seed, epoch, slot, position), never from the process. Each batch carries its index in the
  epoch; the DataModule records the position after every batch it hands to the model, and the
  checkpoint stores it. On resume, each worker skips the raw (undecoded) samples its role had
  already produced; the DataLoader's round-robin over workers then continues exactly where the
  killed run stopped.
- A shard that cannot be read (bad tar header, short read) is skipped, warned about and counted;
  a bad sample (an image that will not decode, a caption that is not UTF-8) is replaced by another
  sample of its batch, counted and named by shard and key (a replacement, not a draw, so every
  batch consumes exactly `batch_size` raw samples and the resume arithmetic stays exact). The
  counts travel with each batch to the main process. What is not the data's fault (the store
  failing to read, MemoryError) stops training naming the shard (docs/design.md, "The dataset
  format").

Images decode with clip_model.images (the one decoder; a JPEG at least twice the training size
decodes in draft mode at a reduced scale); a pixel bomb or undecodable image is a bad sample.
"""

from __future__ import annotations

import hashlib
import math
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_model.images import decode_image
from clip_model.shard_plan import Piece, ShardRef, deal
from clip_model.transforms import normalize
from storage import Dataset, DatasetError, ShardReadError, open_dataset
from storage.fs import filesystem

__all__ = ["ClipDataModule", "DataPosition", "is_validation_key"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PREFETCH_FACTOR = 4  # batches each training worker keeps ready (in shared memory)


# ---- small pure helpers ---------------------------------------------------------------------


def _seed(*parts: Any) -> int:
    """A 64-bit seed from any parts, the same in every process (unlike `hash`)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def is_validation_key(key: str, fraction: float) -> bool:
    """Held out for validation: decided by the key's hash alone, so every stage agrees."""
    if fraction <= 0:
        return False
    return _seed("val", key) / 2**64 < fraction


@dataclass
class DataPosition:
    """Where the next training batch starts: batches already consumed in `epoch`."""

    epoch: int = 0
    batches: int = 0


class _ErrorLog:
    """Corrupt shards and undecodable samples one worker has met in this pass."""

    def __init__(self) -> None:
        self.corrupt_shards: set[str] = set()
        self.bad_samples = 0

    def shard(self, shard: ShardRef, problem: Any) -> None:
        if shard.name not in self.corrupt_shards:
            warnings.warn(f"skipping corrupt shard {shard.url}: {problem}", stacklevel=2)
        self.corrupt_shards.add(shard.name)

    def sample(self, sample: dict[str, Any], problem: Any) -> None:
        self.bad_samples += 1
        key, shard = sample.get("__key__", "?"), sample.get("__url__", "?")
        warnings.warn(f"replacing bad sample {key!r} of {shard}: {problem}", stacklevel=2)


def _read_shard(shard: ShardRef, errors: _ErrorLog) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__`, `jpg`, `txt`, ...) of one tar; a broken tar ends it, counted."""
    fs, path = filesystem(shard.url)
    count = 0
    try:
        with fs.open(path, "rb") as stream:
            files = wds.tariterators.tar_file_expander([{"url": shard.url, "stream": stream}])
            for sample in wds.tariterators.group_by_keys(files):
                count += 1
                yield sample
    except MemoryError:
        raise
    except OSError as e:  # the store failed, not the data (docs/design.md, "The dataset format")
        raise ShardReadError(
            f"{shard.url}: the store failed to read this shard ({e!r}); training stops rather "
            "than skip it: fix the store or retry"
        ) from e
    except Exception as e:  # noqa: BLE001 - tarfile and webdataset errors: the tar is corrupt
        errors.shard(shard, repr(e))
        return
    if count < shard.num_samples:  # tarfile stops quietly at a garbled header mid-file
        errors.shard(shard, f"{count} of the {shard.num_samples} samples its manifest lists")


def _piece(piece: Piece, errors: _ErrorLog, member: Callable[[str], bool]) -> Iterator[dict]:
    """The samples of one piece of a split (`member(key)`: in the split), counted in tar order."""
    index = 0
    for sample in _read_shard(piece.shard, errors):
        if index >= piece.stop:
            return  # the rest of the tar is another slot's
        if not member(sample["__key__"]):
            continue
        index += 1
        if index <= piece.first:
            continue  # undecoded: skipping costs only the tar read
        if not any(e in sample for e in IMAGE_EXTS):
            errors.sample(sample, "no image in the sample")
            continue
        yield sample


# ---- the streams ------------------------------------------------------------------------------


class _Preprocess:
    """Raw samples -> a model batch (images, token ids, error counts). Runs in the workers."""

    def __init__(self, image_transform: Callable, tokenizer: Callable, image_size: int):
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.image_size = image_size
        # a transform that takes a generator (clip_model.transforms.TrainTransform) is given one
        # we seed per sample, so its crop is a function of the sample's position in the epoch
        self._generator = torch.Generator()
        if hasattr(image_transform, "generator"):
            image_transform.generator = self._generator

    def image(self, sample: dict[str, Any], seed: int | None) -> torch.Tensor:
        data = next(sample[e] for e in IMAGE_EXTS if e in sample)
        image = decode_image(data, sample.get("__key__"), draft_size=self.image_size)
        if seed is not None:
            self._generator.manual_seed(seed)
        return self.image_transform(image)

    def batch(
        self, raw: list[dict[str, Any]], seeds: list[int | None], errors: _ErrorLog
    ) -> dict[str, Any]:
        images: list[torch.Tensor | None] = []
        captions: list[str] = []
        for sample, seed in zip(raw, seeds, strict=True):
            try:
                caption, image = _caption(sample), self.image(sample, seed)
            except ValueError as e:  # the sample's fault (ImageDecodeError, a non-UTF-8 caption);
                # MemoryError and OSError are not, and stop the run
                errors.sample(sample, e)
                caption, image = "", None
            captions.append(caption)
            images.append(image)
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            keys = [s.get("__key__") for s in raw[:5]]
            raise DatasetError(f"no decodable image in a batch of {len(raw)} (keys {keys}, ...)")
        # a bad sample is replaced by a good one of the same batch: the batch keeps its size and
        # consumed exactly len(raw) raw samples (what resume counts on)
        fill, bad = [], 0
        for i, image in enumerate(images):
            if image is None:
                fill.append(good[bad % len(good)])
                bad += 1
            else:
                fill.append(i)
        return {
            "image": torch.stack([images[i] for i in fill]),
            "text": self.tokenizer([captions[i] for i in fill]),
            "corrupt_shards": sorted(errors.corrupt_shards),
            "bad_samples": torch.tensor(errors.bad_samples),
        }


def _caption(sample: dict[str, Any]) -> str:
    """The caption; a `.txt` that is not UTF-8 raises UnicodeDecodeError (a bad sample)."""
    text = sample.get("txt", b"")
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


class TrainStream(IterableDataset):
    """`batches_per_epoch` batches of `batch_size` on this rank, whatever the shard sizes.

    `epoch` and `start_batch` are set by the DataLoader before each pass (see ClipDataModule);
    they live in shared memory, so persistent workers see each new pass's values.
    """

    def __init__(
        self,
        shards: list[ShardRef],
        preprocess: _Preprocess,
        *,
        batch_size: int,
        batches_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        val_fraction: float = 0.0,
    ):
        super().__init__()
        if not shards:
            raise ValueError("TrainStream needs at least one shard")
        self.shards, self.preprocess = shards, preprocess
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.val_fraction = val_fraction
        self._pass = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, start_batch)

    @property
    def epoch(self) -> int:
        return int(self._pass[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._pass[0] = value

    @property
    def start_batch(self) -> int:
        return int(self._pass[1])

    @start_batch.setter
    def start_batch(self, value: int) -> None:
        self._pass[1] = value

    def __len__(self) -> int:
        return self.batches_per_epoch

    def role_batches(self, role: int, workers: int) -> int:
        """Batches role `role` of `workers` produces in an epoch (roles take turns)."""
        n = self.batches_per_epoch
        return n // workers + (role < n % workers)

    def _resampled(self, slot: int, errors: _ErrorLog) -> Iterator[dict]:
        """With replacement, every slot from every shard (OpenCLIP's mode): no epoch coverage."""
        rng = random.Random(_seed(self.seed, self.epoch, slot, "shards"))
        while True:
            readable = 0
            for shard in rng.choices(self.shards, k=len(self.shards)):
                for sample in self._training(_read_shard(shard, errors), errors):
                    readable += 1
                    yield sample
            self._check_readable(readable, self.shards, slot, errors)

    def _training(self, samples: Iterator[dict], errors: _ErrorLog) -> Iterator[dict]:
        """Training samples only: held-out keys skipped; a sample without an image counted."""
        for sample in samples:
            if is_validation_key(sample["__key__"], self.val_fraction):
                continue
            if not any(e in sample for e in IMAGE_EXTS):
                errors.sample(sample, "no image in the sample")
                continue
            yield sample

    def _check_readable(self, readable: int, shards: list[ShardRef], slot: int, errors) -> None:
        if readable == 0:  # the slot can never fill a batch: an error rather than a hang
            raise DatasetError(
                f"no readable training sample in shards {[s.url for s in shards]} "
                f"(rank {self.rank}, slot {slot}; corrupt: "
                f"{sorted(errors.corrupt_shards) or 'none'})"
            )

    def plan(self, workers: int) -> list[list[Piece]]:
        """Every slot's pieces of this epoch (clip_model/shard_plan.py): each training sample
        read by one slot only; slot `rank * workers + role` needs its role's batches' worth."""
        order = list(self.shards)
        random.Random(_seed(self.seed, self.epoch)).shuffle(order)
        needs = [
            self.role_batches(role, workers) * self.batch_size
            for _ in range(self.world_size)
            for role in range(workers)
        ]
        return deal(order, needs)

    def _is_training(self, key: str) -> bool:
        return not is_validation_key(key, self.val_fraction)

    def _raw_samples(self, slot: int, workers: int, errors: _ErrorLog) -> Iterator[dict]:
        """The slot's own range of the epoch, shuffled; then, only if some of it was unreadable
        (a corrupt shard, a sample without an image), samples from the whole epoch order so
        the batch count holds (those few are repeats)."""
        pieces = self.plan(workers)[slot]
        own = (s for piece in pieces for s in _piece(piece, errors, self._is_training))
        if self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, self.epoch, slot, "buffer"))
            # a finite stream: the buffer drains at its end, before any fallback sample enters
            own = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(own)
        yield from own
        order = list(self.shards)
        random.Random(_seed(self.seed, self.epoch)).shuffle(order)
        start = order.index(pieces[-1].shard) if pieces else 0
        order = order[start:] + order[:start]
        while True:
            readable = 0
            for shard in order:
                for sample in self._training(_read_shard(shard, errors), errors):
                    readable += 1
                    yield sample
            self._check_readable(readable, order, slot, errors)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # the DataLoader asks workers in turn, so loader batch t comes from worker t % workers;
        # resuming at batch b, worker w plays the role that produced batch b + w
        role = (self.start_batch + worker) % workers
        first = (self.start_batch + worker) // workers
        last = self.role_batches(role, workers)
        if first >= last:
            return
        slot = self.rank * workers + role
        errors = _ErrorLog()
        if self.resampled:
            samples = self._resampled(slot, errors)
            if self.shuffle_buffer > 1:
                rng = random.Random(_seed(self.seed, self.epoch, slot, "buffer"))
                shuffle = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)
                samples = shuffle(samples)
        else:
            samples = self._raw_samples(slot, workers, errors)
        b = self.batch_size
        for _ in islice(samples, first * b):  # undecoded: skipping costs only tar reads
            pass
        for local in range(first, last):
            raw = list(islice(samples, b))
            seeds = [_seed(self.seed, self.epoch, slot, local * b + i) for i in range(b)]
            batch = self.preprocess.batch(raw, seeds, errors)
            batch["keys"] = [sample.get("__key__") for sample in raw]  # what it consumed
            batch["index"] = torch.tensor(local * workers + role)
            batch["epoch"] = torch.tensor(self.epoch)
            yield batch


class ValStream(IterableDataset):
    """The validation samples, each read once, in parallel: cut into one range per (rank, worker)
    slot (clip_model/shard_plan.py), so no process scans what is not its own. Every slot yields
    as many batches, padded (`valid` False), so every rank has as many and DDP never waits.
    """

    def __init__(
        self,
        shards: list[ShardRef],
        preprocess: _Preprocess,
        *,
        batch_size: int,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        val_fraction: float | None = None,
    ):
        super().__init__()
        self.shards, self.preprocess, self.batch_size = shards, preprocess, batch_size
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.workers = max(1, workers)  # the DataLoader's worker processes (0: the main one)
        self.val_fraction = val_fraction  # None: every sample of `shards` is validation data
        self.slots = world_size * self.workers
        self.slot_batches = math.ceil(math.ceil(num_samples / self.slots) / batch_size)

    def __len__(self) -> int:
        return self.slot_batches * self.workers

    def _is_validation(self, key: str) -> bool:
        return self.val_fraction is None or is_validation_key(key, self.val_fraction)

    def plan(self) -> list[list[Piece]]:
        """The first `num_samples` validation samples in shard order, slot after slot."""
        n, slots = self.num_samples, self.slots
        return deal(self.shards, [n // slots + (s < n % slots) for s in range(slots)])

    def _any_sample(self, errors: _ErrorLog) -> list[dict]:
        """Padding for a slot with no sample of its own (fewer samples than slots)."""
        for sample in _piece(deal(self.shards, [1])[0][0], errors, self._is_validation):
            return [sample]
        raise DatasetError("validation split yielded no readable sample")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        if workers != self.workers:
            raise RuntimeError(f"ValStream planned for {self.workers} workers, runs in {workers}")
        errors = _ErrorLog()
        pieces = self.plan()[self.rank * workers + worker]
        samples = (s for piece in pieces for s in _piece(piece, errors, self._is_validation))
        b, last = self.batch_size, None
        for _ in range(self.slot_batches):
            raw = list(islice(samples, b))
            valid = torch.zeros(b, dtype=torch.bool)
            valid[: len(raw)] = True
            if len(raw) < b:  # pad (the slot's last batch, or short data)
                pad = raw[-1:] or last or self._any_sample(errors)
                raw = raw + pad * (b - len(raw))
            last = raw[-1:]
            batch = self.preprocess.batch(raw, [None] * b, errors)
            batch["valid"] = valid
            batch["keys"] = [sample.get("__key__") for sample in raw]
            yield batch


class _PositionedLoader(DataLoader):
    """A DataLoader whose every pass starts where the DataModule says (epoch, batch)."""

    def __init__(self, dataset: TrainStream, datamodule: ClipDataModule, **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._datamodule = datamodule

    def __iter__(self):
        self.dataset.epoch, self.dataset.start_batch = self._datamodule.next_pass()
        return super().__iter__()


# ---- the DataModule ---------------------------------------------------------------------------


class ClipDataModule(L.LightningDataModule):
    """Train and validation loaders over a storage Dataset (see the module docstring).

    `world_size`/`rank` default to the Trainer's; pass them to use the module without one.
    """

    def __init__(
        self,
        data: str | Dataset,
        *,
        tokenizer: Callable[[list[str]], torch.Tensor],
        train_transform: Callable,
        val_transform: Callable,
        image_size: int,
        batch_size: int,
        workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        val_data: str | Dataset | None = None,
        val_fraction: float = 0.0,
        val_max_samples: int = 1000,
        val_batch_size: int | None = None,
        pin_memory: bool = False,
        world_size: int | None = None,
        rank: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.dataset = data if isinstance(data, Dataset) else open_dataset(data)
        self.val_dataset = (
            val_data if isinstance(val_data, Dataset | None) else open_dataset(val_data)
        )
        self.tokenizer, self.image_size = tokenizer, image_size
        self.train_transform, self.val_transform = train_transform, val_transform
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.val_fraction = 0.0 if self.val_dataset is not None else val_fraction
        self.val_max_samples, self.pin_memory = val_max_samples, pin_memory
        self.val_batch_size = val_batch_size or batch_size
        self._world_size, self._rank = world_size, rank
        # the next batch to train on; advanced as the model consumes batches, kept in checkpoints.
        # The data epoch is ours, not Lightning's current_epoch: a run resumed from a checkpoint
        # taken at an epoch's last batch replays an empty epoch in Lightning's count.
        self.position = DataPosition()
        self.corrupt_shards: set[str] = set()  # seen by this rank's workers
        self._bad_samples: dict[tuple[int, int], int] = {}  # (epoch, role) -> cumulative count
        # shard -> samples of each split, when the validation split is held out by key
        self._train_per_shard: dict[str, int] = {}
        self._val_per_shard: dict[str, int] = {}
        self.train_samples, self.val_samples = self._count_samples()

    # -- sizes from the manifest (and Parquet keys when a split is held out) --

    def _count_samples(self) -> tuple[int, int]:
        total = self.dataset.manifest.total_samples
        if total == 0:
            raise DatasetError(f"{self.dataset.url}: the manifest lists zero samples")
        if self.val_dataset is not None:
            return total, min(self.val_dataset.manifest.total_samples, self.val_max_samples)
        if self.val_fraction == 0:
            return total, 0
        table = self.dataset.metadata(columns=["key", "status"], with_shard=True)
        columns = (table[c].to_pylist() for c in ("key", "status", "shard"))
        for key, status, shard in zip(*columns, strict=True):
            if status != "success":
                continue
            # per shard: what lets the plans cut shards at exact sample counts
            split = (
                self._val_per_shard
                if is_validation_key(key, self.val_fraction)
                else self._train_per_shard
            )
            split[shard] = split.get(shard, 0) + 1
        n_val = sum(self._val_per_shard.values())
        return sum(self._train_per_shard.values()), min(n_val, self.val_max_samples)

    @property
    def world_size(self) -> int:
        if self._world_size is not None:
            return self._world_size
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        n = self.train_samples // self.global_batch_size
        if n == 0:
            raise DatasetError(
                f"{self.dataset.url}: {self.train_samples} training samples, fewer than one "
                f"global batch ({self.world_size} ranks x batch_size {self.batch_size})"
            )
        return n

    def _shards(self, dataset: Dataset, split: dict[str, int] | None = None) -> list[ShardRef]:
        """The dataset's shards; `split`: how many samples of each belong to the split read."""
        return [
            ShardRef(
                url,
                entry.name,
                entry.num_samples,
                -1 if split is None else split.get(entry.name, 0),
            )
            for url, entry in zip(dataset.tar_urls(), dataset.manifest.shards, strict=True)
            if entry.num_samples > 0
        ]

    # -- loaders --

    def train_dataloader(self) -> DataLoader:
        stream = TrainStream(
            self._shards(self.dataset, self._train_per_shard if self.val_fraction else None),
            _Preprocess(self.train_transform, self.tokenizer, self.image_size),
            batch_size=self.batch_size,
            batches_per_epoch=self.batches_per_epoch,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            resampled=self.resampled,
            val_fraction=self.val_fraction,
        )
        return _PositionedLoader(
            stream,
            self,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            prefetch_factor=PREFETCH_FACTOR if self.workers else None,
            # workers persist across passes: each pass's (epoch, start) reaches them through
            # the stream's shared memory; the loader's own generator keeps its base-seed draw
            # off the global RNG the model uses
            persistent_workers=self.workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_samples == 0:
            return []
        own = self.val_dataset is not None  # else held out of the training shards by key
        stream = ValStream(
            self._shards(self.val_dataset)
            if own
            else self._shards(self.dataset, self._val_per_shard),
            _Preprocess(self.val_transform, self.tokenizer, self.image_size),
            batch_size=self.val_batch_size,
            num_samples=self.val_samples,
            rank=self.rank,
            world_size=self.world_size,
            workers=self.workers,
            val_fraction=None if own else self.val_fraction,
        )
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.workers > 0,  # the split is fixed: no pass-dependent state
        )

    # -- position bookkeeping (what makes resume exact) --

    def next_pass(self) -> tuple[int, int]:
        """(epoch, first batch) of the pass a loader is starting now: where the last batch the
        model consumed left off, so a resumed run continues the interrupted epoch."""
        position = self.position
        if position.batches >= self.batches_per_epoch:  # that epoch is done: the next begins
            position = DataPosition(position.epoch + 1, 0)
        self.position = position
        return position.epoch, position.batches

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 images (the lean transfer: a quarter of float32's bytes through shared and
        pinned memory) are normalised here, on the device."""
        if isinstance(batch, dict) and batch.get("image") is not None:
            if batch["image"].dtype == torch.uint8:
                batch["image"] = normalize(batch["image"])
        return batch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if isinstance(batch, dict) and "index" in batch and (trainer is None or trainer.training):
            index, epoch = int(batch["index"]), int(batch["epoch"])
            if (epoch, index) != (self.position.epoch, self.position.batches):
                raise RuntimeError(
                    f"data order broken: expected batch {self.position.batches} of epoch "
                    f"{self.position.epoch}, got batch {index} of epoch {epoch}"
                )
            self.position = DataPosition(epoch, index + 1)
            # each worker reports what it has met so far in this pass
            self.corrupt_shards.update(batch["corrupt_shards"])
            self._bad_samples[epoch, index % max(1, self.workers)] = int(batch["bad_samples"])
        return batch

    @property
    def bad_samples(self) -> int:
        """Undecodable samples this rank's workers have replaced so far."""
        return sum(self._bad_samples.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.position.epoch,
            "batches": self.position.batches,
            "world_size": self.world_size,
            "workers": self.workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "resampled": self.resampled,
            "dataset_digest": self.dataset.digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = self.state_dict()
        keys = ("world_size", "workers", "batch_size", "seed", "resampled", "dataset_digest")
        changed = [
            f"{k}: {state[k]} -> {now[k]}" for k in keys if k in state and state[k] != now[k]
        ]
        epoch, batches = state["epoch"], state["batches"]
        trained = batches * state.get("world_size", 1) * state.get("batch_size", self.batch_size)
        if "world_size" in state and trained != batches * self.global_batch_size:
            # the position is what the run has trained on, in samples: another world size or
            # batch size continues after as many samples of the epoch, not as many batches
            batches = trained // self.global_batch_size
            changed.append(f"position: {trained} samples into epoch {epoch} = batch {batches}")
        if changed:
            warnings.warn(
                "resuming with a different data setup, so the data order will not match the "
                f"interrupted run's ({'; '.join(changed)})",
                stacklevel=2,
            )
        self.position = DataPosition(epoch, batches)
