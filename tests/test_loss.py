"""ClipLoss (the paper's symmetric InfoNCE) and SigLipLoss, each against its exact distributed form
on CPU ranks (gloo, no Trainer: docs/design.md, trap 5)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from clip_model import create_model
from clip_model.loss import ClipLoss, SigLipLoss
from tests.small_model import SMALL_MODEL as MODEL
from tests.small_model import random_pairs

WORLD_SIZE, LOCAL_BATCH = 2, 4


def global_batch(world_size: int = WORLD_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    return random_pairs(world_size * LOCAL_BATCH)


def fresh_model():
    torch.manual_seed(0)
    return create_model(MODEL)


def test_loss_is_the_symmetric_cross_entropy_of_scaled_cosine_similarities():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(14.0)
    logits = scale * images @ texts.T
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(ClipLoss()(images, texts, scale), expected)
    # matched pairs scored far above the rest: the loss vanishes
    assert ClipLoss()(images, images, torch.tensor(100.0)).item() < 1e-3


def test_labels_are_cached_per_device_and_batch_size():
    loss = ClipLoss()
    first = loss.labels(4, torch.device("cpu"), rank=0, world_size=1)
    assert loss.labels(4, torch.device("cpu"), rank=0, world_size=1) is first
    assert loss.labels(6, torch.device("cpu"), rank=0, world_size=1).tolist() == list(range(6))
    local = ClipLoss(local_loss=True)
    assert local.labels(4, torch.device("cpu"), rank=1, world_size=2).tolist() == [4, 5, 6, 7]


def test_mismatched_feature_shapes_are_refused():
    with pytest.raises(ValueError, match=r"image_features \[3, 8\] and text_features \[4, 8\]"):
        ClipLoss()(torch.zeros(3, 8), torch.zeros(4, 8), torch.tensor(1.0))


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        images, text = global_batch()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for local_loss in (False, True):
            model = DistributedDataParallel(fresh_model())
            loss = ClipLoss(local_loss=local_loss, gather_with_grad=True)(
                *model(images[rows], text[rows])
            )
            loss.backward()  # DDP averages the gradients over the ranks
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[local_loss] = {
                "loss": loss.detach(),
                "mean_loss": mean_loss / WORLD_SIZE,
                "grads": {n: p.grad.clone() for n, p in model.module.named_parameters()},
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("local_loss", [False, True], ids=["global-loss", "local-loss"])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_rank_results, local_loss):
    model = fresh_model()
    loss = ClipLoss()(*model(*global_batch()))
    loss.backward()
    for rank, results in enumerate(two_rank_results):
        result = results[local_loss]
        torch.testing.assert_close(result["mean_loss"], loss.detach(), atol=1e-5, rtol=0)
        if not local_loss:  # every rank computes the whole global loss
            torch.testing.assert_close(result["loss"], loss.detach(), atol=1e-5, rtol=0)
        assert result["grads"].keys() == dict(model.named_parameters()).keys()
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(
                result["grads"][name],
                parameter.grad,
                atol=1e-5,
                rtol=1e-5,
                msg=f"rank {rank} {name}",
            )
    if local_loss:  # each rank's own rows: different losses whose mean is the global one
        assert two_rank_results[0][True]["loss"] != two_rank_results[1][True]["loss"]


# ---- SigLIP ---------------------------------------------------------------------------------


def siglip_reference(images, texts, scale, bias):
    """The paper's loss written out over the whole batch: -1/n sum_ij log sigmoid(z_ij logit_ij)."""
    logits = scale * images @ texts.T + bias
    signs = 2 * torch.eye(len(images)) - 1
    return -F.logsigmoid(signs * logits).sum() / len(images)


def test_siglip_is_the_pairwise_sigmoid_loss_with_the_papers_init():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    loss_fn = SigLipLoss()
    assert loss_fn.logit_bias.item() == -10.0 and math.exp(
        SigLipLoss.INIT_LOGIT_SCALE
    ) == pytest.approx(10.0)
    scale = torch.tensor(10.0)
    torch.testing.assert_close(
        loss_fn(images, texts, scale), siglip_reference(images, texts, scale, -10.0)
    )
    with pytest.raises(ValueError, match=r"image_features \[3, 8\]"):
        loss_fn(torch.zeros(3, 8), torch.zeros(4, 8), scale)


def _siglip_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        images, text = global_batch(world_size)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        model, loss_fn = fresh_model(), SigLipLoss()
        loss = loss_fn(*model(images[rows], text[rows]))
        loss.backward()
        grads = {}
        for name, p in [*model.named_parameters(), *loss_fn.named_parameters()]:
            dist.all_reduce(p.grad)  # what DDP does: the mean of the ranks' gradients
            grads[name] = p.grad / world_size
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4], ids=["one-way", "both-ways-then-one-way"])
def test_siglip_on_ranks_equals_one_process_on_the_concatenated_batch(tmp_path, world_size):
    mp.spawn(
        _siglip_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size, join=True
    )
    ranks = [torch.load(tmp_path / f"r{r}.pt") for r in range(world_size)]
    model, loss_fn = fresh_model(), SigLipLoss()
    image_features, text_features, scale = model(*global_batch(world_size))
    expected = siglip_reference(image_features, text_features, scale, loss_fn.logit_bias)
    torch.testing.assert_close(loss_fn(image_features, text_features, scale), expected)
    # each rank sums its images' rows over every text, normalised by its own n: the mean over
    # ranks is the loss over the global batch
    mean = sum(r["loss"] for r in ranks) / world_size
    torch.testing.assert_close(mean, expected.detach(), atol=1e-5, rtol=0)
    expected.backward()
    params = dict([*model.named_parameters(), *loss_fn.named_parameters()])
    for rank, result in enumerate(ranks):
        assert result["grads"].keys() == params.keys()
        for name, parameter in params.items():
            torch.testing.assert_close(
                result["grads"][name],
                parameter.grad,
                atol=1e-5,
                rtol=1e-5,
                msg=f"rank {rank} {name}",
            )
