"""Contrastive pretraining as a LightningModule (its checkpoints: clip_model/step_checkpoint.py).

Optimisation follows the paper and OpenCLIP's defaults: AdamW (beta2 0.98, eps 1e-6) with no weight
decay on gains, biases, embeddings and the temperature; a linear warmup then a cosine decay,
stepped every optimizer step; the learned temperature's logit clamped to ln(100) after each step
("clipped to prevent scaling the logits by more than 100", Radford et al. 2021, section 2.5).
Precision and plain accumulation are the Trainer's (`precision="bf16-mixed"`,
`accumulate_grad_batches`: negatives from the micro-batch only); `accum_freq` is OpenCLIP's
accumulation, whose loss sees the whole batch (manual optimisation, `_accumulating_step`).

The loss is CLIP's InfoNCE (`loss="clip"`) or SigLIP's pairwise sigmoid (`loss="siglip"`,
clip_model/loss.py): its learnable bias `loss_fn.logit_bias` (init -10, the temperature's logit
starting at log 10, as OpenCLIP's `--siglip`) is a parameter of this module, so the optimizer
updates it (no weight decay, like the temperature) and the checkpoint keeps it
(`state_dict["loss_fn.logit_bias"]`). OpenCLIP keeps the bias on the model instead; here the
model is what embedding, evaluation and export use, where a ranking needs no bias, and its
tensors stay those of every other CLIP.

Every optimizer step logs train/loss, train/lr, train/temperature and train/global_batch (and
train/logit_bias with SigLIP), and rank 0 appends the same record to `metrics_path` (JSONL):
that file is what the resume test compares. The step never reads a device tensor on the host (on a GPU that waits for the step to
finish): each step's loss and temperature stay on the device and are read together every
`log_every` steps (and before a checkpoint, and at the end), with perf/samples_per_s and
perf/data_wait_frac (time spent waiting for the next batch / wall time) over that window.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from clip_model.config import ModelConfig
from clip_model.loss import ClipLoss, SigLipLoss
from clip_model.metrics_file import MetricsFile
from clip_model.model import create_model
from clip_model.retrieval import gather_retrieval_features, retrieval_metrics
from clip_model.step_checkpoint import StepCheckpoint, latest_checkpoint  # re-exported

__all__ = ["ClipLightningModule", "StepCheckpoint", "cosine_with_warmup", "latest_checkpoint"]

MAX_LOGIT_SCALE = math.log(100)
LOSSES = ("clip", "siglip")  # CLIP's InfoNCE, SigLIP's pairwise sigmoid (clip_model/loss.py)


def cosine_with_warmup(
    step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> float:
    """LR multiplier: (step+1)/warmup during warmup (OpenCLIP's), then cosine to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Gains, biases, embeddings, the temperature and SigLIP's logit bias (a scalar) are not
    decayed (as OpenCLIP)."""
    return param.ndim < 2 or "embedding" in name or "logit_scale" in name


class ClipLightningModule(L.LightningModule):
    def __init__(
        self,
        *,
        model: str | dict | ModelConfig = "tiny",
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        loss: str = "clip",
        local_loss: bool = False,
        gather_with_grad: bool = True,
        accum_freq: int = 1,
        grad_clip_norm: float | None = None,
        metrics_path: str | None = None,
        print_every: int = 0,
        log_every: int = 1,
        fused_adamw: bool = False,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        if accum_freq < 1 or log_every < 1:
            raise ValueError(f"accum_freq={accum_freq}, log_every={log_every}: must be >= 1")
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r}: expected one of {', '.join(LOSSES)}")
        config = ModelConfig.load(model)
        # the resolved config goes into the checkpoint: it rebuilds the model without presets
        self.save_hyperparameters(
            {
                "model": config.model_dump(mode="json"),
                "lr": lr,
                "weight_decay": weight_decay,
                "betas": tuple(betas),
                "eps": eps,
                "warmup_steps": warmup_steps,
                "min_lr_ratio": min_lr_ratio,
                "loss": loss,
                "local_loss": local_loss,
                "gather_with_grad": gather_with_grad,
                "accum_freq": accum_freq,
            },
            logger=False,  # train.py logs the whole run config; MLflow params cannot change
        )
        self.model = create_model(config)
        self.model.check_token_ids = False  # a host read per step (the model's note says why)
        self.fused_adamw, self.channels_last = fused_adamw, channels_last
        if channels_last:  # NHWC: what tensor cores' convolutions want (ResNets)
            self.model.visual.to(memory_format=torch.channels_last)
        if compile:  # in place: parameter names, hence checkpoints, stay those of the model
            self.model.compile()
        if loss == "siglip":  # the paper's init: t = 10 (b = -10 is the loss's own)
            with torch.no_grad():
                self.model.logit_scale.fill_(SigLipLoss.INIT_LOGIT_SCALE)
            self.loss_fn: ClipLoss | SigLipLoss = SigLipLoss()
        else:
            self.loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)
        self.accum_freq, self.grad_clip_norm = accum_freq, grad_clip_norm
        # OpenCLIP's accumulation runs its own backward passes (see _accumulating_step); the
        # Trainer's clipping is not available there, so this module clips (grad_clip_norm)
        self.automatic_optimization = accum_freq == 1
        self.log_every = log_every
        self.last_metrics: dict[str, float] = {}
        self._metrics_file = MetricsFile(metrics_path, print_every=print_every)
        self._t_end: float | None = None  # when the previous batch finished
        self._t_window: float | None = None  # when the previous metrics window was read
        self._micro: list[tuple[torch.Tensor, torch.Tensor]] = []  # accum_freq's inputs
        self._cached: list[tuple[torch.Tensor, torch.Tensor]] = []  # ... and their features
        self._val_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._val_loss = torch.zeros(2)

    # ---- optimisation ---------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, plain = [], []
        for name, param in self.named_parameters():  # the model's, then the loss's (SigLIP)
            if param.requires_grad:
                (plain if no_weight_decay(name, param) else decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": plain, "weight_decay": 0.0},
                {"params": decay, "weight_decay": hp.weight_decay},
            ],
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
            fused=self.fused_adamw or None,  # also keeps its step counts on the device
        )
        total = self._total_steps()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: cosine_with_warmup(
                step, warmup_steps=hp.warmup_steps, total_steps=total, min_ratio=hp.min_lr_ratio
            ),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def _total_steps(self) -> int:
        """Optimizer steps of the run: the Trainer's count, or with accum_freq (which Lightning
        does not know of) one step per accum_freq batches, and one for an epoch's remainder."""
        trainer = self.trainer
        total = trainer.estimated_stepping_batches  # sets the loader up when it needs its length
        if self.accum_freq > 1 and trainer.max_epochs not in (None, -1):
            per_epoch = math.ceil(trainer.num_training_batches / self.accum_freq)
            total = per_epoch * max(trainer.max_epochs, 1)
            if trainer.max_steps != -1:
                total = min(total, trainer.max_steps)
        return int(total)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # the automatic loop counts this step once the hook has returned
        self._after_optimizer_step(self.trainer.global_step + 1)

    def _after_optimizer_step(self, step: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self._end_step(step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resume with the other loss: refused by name (the state dicts differ by SigLIP's
        bias, which Lightning would report as a missing or unexpected key)."""
        trained = checkpoint.get("hyper_parameters", {}).get("loss", "clip")
        if trained != self.hparams.loss:
            raise ValueError(
                f"the checkpoint was trained with loss={trained}, this run has "
                f"loss={self.hparams.loss}: resume with loss={trained}, or start a new run"
            )

    # ---- training ---------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self._losses: list[torch.Tensor] = []  # this optimizer step's (micro-)batch losses
        self._window: list[torch.Tensor] = []  # per step, on the device: (loss, logit_scale)
        self._rows: list[dict[str, Any]] = []  # per step, host values: step, epoch, batch, lr
        self._samples, self._waited = 0, 0.0
        self._micro, self._cached = [], []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._t_end is not None:  # since the previous batch ended: waiting for this one
            self._waited += now - self._t_end
        # every rank's (micro-)batch: host-side shapes, no device read
        self._samples += batch["image"].shape[0] * self.trainer.world_size
        self._position = self._data_position(batch_idx)

    def _data_position(self, batch_idx: int) -> tuple[int, int]:
        """(epoch, batch) of the batch in hand, from host-side bookkeeping: the DataModule's
        position (it read the batch's index before the batch went to the device), else the loop's
        counters. Never the batch's own tensors: on a GPU reading them would wait for the step."""
        datamodule = getattr(self.trainer, "datamodule", None)
        position = getattr(datamodule, "position", None)
        if position is not None:
            return position.epoch, position.batches - 1
        return self.current_epoch, batch_idx

    def _epoch_ends(self, batch_idx: int) -> bool:
        datamodule = getattr(self.trainer, "datamodule", None)
        position = getattr(datamodule, "position", None)
        if position is not None and hasattr(datamodule, "batches_per_epoch"):
            return position.batches >= datamodule.batches_per_epoch
        return batch_idx + 1 >= self.trainer.num_training_batches

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if self.accum_freq > 1:
            return self._accumulating_step(batch, batch_idx)
        image_features, text_features, logit_scale = self.model(self._images(batch), batch["text"])
        loss = self._loss(image_features, text_features, logit_scale)
        self._losses.append(loss.detach())
        self._keep_scalars(logit_scale)
        return loss

    def _loss(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        *,
        learn_scalars: bool = True,
    ) -> torch.Tensor:
        """The loss; `learn_scalars=False`: the temperature and SigLIP's bias as constants (the
        earlier passes of accum_freq, whose gradient is the features' alone)."""
        if learn_scalars:
            return self.loss_fn(image_features, text_features, logit_scale)
        if isinstance(self.loss_fn, SigLipLoss):
            bias = self.loss_fn.logit_bias.detach()
            return self.loss_fn(image_features, text_features, logit_scale.detach(), bias)
        return self.loss_fn(image_features, text_features, logit_scale.detach())

    def _keep_scalars(self, logit_scale: torch.Tensor) -> None:
        """The step's temperature (and SigLIP's bias), on the device until the window is read;
        the bias cloned, as the optimizer is about to change the parameter in place."""
        self._logit_scale = logit_scale.detach()
        if isinstance(self.loss_fn, SigLipLoss):
            self._logit_bias = self.loss_fn.logit_bias.detach().clone()

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        images = batch["image"]
        return (
            images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        )

    def _accumulating_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """OpenCLIP's `--accum-freq`: the loss of one optimizer step sees all its micro-batches.

        Each micro-batch is first encoded without a graph and its features kept. The one that
        closes the step (the accum_freq-th, or an epoch's last batch) is encoded once, with its
        graph, kept for the end. Each earlier micro-batch is then encoded again with a graph and
        the loss computed over the whole batch: its fresh features in their place, the kept ones
        for the others (as negatives, no gradient); the closing micro-batch's loss comes last.
        Each backward adds the gradient through one micro-batch's features, so their sum is the
        gradient of the full-batch loss, with at most two micro-batches' activations alive (the
        closing one is not encoded twice: OpenCLIP's loop encodes every micro-batch twice). The
        temperature's own gradient (and SigLIP's bias's) is taken once (the last pass), not once
        per micro-batch.
        Under DDP the earlier passes accumulate locally (no_sync); the last one all-reduces.
        """
        images, text = self._images(batch), batch["text"]
        if len(self._micro) + 1 < self.accum_freq and not self._epoch_ends(batch_idx):
            with torch.no_grad():
                image_features, text_features, _ = self.model(images, text)
            self._micro.append((images, text))
            self._cached.append((image_features, text_features))
            return None
        image_last, text_last, logit_scale = self.model(images, text)
        micro = self._micro
        cached = [*self._cached, (image_last.detach(), text_last.detach())]
        self._micro, self._cached = [], []

        def whole_batch(j: int, image_j: torch.Tensor, text_j: torch.Tensor):
            images = [c[0] for c in cached[:j]] + [image_j] + [c[0] for c in cached[j + 1 :]]
            texts = [c[1] for c in cached[:j]] + [text_j] + [c[1] for c in cached[j + 1 :]]
            return torch.cat(images), torch.cat(texts)

        block_sync = getattr(self.trainer.strategy, "block_backward_sync", None)
        for j, (images, text) in enumerate(micro):
            with block_sync() if block_sync is not None else contextlib.nullcontext():
                image_j, text_j, scale_j = self.model(images, text)
                loss = self._loss(*whole_batch(j, image_j, text_j), scale_j, learn_scalars=False)
                self.manual_backward(loss)
        loss = self._loss(*whole_batch(len(micro), image_last, text_last), logit_scale)
        self.manual_backward(loss)
        optimizer = self.optimizers()
        if self.grad_clip_norm is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.grad_clip_norm, gradient_clip_algorithm="norm"
            )
        self._losses.append(loss.detach())
        self._keep_scalars(logit_scale)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        self._after_optimizer_step(self.trainer.global_step)  # counted by optimizer.step()
        return None

    def _end_step(self, step: int) -> None:
        """Optimizer step `step` done: its values stay on the device until the window is read."""
        loss = self._losses[0] if len(self._losses) == 1 else torch.stack(self._losses).mean()
        scalars = [loss.float(), self._logit_scale.float()]
        if isinstance(self.loss_fn, SigLipLoss):
            scalars.append(self._logit_bias.float())
        self._window.append(torch.stack(scalars))
        epoch, batch = self._position
        self._rows.append(
            {
                "step": step,
                "epoch": epoch,
                "batch": batch,
                "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
                "train/global_batch": float(self.loss_fn.last_global_batch),
            }
        )
        self._losses = []
        if step % self.log_every == 0:
            self.flush_metrics(to_lightning=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._t_end = time.perf_counter()

    def flush_metrics(self, *, to_lightning: bool = False) -> None:
        """Read the window's per-step values from the device (the one host sync of log_every
        steps), log each step to the loggers and metrics.jsonl, and the window's throughput."""
        if not getattr(self, "_rows", None):
            return
        values = torch.stack(self._window).tolist()
        now = time.perf_counter()
        rows, self._rows, self._window = self._rows, [], []
        for i, (row, (loss, logit_scale, *bias)) in enumerate(zip(rows, values, strict=True)):
            metrics = {
                "train/loss": loss,
                "train/lr": row["train/lr"],
                "train/temperature": 1.0 / logit_scale,
                "train/global_batch": row["train/global_batch"],
            }
            if bias:  # SigLIP's
                metrics["train/logit_bias"] = bias[0]
            if i == len(rows) - 1:
                # the first window's time includes starting the workers: not a throughput
                if self._t_window is not None:
                    elapsed = now - self._t_window
                    metrics["perf/samples_per_s"] = self._samples / elapsed
                    metrics["perf/data_wait_frac"] = self._waited / elapsed
                datamodule = getattr(self.trainer, "datamodule", None)
                if datamodule is not None and hasattr(datamodule, "corrupt_shards"):
                    metrics["data/corrupt_shards"] = float(len(datamodule.corrupt_shards))
                    metrics["data/bad_samples"] = float(datamodule.bad_samples)
                if to_lightning:  # Lightning refuses self.log outside the loop's hooks
                    self.log_dict(metrics, logger=False, on_step=True, on_epoch=False)
            self._log(metrics, step=row["step"])
            if self.trainer.is_global_zero:
                self._metrics_file.write(row, metrics)
        self._samples, self._waited = 0, 0.0
        self._t_window = time.perf_counter()

    def _log(self, metrics: dict[str, float], *, step: int | None = None, **kwargs: Any) -> None:
        """To the loggers at the step just completed (and to Lightning when `kwargs` say how).

        Lightning's own logger step is the count *before* the optimizer step (0-based); MLflow's
        history, metrics.jsonl and checkpoint names all use the optimizer steps taken (1-based).
        """
        if kwargs:
            self.log_dict(metrics, logger=False, **kwargs)
        self.last_metrics.update(metrics)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step if step is None else step)

    def on_train_end(self) -> None:
        self.flush_metrics()
        self._metrics_file.close()

    # ---- validation: contrastive loss and retrieval recall on the held-out split -------------

    def on_validation_epoch_start(self) -> None:
        self._val_parts, self._val_loss = [], torch.zeros(2, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        valid = batch["valid"]
        image_features, text_features, logit_scale = self.model(batch["image"], batch["text"])
        image_features, text_features = image_features[valid].float(), text_features[valid].float()
        n = image_features.shape[0]
        if n == 0:
            return
        # the batch's own contrastive loss (this rank's rows only: padding never competes)
        logits = logit_scale.float() * image_features @ text_features.T
        labels = torch.arange(n, device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        self._val_loss += torch.stack(
            [loss.detach() * n, torch.tensor(float(n), device=self.device)]
        )
        self._val_parts.append((image_features, text_features))

    def on_validation_epoch_end(self) -> None:
        dim = self.model.config.embed_dim
        parts = self._val_parts or [(torch.zeros(0, dim, device=self.device),) * 2]
        images = torch.cat([p[0] for p in parts])
        texts = torch.cat([p[1] for p in parts])
        # every query must see every target: recall needs all ranks' features together
        images, texts, owners = gather_retrieval_features(
            images, texts, torch.arange(images.shape[0], device=images.device)
        )
        totals = self.all_gather(self._val_loss).reshape(-1, 2).sum(0)  # trap 8: no world dim at 1
        metrics = {"val/loss": float(totals[0] / totals[1].clamp(min=1))}
        if images.shape[0]:
            recall = retrieval_metrics(images, texts, owners, ks=(1, 5))
            # MLflow metric names allow no "@": image_retrieval_recall_at_1
            metrics.update({f"val/{k.replace('@', '_at_')}": v for k, v in recall.items()})
        metrics["val/samples"] = float(images.shape[0])
        self._log(metrics, on_step=False, on_epoch=True, sync_dist=True)  # equal on all ranks
        self._val_parts = []
