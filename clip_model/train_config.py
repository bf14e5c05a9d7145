"""The training run's configuration: one validated `TrainConfig`, read from YAML plus overrides.

    cfg = load_config("configs/train/tiny.yaml", ["data=data/sample", "checkpoint.keep_last=5"])

Every key is a field below; `extra="forbid"` makes an unknown key an error naming it. `clip_model.train` re-exports everything here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from clip_model.precision import parse_precision
from configs import ConfigError  # one line naming the field and the file or override at fault
from configs.overrides import Override, load, parse_overrides

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "EvalConfig",
    "LaunchConfig",
    "MLflowConfig",
    "OptunaTrialConfig",
    "TrainConfig",
    "check_hardware",
    "device_options",
    "load_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CheckpointConfig(_Strict):
    every_n_steps: int = Field(1000, gt=0, description="write step-N.ckpt every N optimizer steps")
    keep_last: int = Field(3, gt=0, description="how many step-N.ckpt to keep (last.ckpt too)")


class MLflowConfig(_Strict):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="None: MLFLOW_TRACKING_URI or sqlite")
    experiment: str = "clip-pipeline"
    parent_run_id: str | None = None
    run_name: str = "train"
    log_model: bool = Field(True, description="log (and register) the pyfunc model")
    registered_model: str | None = "clip"
    # the registry's aliases (storage/tracking.py): a new version is @candidate; @champion moves
    promote: bool = Field(False, description="move @champion to the new version, unconditionally")
    champion_metric: str | None = Field(
        None,
        description="a final metric (val/loss, ...): @champion moves to the new version when it "
        "beats the champion's",
    )
    champion_goal: Literal["minimize", "maximize"] = Field(
        "minimize", description="whether a lower or a higher champion_metric is better"
    )
    system_metrics_interval: float | None = Field(
        10.0, gt=0, description="seconds between system metrics samples (None: none logged)"
    )


class EvalConfig(_Strict):
    """Zero-shot evaluation during training (clip_model/eval_callback.py), logged to the run:
    every rank embeds its share of the images, the metrics are computed from all of them."""

    suite: str = Field(description="an eval suite YAML (configs/eval/*.yaml)")
    root: str | None = Field(None, description="the suite's {root}, e.g. the sample web's folder")
    every_n_steps: int = Field(500, gt=0, description="and once at the end")
    tasks: list[str] | None = Field(None, description="None: every task of the suite")
    max_images: int | None = Field(None, gt=0, description="per task: a quick subset")
    batch_size: int = Field(128, gt=0)
    workers: int | None = Field(
        None, ge=0, description="loader workers per rank for the images; None: the training's"
    )
    precision: str = Field(
        "auto", description="auto: the trainer's precision; else clip_model.precision's spellings"
    )

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, value: Any) -> str:
        return "auto" if value == "auto" else str(parse_precision(value).name)


class LaunchConfig(_Strict):
    """How the `train` flow starts a run of several nodes (num_nodes > 1); the trainer ignores it.

    torchrun: the flow starts this node's torchrun (node 0, whose ranks include global rank 0)
    and logs the command every other node runs with the same rendezvous; srun: the flow, running
    inside a SLURM allocation, starts every node's ranks with one `srun`."""

    launcher: Literal["auto", "torchrun", "srun"] = Field(
        "auto", description="auto: srun inside a SLURM allocation (SLURM_JOB_ID set), else torchrun"
    )
    rdzv_endpoint: str | None = Field(
        None, description="torchrun across nodes: HOST:PORT of the rendezvous, reachable by all"
    )
    rdzv_id: str = Field("clip-train", description="torchrun: the job's rendezvous id")

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"rdzv_endpoint={value!r}: expected HOST:PORT, e.g. node0:29500")
        return value


class OptunaTrialConfig(_Strict):
    """This run is trial `trial` of an Optuna study (flows/sweep.py sets it): report `metric` after
    each evaluation and stop when the pruner says so (clip_model/pruning.py)."""

    storage: str = Field(description="an RDB URL (sqlite:///...) or a journal file path")
    study: str
    trial: int = Field(ge=0, description="the trial's number in the study")
    metric: str | list[str] = Field(
        "val/loss", description="a val/ or zero-shot <task>/<metric> metric; a list: their mean"
    )
    pruner: str = Field("none", description="clip_model.study.PRUNERS")
    pruner_args: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Strict):
    """Everything a training run needs; `extra="forbid"`: an unknown key is an error."""

    # data
    data: str = Field(description="the training dataset (folder or fsspec URL)")
    val_data: str | None = Field(
        None, description="the validation dataset; default <data>/val when it exists"
    )
    val_fraction: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="without a validation dataset: hold out this share of `data` by key hash",
    )
    val_max_samples: int = Field(1000, ge=0, description="validate on at most this many samples")
    val_every_n_steps: int | None = Field(
        None, gt=0, description="None: every epoch; always at the end"
    )
    workers: int = Field(4, ge=0, description="data-loader worker processes per rank")
    shuffle_buffer: int = Field(1000, ge=1)
    resampled: bool = Field(False, description="draw shards with replacement (OpenCLIP's mode)")
    # model and tokenizer
    model: str = Field("tiny", description="a preset in configs/model or a YAML path")
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    tokenizer: str = Field(
        "auto", description="auto (the preset's), openai, bpe (learnt on the captions), a path"
    )
    tokenizer_vocab_size: int | None = Field(None, ge=258, description="bpe; default: preset's")
    # optimisation
    batch_size: int = Field(256, gt=0, description="per device and micro-batch")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_steps: int | None = Field(None, gt=0)
    max_epochs: int | None = Field(None, gt=0)
    grad_clip_norm: float | None = Field(1.0, gt=0)
    accumulate_grad_batches: int = Field(
        1, gt=0, description="Lightning's plain accumulation: negatives from each micro-batch only"
    )
    accum_freq: int = Field(
        1,
        gt=0,
        description="OpenCLIP's accumulation: features of accum_freq micro-batches of batch_size "
        "cached so the loss sees them all, then each re-encoded with a gradient",
    )
    loss: Literal["clip", "siglip"] = Field(
        "clip",
        description="clip: CLIP's InfoNCE (softmax over the batch); siglip: SigLIP's pairwise "
        "sigmoid with a learnt bias (t = 10, b = -10 at the start; its ring exchange across ranks)",
    )
    local_loss: bool = Field(False, description="clip: each rank scores only its own rows")
    gather_with_grad: bool = Field(True, description="clip: gathered features carry gradients")
    grad_checkpointing: bool = Field(False, description="recompute activations in backward")
    # speed options: None is the device's default (device_options)
    tf32: bool | None = Field(None, description="TF32 matmuls and convolutions; None: on a GPU")
    fused_adamw: bool | None = Field(None, description="AdamW's fused kernel; None: on a GPU")
    compile: bool | None = Field(
        None, description="torch.compile the model (minutes of compiling first); None: on a GPU"
    )
    channels_last: bool | None = Field(
        None, description="NHWC images and weights for a ResNet tower; None: on a GPU"
    )
    precision: str = Field(
        "32",
        description="32, bf16-mixed, 16-mixed, bf16-true, 16-true, or OpenCLIP's spellings "
        "(amp_bf16, amp, pure_bf16...): clip_model.precision",
    )
    # hardware
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | Literal["auto"] = 1
    num_nodes: int = Field(1, gt=0)
    strategy: Literal["auto", "ddp"] = "auto"
    cpu_threads: int | None = Field(None, gt=0, description="torch threads per rank")
    # reproducibility, output, resume
    seed: int = 0
    deterministic: bool = False  # also deterministic kernels (the data order always is)
    out_dir: str = "runs/train"
    checkpoint_dir: str | None = Field(None, description="default: out_dir/checkpoints")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    resume: str | None = Field(
        None, description="a checkpoint path, or auto: the newest in checkpoint_dir (if any)"
    )
    print_every_n_steps: int = Field(10, ge=0, description="a progress line every N steps")
    log_every_n_steps: int | None = Field(
        None,
        gt=0,
        description="read the steps' metrics off the device every N steps (the step's one host "
        "sync); every step is still logged. None: 1 on a CPU, 20 on a GPU",
    )
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    eval: EvalConfig | None = Field(None, description="zero-shot evaluation every N steps")
    optuna: OptunaTrialConfig | None = Field(None, description="a sweep's trial: report, prune")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="num_nodes > 1")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_text(cls, value: Any) -> Any:
        parse_precision(value)  # ValueError naming every accepted spelling
        return str(value)  # as written (YAML reads 32 as a number); Trainer: .lightning

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if (self.max_steps is None) == (self.max_epochs is None):
            raise ValueError("set exactly one of max_steps and max_epochs")
        if isinstance(self.devices, int) and self.devices < 1:
            raise ValueError(f"devices={self.devices}: must be >= 1 or 'auto'")
        if self.tokenizer not in ("auto", "openai", "bpe") and not Path(self.tokenizer).is_file():
            raise ValueError(
                f"tokenizer={self.tokenizer!r}: expected auto, openai, bpe or an existing "
                "tokenizer JSON file"
            )
        if self.accum_freq > 1 and self.accumulate_grad_batches > 1:
            raise ValueError(
                f"accum_freq={self.accum_freq} and accumulate_grad_batches="
                f"{self.accumulate_grad_batches}: choose one way to accumulate (accum_freq's loss "
                "sees the whole batch)"
            )
        if parse_precision(self.precision).name == "fp16" and self.accelerator == "cpu":
            raise ValueError(
                f"precision={self.precision} (fp16 mixed) needs a GPU; on a CPU use bf16-mixed"
            )
        return self

    @property
    def checkpoints(self) -> str:
        return self.checkpoint_dir or f"{self.out_dir.rstrip('/')}/checkpoints"

    @property
    def world_size(self) -> int | None:
        """Processes of the run, when the config says (None for devices=auto)."""
        return self.devices * self.num_nodes if isinstance(self.devices, int) else None


def device_options(cfg: TrainConfig, device: str, *, resnet: bool) -> dict[str, bool]:
    """The speed options with each None resolved for `device` (a torch device type): on CUDA
    TF32, fused AdamW and torch.compile are on, and channels_last for a ResNet image tower; on a
    CPU all are off (compiling costs minutes there, TF32 does not exist)."""
    cuda = device == "cuda"

    def pick(value: bool | None, default: bool) -> bool:
        return default if value is None else value

    return {
        "tf32": pick(cfg.tf32, cuda) and cuda,
        "fused_adamw": pick(cfg.fused_adamw, cuda),
        "compile": pick(cfg.compile, cuda),
        "channels_last": pick(cfg.channels_last, cuda and resnet) and resnet,
    }


def check_hardware(cfg: TrainConfig) -> None:
    """Refuse a run that would land on the CPU with several ranks nobody asked for.

    With a CPU build of torch (or a CUDA build that finds no GPU), `accelerator: auto` resolves
    to the CPU, and `devices: 8` would then train 8 gloo ranks on it, slowly and silently. Only
    an explicit `accelerator: cpu` means that.
    """
    if cfg.accelerator != "auto" or cfg.devices == "auto" or cfg.world_size == 1:
        return
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return
    build = torch.__version__
    why = (
        "this torch is a CPU build"
        if torch.version.cuda is None
        else f"this torch is built for CUDA {torch.version.cuda} but sees no GPU"
    )
    raise ConfigError(
        f"devices={cfg.devices} x num_nodes={cfg.num_nodes} with accelerator=auto resolves to "
        f"the CPU ({why}: torch {build}): that would train {cfg.world_size} gloo ranks on the "
        "CPU. Set accelerator=cpu if that is what you want, or install the CUDA build of torch "
        "on a GPU machine (README, 'Install')"
    )


# ---- config loading -----------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike | None, overrides: Sequence[str | Override] = ()
) -> TrainConfig:
    """A YAML file (a path, or a preset name of configs/train/), or nothing, plus `key=value`
    overrides (YAML values, dotted keys for nested fields), validated. ConfigError is one line
    naming the field and the file or override it came from (configs/overrides.py)."""
    return load(TrainConfig, path or None, kind="train", overrides=parse_overrides(overrides))
