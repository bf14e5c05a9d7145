"""Contrastive pretraining of a CLIP model on a dataset in the storage format.

One CPU (or one GPU), a YAML config plus `key=value` overrides (dotted keys reach nested fields):

    python -m clip_model.train --config configs/train/tiny.yaml data=data/sample max_steps=200

Several processes on one machine (DDP; gloo on CPU, NCCL on GPU), under torchrun:

    torchrun --standalone --nproc_per_node 8 -m clip_model.train --config configs/train/tiny.yaml \\
        devices=8 accelerator=gpu precision=bf16-mixed

Several nodes: the same command on every node with a rendezvous (or `srun` under SLURM, where
Lightning reads SLURM_* itself: one task per GPU, `--ntasks-per-node` = devices):

    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m clip_model.train --config cfg.yaml devices=8 num_nodes=4
    srun --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 \\
        python -m clip_model.train --config cfg.yaml devices=8 num_nodes=4

Resume after a crash or preemption: `resume=auto` (the newest checkpoint in checkpoint_dir, or a
fresh start) or `resume=PATH` (the `train` flow passes auto itself when its run died). The run
writes into `out_dir`: config.yaml (resolved), tokenizer.json (when trained on the captions),
checkpoints/step-N.ckpt and last.ckpt (the newest), metrics.jsonl (one line per step, rank 0)
and, at the end, final_metrics.json (what the `train` Prefect flow returns). With MLflow enabled,
rank 0 logs the run as a child of `mlflow.parent_run_id` (or a run of `mlflow.experiment`): the
config as parameters, per-step metrics, system metrics (`system/...`, every
`mlflow.system_metrics_interval` s), the config/tokenizer/final checkpoint as artifacts, and a
pyfunc model registered as `mlflow.registered_model` with the alias @candidate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from typing import Any

import yaml

from clip_model.precision import parse_precision
from clip_model.train_config import (
    CheckpointConfig,
    ConfigError,
    EvalConfig,
    MLflowConfig,
    TrainConfig,
    check_hardware,
    device_options,
    load_config,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "EvalConfig",
    "MLflowConfig",
    "TrainConfig",
    "check_hardware",
    "load_config",
    "main",
    "train",
]


# ---- the run --------------------------------------------------------------------------------------


def _resolve_resume(cfg: TrainConfig) -> str | None:
    from clip_model.step_checkpoint import latest_checkpoint
    from storage.fs import exists

    if cfg.resume is None:
        earlier = latest_checkpoint(cfg.checkpoints)
        if earlier is not None:  # a fresh run here would prune the earlier run's checkpoints
            raise ConfigError(
                f"checkpoint_dir {cfg.checkpoints} already holds an earlier run's checkpoints "
                f"(newest {earlier}): resume=auto continues that run; another out_dir starts afresh"
            )
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(cfg.checkpoints)
    if not exists(cfg.resume):
        raise FileNotFoundError(
            f"resume={cfg.resume!r}: no such checkpoint (use resume=auto to take the newest in "
            f"{cfg.checkpoints} if there is one)"
        )
    return cfg.resume


def validation_data(cfg: TrainConfig) -> str | None:
    """`val_data`, else the split curation writes beside the training shards (`<data>/val`)
    when it is there, else None (then `val_fraction` holds samples out of `data` by key)."""
    from storage.fs import exists, join

    if cfg.val_data:
        return cfg.val_data
    beside = join(cfg.data, "val")
    return beside if exists(join(beside, "manifest.json")) else None


def _wait_for(url: str, what: str, timeout: float = 1800) -> None:
    from storage.fs import exists

    deadline = time.monotonic() + timeout
    while not exists(url):  # through storage.fs: a shared filesystem or an object store
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for rank 0 to write {what} at {url}")
        time.sleep(0.5)


def prepare_tokenizer(cfg: TrainConfig, dataset: Any, model_config: Any, rank: int):
    """(tokenizer, its file or "openai", the model config fitted to its vocabulary).

    "bpe" learns a byte-level BPE on the training captions (rank 0; the others, on any node,
    wait for the file): saved as out_dir/tokenizer.json through storage.fs (so out_dir may be an
    object store URL) and reused when it exists (resume). The file named is that URL; the
    tokenizer is read from a local copy (storage.fs.local_path).
    """
    from clip_model.config import OPENAI_VOCAB_SIZE
    from clip_model.datamodule import is_validation_key
    from clip_model.tokenizer import get_tokenizer, train_tokenizer
    from storage.fs import exists, join, local_output, local_path

    kind = model_config.tokenizer if cfg.tokenizer == "auto" else cfg.tokenizer
    ctx = model_config.context_length
    if kind == "openai":
        update = {"tokenizer": "openai", "vocab_size": OPENAI_VOCAB_SIZE}
        return get_tokenizer("openai", ctx), "openai", model_config.model_copy(update=update)
    if kind == "bpe":
        path = join(cfg.out_dir, "tokenizer.json")
        if not exists(path):
            if rank == 0:
                table = dataset.metadata(columns=["key", "caption", "status"])
                fraction = 0.0 if cfg.val_data else cfg.val_fraction
                captions = [
                    c
                    for k, c, s in zip(
                        table["key"].to_pylist(),
                        table["caption"].to_pylist(),
                        table["status"].to_pylist(),
                        strict=True,
                    )
                    if s == "success" and c and not is_validation_key(k, fraction)
                ]
                vocab = cfg.tokenizer_vocab_size or model_config.vocab_size
                with local_output(path) as local:  # appears whole or not at all
                    train_tokenizer(captions, vocab, local)
            else:
                _wait_for(path, "the tokenizer")
    else:
        path = kind
    tokenizer = get_tokenizer(local_path(path), ctx)
    update = {"tokenizer": "bpe", "vocab_size": tokenizer.vocab_size}
    return tokenizer, path, model_config.model_copy(update=update)


def _mlflow_run(cfg: TrainConfig, tracking_uri: str) -> str:
    """A new MLflow run for this training, nested under the parent when one is given.

    MLFlowLogger(run_id=...) terminates the run it is handed (docs/design.md trap 6), so it always
    gets this child, never the caller's run.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from storage.tracking import ensure_experiment, ensure_tracking_store

    # trainings started at once on a fresh SQLite database (docs/design.md, trap 14)
    ensure_tracking_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    tags = {"stage": "train", "mlflow.runName": cfg.mlflow.run_name}
    if cfg.mlflow.parent_run_id:
        parent = client.get_run(cfg.mlflow.parent_run_id)  # raises naming the id if unknown
        experiment_id = parent.info.experiment_id
        tags["mlflow.parentRunId"] = cfg.mlflow.parent_run_id
    else:
        mlflow.set_tracking_uri(tracking_uri)
        experiment_id = ensure_experiment(cfg.mlflow.experiment, tracking_uri)
    return client.create_run(experiment_id, tags=tags).info.run_id


def train(cfg: TrainConfig, *, callbacks: list | tuple = ()) -> dict[str, Any]:
    """Run one training (this process is one rank) and return the final metrics (rank 0).

    `callbacks`: extra Lightning callbacks, e.g. a zero-shot evaluation during training.
    """
    import lightning as L
    import torch
    import torch.distributed as dist

    from clip_model.config import ModelConfig
    from clip_model.datamodule import PREFETCH_FACTOR, ClipDataModule
    from clip_model.lightning_module import ClipLightningModule
    from clip_model.sample_schedule import SampleSchedule
    from clip_model.shared_memory import check_shared_memory
    from clip_model.step_checkpoint import StepCheckpoint
    from clip_model.transforms import eval_transform, train_transform
    from storage import open_dataset
    from storage.fs import atomic_write_bytes, join
    from storage.tracking import flatten_params, tracking_uri

    started = time.time()
    # the train stream's __len__ is exact by construction (batches per rank from the manifest)
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    check_hardware(cfg)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    dataset = open_dataset(cfg.data)  # DatasetError naming the folder and what is wrong
    cfg = cfg.model_copy(update={"val_data": validation_data(cfg)})
    resume_path = _resolve_resume(cfg)
    L.seed_everything(cfg.seed, workers=False, verbose=False)

    callbacks = list(callbacks)
    if cfg.eval is not None:
        from clip_model.eval_callback import ZeroShotEvalCallback

        # the tokenizer comes from the DataModule at setup; a bad suite fails here, before training
        options = cfg.eval.model_dump()
        workers = options.pop("workers")
        workers = cfg.workers if workers is None else workers
        callbacks.append(ZeroShotEvalCallback(**options, num_workers=workers))
    if cfg.optuna is not None:  # after the evaluator: it reports what the evaluator measured
        from clip_model.pruning import PRUNED_FILE, OptunaPruning

        marker = join(cfg.out_dir, PRUNED_FILE)
        callbacks.append(OptunaPruning(**cfg.optuna.model_dump(), marker=marker))
    from clip_model.train_progress import TrainProgress

    callbacks.append(TrainProgress(cfg.batch_size))  # step/total, samples/s, ETA on a terminal
    checkpoint_cb = StepCheckpoint(
        cfg.checkpoints,
        every_n_steps=cfg.checkpoint.every_n_steps,
        keep_last=cfg.checkpoint.keep_last,
    )
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=parse_precision(cfg.precision).lightning,
        max_steps=cfg.max_steps or -1,
        max_epochs=cfg.max_epochs,
        # accum_freq optimises by hand (the module clips); the Trainer would refuse to clip
        gradient_clip_val=cfg.grad_clip_norm if cfg.accum_freq == 1 else None,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        deterministic=cfg.deterministic,
        # SampleSchedule: resumed at another global batch, the LR plan continues in samples
        callbacks=[checkpoint_cb, SampleSchedule(), *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        val_check_interval=(
            cfg.val_every_n_steps * cfg.accumulate_grad_batches * cfg.accum_freq
            if cfg.val_every_n_steps
            else None
        ),
        use_distributed_sampler=False,
        default_root_dir=cfg.out_dir,
    )
    rank = trainer.global_rank
    device = trainer.strategy.root_device.type

    model_config = ModelConfig.load(cfg.model)
    if cfg.model_overrides or cfg.grad_checkpointing:
        update = {**cfg.model_overrides, "grad_checkpointing": cfg.grad_checkpointing}
        model_config = ModelConfig(**{**model_config.model_dump(), **update})
    tokenizer, tokenizer_ref, model_config = prepare_tokenizer(cfg, dataset, model_config, rank)
    options = device_options(cfg, device, resnet=not model_config.is_vit)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = options["tf32"]

    resolved = cfg.model_dump(mode="json")
    resolved["resolved_model"] = model_config.model_dump(mode="json")
    resolved["tokenizer_file"] = tokenizer_ref
    resolved["device_options"] = options
    out = cfg.out_dir
    if rank == 0:
        atomic_write_bytes(join(out, "config.yaml"), yaml.safe_dump(resolved).encode())

    # MLflow: rank 0 only; the tracking URI always explicit (docs/design.md trap 6)
    uri = cfg.mlflow.tracking_uri or tracking_uri()
    run_id = None
    if cfg.mlflow.enabled:
        from lightning.pytorch.loggers import MLFlowLogger

        if rank == 0:
            run_id = _mlflow_run(cfg, uri)
        logger = MLFlowLogger(
            tracking_uri=uri,
            run_id=run_id,
            experiment_name=cfg.mlflow.experiment,
            synchronous=False,  # per-step metrics queue in a thread; never stall a step
        )
        trainer.loggers = [logger]
        if rank == 0:
            logger.log_hyperparams(flatten_params(resolved))

    datamodule = ClipDataModule(
        dataset,
        tokenizer=tokenizer,
        # uint8 pixels from the workers, normalised on the device (the DataModule's hook)
        train_transform=train_transform(model_config.image_size, uint8=True),
        val_transform=eval_transform(model_config.image_size, uint8=True),
        image_size=model_config.image_size,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        resampled=cfg.resampled,
        val_data=cfg.val_data,
        val_fraction=cfg.val_fraction,
        val_max_samples=cfg.val_max_samples,
        pin_memory=trainer.strategy.root_device.type == "cuda",
    )
    check_shared_memory(  # SharedMemoryError naming the settings, before the first step
        batch_size=cfg.batch_size,
        image_size=model_config.image_size,
        context_length=model_config.context_length,
        workers=cfg.workers,
        prefetch_factor=PREFETCH_FACTOR,
        ranks_on_node=trainer.num_devices,
    )
    module = ClipLightningModule(
        model=model_config,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        warmup_steps=cfg.warmup_steps,
        min_lr_ratio=cfg.min_lr_ratio,
        loss=cfg.loss,
        local_loss=cfg.local_loss,
        gather_with_grad=cfg.gather_with_grad,
        accum_freq=cfg.accum_freq,
        grad_clip_norm=cfg.grad_clip_norm,
        metrics_path=join(out, "metrics.jsonl"),
        print_every=cfg.print_every_n_steps,
        log_every=cfg.log_every_n_steps or (1 if device == "cpu" else 20),
        fused_adamw=options["fused_adamw"],
        channels_last=options["channels_last"],
        compile=options["compile"],
    )
    if rank == 0:
        print(
            f"training {model_config.name} on {dataset.url}: {datamodule.train_samples} train / "
            f"{datamodule.val_samples} val samples, world {trainer.world_size} x batch "
            f"{cfg.batch_size}, resume from {resume_path or 'scratch'}",
            flush=True,
        )
    monitor = contextlib.nullcontext()
    if run_id is not None and cfg.mlflow.system_metrics_interval:
        from storage.tracking import system_metrics

        monitor = system_metrics(run_id, uri, cfg.mlflow.system_metrics_interval)
    with monitor:  # system/... metrics (CPU, memory, GPU) on the training run, rank 0's machine
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path, weights_only=False)
        if datamodule.val_samples:
            trainer.validate(module, datamodule=datamodule, verbose=False)

    # what every rank's workers met: distinct corrupt shards, replaced samples
    errors = (sorted(datamodule.corrupt_shards), datamodule.bad_samples)
    if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
        gathered: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(gathered, errors)
    else:
        gathered = [errors]
    if rank != 0:
        return {}

    result: dict[str, Any] = {
        "checkpoint": checkpoint_cb.last_path,
        "checkpoint_dir": cfg.checkpoints,
        "global_step": trainer.global_step,
        "epoch": datamodule.position.epoch,
        "world_size": trainer.world_size,
        "global_batch_size": cfg.batch_size * cfg.accum_freq * trainer.world_size,
        "metrics": dict(module.last_metrics),
        "data": {
            "train_samples": datamodule.train_samples,
            "val_samples": datamodule.val_samples,
            "corrupt_shards": sorted({s for names, _ in gathered for s in names}),
            "bad_samples": sum(n for _, n in gathered),
        },
        "tokenizer": tokenizer_ref,
        "config": join(out, "config.yaml"),
        "resumed_from": resume_path,
        "seconds": round(time.time() - started, 1),
        "mlflow": None,
    }
    if cfg.mlflow.enabled:
        result["mlflow"] = _log_outputs(cfg, uri, run_id, module, result)
    atomic_write_bytes(join(out, "final_metrics.json"), json.dumps(result, indent=2).encode())
    print(f"final metrics: {json.dumps(result['metrics'])}", flush=True)
    return result


def _log_outputs(
    cfg: TrainConfig, uri: str, run_id: str, module: Any, result: dict[str, Any]
) -> dict[str, Any]:
    """Artifacts (config, tokenizer, final checkpoint) and the registered pyfunc model."""
    import mlflow

    from clip_model.pyfunc import log_pyfunc_model
    from storage.fs import local_path  # MLflow logs local files; out_dir may be object storage

    mlflow.set_tracking_uri(uri)
    mlflow.flush_async_logging()  # the per-step metrics MLFlowLogger queued
    info: dict[str, Any] = {"tracking_uri": uri, "run_id": run_id}
    with mlflow.start_run(run_id=run_id):  # reopens the child run MLFlowLogger closed
        mlflow.log_metrics({k: v for k, v in result["metrics"].items() if k.startswith("val/")})
        mlflow.log_artifact(local_path(result["config"]))
        tokenizer = result["tokenizer"]
        if tokenizer != "openai":
            tokenizer = local_path(tokenizer)
            mlflow.log_artifact(tokenizer)
        if result["checkpoint"]:
            mlflow.log_artifact(local_path(result["checkpoint"]), artifact_path="checkpoints")
        if cfg.mlflow.log_model:
            model_info = log_pyfunc_model(
                module.model,
                tokenizer=tokenizer,
                registered_model_name=cfg.mlflow.registered_model,
            )
            info["model_uri"] = model_info.model_uri
            info["registered_model"] = cfg.mlflow.registered_model
            info["registered_version"] = model_info.registered_model_version
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_model.train",
        description="Contrastive pretraining of clip_model on a storage dataset (see docstring).",
    )
    parser.add_argument("--config", help="YAML file of TrainConfig keys")
    parser.add_argument("overrides", nargs="*", help="key=value (YAML value), dotted for nested")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after tokenising
    try:
        config = args.config
        if config and "://" in config:  # the flow's out_dir on object storage: a local copy
            from storage.fs import local_path

            config = local_path(config)
        cfg = load_config(config, args.overrides)
        check_hardware(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train(cfg)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # every rank waits for rank 0's MLflow logging, then the group is closed on all of them:
        # a rank that exits with gloo still connected can abort (SIGABRT) while its peer works
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
