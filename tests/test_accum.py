"""OpenCLIP-style accumulation (`accum_freq`): one optimizer step over micro-batches whose loss
sees the whole batch equals one step over the large batch, in loss and in every gradient (with
CLIP's loss, and with SigLIP's, whose learnt bias gets its gradient once, like the temperature).

The two-rank case runs this file under torchrun (a DDP Trainer never runs in the test process:
docs/design.md, trap 5); the reference is one process holding the whole batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from clip_model.lightning_module import ClipLightningModule
from clip_model.loss import ClipLoss, SigLipLoss
from clip_model.model import create_model
from tests.small_model import SMALL_MODEL as MODEL
from tests.small_model import random_pairs

ROOT = Path(__file__).resolve().parent.parent
WORLD, ACCUM, MICRO = 2, 4, 2  # 2 ranks x 4 micro-batches of 2: a global batch of 16


def whole_batch(n: int = WORLD * ACCUM * MICRO) -> tuple[torch.Tensor, torch.Tensor]:
    return random_pairs(n)


def micro_batches(rank: int, world: int, accum: int, micro: int) -> list[dict[str, torch.Tensor]]:
    """This rank's rows of the whole batch, as `accum` micro-batches (rank-major, as gathered)."""
    images, text = whole_batch(world * accum * micro)
    per_rank = accum * micro
    start = rank * per_rank
    return [
        {
            "image": images[start + j * micro : start + (j + 1) * micro],
            "text": text[start + j * micro : start + (j + 1) * micro],
        }
        for j in range(accum)
    ]


def reference(loss: str = "clip") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one process on the whole batch (SigLIP's bias as `logit_bias`)."""
    torch.manual_seed(0)
    model = create_model(MODEL)
    loss_fn = ClipLoss() if loss == "clip" else SigLipLoss()
    if loss == "siglip":
        with torch.no_grad():
            model.logit_scale.fill_(SigLipLoss.INIT_LOGIT_SCALE)
    value = loss_fn(*model(*whole_batch()))
    value.backward()
    parameters = [*model.named_parameters(), *loss_fn.named_parameters()]
    return value.detach(), {n: p.grad.clone() for n, p in parameters}


class _GradientsAtStep(L.Callback):
    """The loss and the gradients the optimizer is about to apply (before any clipping)."""

    def __init__(self):
        self.loss: torch.Tensor | None = None
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.loss = pl_module._losses[-1].clone()
        parameters = [*pl_module.model.named_parameters(), *pl_module.loss_fn.named_parameters()]
        self.grads = {n: p.grad.clone() for n, p in parameters}


def one_accumulated_step(
    *, devices: int, rank: int, accum: int, micro: int, loss: str = "clip", **trainer_args
):
    torch.manual_seed(0)  # the module's model is the reference's (DDP also broadcasts rank 0's)
    module = ClipLightningModule(model=MODEL, accum_freq=accum, warmup_steps=1, loss=loss)
    probe = _GradientsAtStep()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        max_steps=1,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        **trainer_args,
    )
    batches = micro_batches(rank, devices, accum, micro)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert trainer.global_step == 1, "the micro-batches made exactly one optimizer step"
    return probe


def assert_equal_to_reference(loss, grads, what: str, loss_name: str = "clip") -> None:
    ref_loss, ref_grads = reference(loss_name)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0, msg=f"{what}: loss")
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=1e-4, msg=f"{what}: {name}")


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_one_process_accumulating_micro_batches_equals_the_whole_batch(loss):
    # 8 micro-batches of 2 in one process: every image scored against all 16 texts
    probe = one_accumulated_step(devices=1, rank=0, accum=WORLD * ACCUM, micro=MICRO, loss=loss)
    if loss == "siglip":
        assert "logit_bias" in probe.grads
    assert_equal_to_reference(probe.loss, probe.grads, f"1 process x accum_freq 8, {loss}", loss)


@pytest.mark.slow  # ~1 min on 2 shared cores: two torchrun ranks start Lightning
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_gloo_ranks_accumulating_equal_one_process_on_the_whole_batch(tmp_path, loss):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={WORLD}",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=127.0.0.1:0",
        str(Path(__file__)),
        str(tmp_path),
        loss,
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    if loss == "siglip":  # a rank's loss is its own images' rows; their mean, the whole batch's
        mean = sum(r["loss"] for r in results) / WORLD
        for r in results:
            r["loss"] = mean
    for rank, result in enumerate(results):  # the gradients DDP averaged
        assert_equal_to_reference(result["loss"], result["grads"], f"rank {rank}", loss)


def test_accum_freq_and_plain_accumulation_are_not_combined(tmp_path):
    from clip_model.train import ConfigError, load_config

    with pytest.raises(ConfigError, match="accum_freq=2 and accumulate_grad_batches=2"):
        load_config(
            None,
            [f"data={tmp_path}", "max_steps=1", "accum_freq=2", "accumulate_grad_batches=2"],
        )


if __name__ == "__main__":  # one rank under torchrun: its loss (argv[2]) and gradients to argv[1]
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    probe = one_accumulated_step(
        devices=WORLD,
        rank=rank,
        accum=ACCUM,
        micro=MICRO,
        loss=sys.argv[2],
        strategy="ddp",
        num_nodes=1,
    )
    torch.save({"loss": probe.loss, "grads": probe.grads}, Path(sys.argv[1]) / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
