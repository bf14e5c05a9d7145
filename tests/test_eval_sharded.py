"""Zero-shot evaluation during training, sharded across ranks (clip_model/eval_callback.py runs the
suite through a ShardedEmbedder): each rank embeds its share of a task's images and texts (with a
loader worker), the features are gathered, and every rank's metrics are exactly one process's
(2 gloo ranks, no Trainer: docs/design.md, trap 5; nothing here imports Lightning, so a rank
starts in seconds)."""

from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clip_model.checkpoint import load_clip
from clip_model.embedder import Embedder
from clip_model.eval_suite import load_suite, quick_suite
from clip_model.evaluate import flat_metrics, run_suite
from clip_model.sharded_embedder import ShardedEmbedder, share
from tests.faults.fault_model import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
WORLD, BATCH = 2, 8  # batches of 8: each rank embeds several of every task's
# classification (images) and retrieval (images and captions); a linear probe embeds as the
# classification does, and its scikit-learn start costs each rank seconds
TASKS = ["digits", "retrieval"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A small sample web's held-out set and a small random CLIP."""
    from tasks.sample_web import generate_sample_web

    tmp = tmp_path_factory.mktemp("sharded-eval")
    generate_sample_web(tmp / "web", n_scenes=60, n_digits=60, n_eval_per_class=6, n_retrieval=20)
    return {"root": tmp / "web", "checkpoint": tiny_checkpoint(tmp / "model.pt"), "out": tmp}


def suite(root: Path):
    return quick_suite(load_suite(ROOT / "configs/eval/sample.yaml", root=root), tasks=TASKS)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, paths: dict[str, Path]) -> None:
    torch.set_num_threads(1)
    # as under torchrun, the loader workers fork (a process mp.spawn starts would spawn them)
    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        clip = load_clip(paths["checkpoint"])
        embedded: list[int] = []  # the images this rank's model encoded
        clip.model.visual.register_forward_hook(lambda m, i, out: embedded.append(len(out)))
        embedder = ShardedEmbedder(
            clip.model,
            clip.tokenizer,
            device=None,
            batch_size=BATCH,
            num_workers=1,
            progress=False,
            rank=rank,
            world_size=WORLD,
        )
        metrics = flat_metrics(run_suite(embedder, suite(paths["root"])))
        result = {"metrics": metrics, "embedded": sum(embedded), "batches": list(embedded)}
        torch.save(result, paths["out"] / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_sharing_the_images_give_one_process_metrics(setup):
    mp.spawn(_rank, args=(_free_port(), setup), nprocs=WORLD, join=True)
    ranks = [torch.load(setup["out"] / f"rank{r}.pt") for r in range(WORLD)]

    clip = load_clip(setup["checkpoint"])
    one_process = Embedder(clip.model, clip.tokenizer, device=None, batch_size=BATCH)
    tasks = suite(setup["root"]).tasks
    expected = flat_metrics(run_suite(one_process, suite(setup["root"])))
    assert {k.split("/")[0] for k in expected} == set(TASKS)
    for rank, result in enumerate(ranks):
        assert result["metrics"] == expected, rank  # exactly: the same batches, the same maths

    # every image embedded once, by one rank: each rank its share of whole batches
    images = {t.name: len(list(Path(t.dataset).rglob("*.png"))) for t in tasks}
    total = sum(r["embedded"] for r in ranks)
    assert total == sum(images.values()), (images, [r["embedded"] for r in ranks])
    for rank, result in enumerate(ranks):
        mine = sum(
            len(share(n, rank=rank, world_size=WORLD, batch_size=BATCH)) for n in images.values()
        )
        assert result["embedded"] == mine and 0 < mine < total, rank
        assert all(b <= BATCH for b in result["batches"])


def test_shares_are_contiguous_whole_batches_covering_every_input_once():
    for total in (0, 1, 7, 8, 9, 33, 64, 65):
        for world in (1, 2, 3):
            shares = [share(total, rank=r, world_size=world, batch_size=8) for r in range(world)]
            assert [i for s in shares for i in s] == list(range(total)), (total, world)
            assert all(s.start % 8 == 0 for s in shares if len(s)), (total, world)
