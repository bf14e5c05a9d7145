"""Zero-shot evaluation during training: a Lightning callback that runs an eval suite every N steps.

    from clip_model.eval_callback import ZeroShotEvalCallback

    callback = ZeroShotEvalCallback(
        "configs/eval/sample.yaml", root="data/sample", every_n_steps=100,
        tasks=["digits", "retrieval"], max_images=200,
    )
    trainer = L.Trainer(callbacks=[callback], ...)   # e.g. clip_model.train.train(cfg, callbacks=[...])

Every `every_n_steps` optimizer steps (and once at the end of training) the suite runs on the
module's model (`pl_module.model`, a `clip_model.CLIP`) and rank 0 logs `<task>/<metric>` to the
trainer's loggers at that step: the names the `evaluate` flow logs (`digits/acc1`,
`retrieval/image_retrieval_recall_at_1`). Under DDP every rank takes part: each embeds its share
of each task's images and texts with `num_workers` loader workers, the features are gathered
(clip_model/sharded_embedder.py) and every rank computes the same metrics from all of them,
equal to one process's. An evaluation longer than the process group's timeout (30 min by
default) still ends the run: keep it a quick subset (`tasks=` and `max_images=`).

The tokenizer is the one given, else the module's or the DataModule's `tokenizer` attribute
(`ClipDataModule` has one); the image size is the model's `config.image_size`.

MLflow metric names allow no "@", so CLIP_benchmark's `image_retrieval_recall@1` is logged as
`image_retrieval_recall_at_1` (`loggable_metrics`), as the training module's val/ metrics are.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from clip_model.eval_suite import EvalSuite, load_suite, quick_suite
from clip_model.evaluate import flat_metrics, run_suite
from clip_model.precision import Precision, parse_precision
from clip_model.sharded_embedder import ShardedEmbedder

__all__ = ["ZeroShotEvalCallback", "loggable_metrics", "mlflow_metric_name"]


def mlflow_metric_name(name: str) -> str:
    """A metric name MLflow accepts: `retrieval/image_retrieval_recall@1` ->
    `retrieval/image_retrieval_recall_at_1` (MLflow allows letters, digits, _ - . / : space)."""
    return name.replace("@", "_at_")


def loggable_metrics(flat: Mapping[str, float]) -> dict[str, float]:
    """`{"<task>/<metric>": value}` with names MLflow (and Lightning's MLFlowLogger) keep as is."""
    return {mlflow_metric_name(k): float(v) for k, v in flat.items()}


class ZeroShotEvalCallback(Callback):
    """Run an eval suite (or a quick subset) every `every_n_steps` steps; log `<task>/<metric>`.

    `precision="auto"` evaluates in the trainer's precision (bf16-mixed: bf16 autocast); else
    any spelling of clip_model.precision.
    `at_end`: also evaluate after the last step when it was not an evaluation step.
    `history` keeps (step, metrics) of every evaluation (rank 0).
    """

    def __init__(
        self,
        suite: str | Path | EvalSuite,
        *,
        every_n_steps: int,
        root: str | Path | None = None,
        tasks: Sequence[str] | None = None,
        max_images: int | None = None,
        tokenizer: Any = None,
        batch_size: int = 128,
        num_workers: int = 0,
        precision: Precision | str = "auto",
        at_end: bool = True,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: must be >= 1")
        if precision != "auto":
            precision = parse_precision(precision)  # ValueError naming the accepted spellings
            if precision.weights_name != "fp32":  # it would cast the weights being trained
                raise ValueError(
                    f"precision={precision.name}: evaluating during training cannot cast the "
                    "model's weights; use auto (the trainer's precision), fp32, bf16 or fp16"
                )
        # read and check the suite now, on every rank: a bad path fails before training starts
        if not isinstance(suite, EvalSuite):
            suite = load_suite(suite, root=root)
        elif root is not None:
            suite = suite.resolved(root=Path(root).expanduser().absolute())
        self.suite = quick_suite(suite, tasks=tasks, max_images=max_images)
        self.every_n_steps = every_n_steps
        self.tokenizer = tokenizer
        self.batch_size, self.num_workers = batch_size, num_workers
        self.precision = precision
        self.at_end = at_end
        self.last_step = -1
        self.history: list[tuple[int, dict[str, float]]] = []

    # ---- what to evaluate with ------------------------------------------------------------

    def _tokenizer(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        if self.tokenizer is not None:
            return self.tokenizer
        for owner in (pl_module, getattr(trainer, "datamodule", None)):
            tokenizer = getattr(owner, "tokenizer", None)
            if tokenizer is not None:
                return tokenizer
        raise ValueError(
            "ZeroShotEvalCallback needs a tokenizer: pass tokenizer=, or give the LightningModule "
            "or the DataModule a `tokenizer` attribute (ClipDataModule has one)"
        )

    @staticmethod
    def _model(pl_module: L.LightningModule) -> Any:
        model = getattr(pl_module, "model", pl_module)
        if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
            raise TypeError(
                f"{type(pl_module).__name__}: expected a CLIP at `.model` (with encode_image and "
                "encode_text) to evaluate"
            )
        return model

    def _precision(self, trainer: L.Trainer) -> Precision:
        if self.precision != "auto":
            return self.precision
        try:
            return parse_precision(trainer.precision)  # Lightning's spelling: the trainer's own
        except ValueError:  # e.g. 64-true: evaluate in fp32 rather than fail mid-training
            return parse_precision("fp32")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # fail at the start of training, not at the first evaluation
            self._tokenizer(trainer, pl_module)
            self._model(pl_module)

    # ---- when -----------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        # global_step moves when the optimizer steps: with gradient accumulation several batches
        # see the same step, and only the first of them evaluates
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)

    # ---- the evaluation ---------------------------------------------------------------------

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Run the suite on every rank (each embedding its share) and log it at the current step
        on rank 0, which returns the metrics (the others an empty dict)."""
        step = trainer.global_step
        self.last_step = step
        started = time.perf_counter()
        embedder = ShardedEmbedder(  # the model being trained, where and as it is
            self._model(pl_module),
            self._tokenizer(trainer, pl_module),
            device=None,
            precision=self._precision(trainer),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            progress=False,  # the training's own lines go on; no bar in between them
            rank=trainer.global_rank,
            world_size=trainer.world_size,
        )
        metrics = loggable_metrics(flat_metrics(run_suite(embedder, self.suite)))
        seconds = time.perf_counter() - started
        if not trainer.is_global_zero:
            return {}
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "eval/seconds": seconds}, step=step)
        if isinstance(getattr(pl_module, "last_metrics", None), dict):
            pl_module.last_metrics.update(metrics)  # lands in the run's final metrics
        self.history.append((step, metrics))
        # printed like the module's step lines: the train flow streams the trainer's stdout
        values = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        print(f"step {step} eval {self.suite.name} ({seconds:.1f} s) {values}", flush=True)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict.get("last_step", -1)
