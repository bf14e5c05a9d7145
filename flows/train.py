"""The `train` flow: contrastive pretraining of a CLIP on a dataset, tracked in MLflow.

    python -m flows.train --data data/crawl --model tiny --max-steps 500
    python -m flows.train --data data/crawl --config configs/train/tiny.yaml --devices 2 \\
        --accelerator cpu --set precision=bf16-mixed --set checkpoint.every_n_steps=50

The flow resolves the config (file, then these options, then `--set key=value`), opens the MLflow
stage run, and launches `python -m clip_model.train` as a subprocess (torchrun for several
devices) whose child MLflow run holds the per-step metrics, artifacts and the registered pyfunc
model. It returns where the checkpoints are and the final metrics.
"""

from __future__ import annotations

import argparse
import sys

import mlflow
from prefect import flow

from clip_model.precision import PRECISIONS, accepted_spellings
from storage import open_dataset
from storage.tracking import log_dataset, stage_run, tracking_uri
from tasks.train import (
    TrainResult,
    finished_training,
    record_training,
    resolve_train_config,
    run_training,
    training_key,
    write_train_config,
)


@flow(name="train", log_prints=True)
def train(
    data: str,
    model: str | None = None,
    out_dir: str | None = None,
    config: str | None = None,
    max_steps: int | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    devices: int | None = None,
    accelerator: str | None = None,
    precision: str | None = None,
    registered_model: str | None = None,
    settings: list[str] | None = None,
) -> TrainResult:
    """Train `model` (default: the config's, else "tiny") on the dataset `data`.

    Returns where the checkpoints are and the final metrics (TrainResult).
    """
    options = {
        "data": data,
        "model": model,
        "out_dir": out_dir,
        "max_steps": max_steps,
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "devices": devices,
        "accelerator": accelerator,
        "precision": precision,
        "mlflow.registered_model": registered_model,
    }
    if devices and devices > 1:
        options["strategy"] = "ddp"
    cfg = resolve_train_config(config, options, settings or [])
    dataset = open_dataset(cfg.data)
    key = training_key(cfg, dataset.digest)
    done = finished_training(cfg, key)
    if done is not None:
        print(f"{cfg.out_dir} already holds this training ({key[:19]}); reusing {done.checkpoint}")
        return done
    with stage_run("train", params=cfg.model_dump(mode="json")) as run:
        log_dataset(dataset, context="input")
        tracking = cfg.mlflow.model_copy(
            update={"parent_run_id": run.info.run_id, "tracking_uri": tracking_uri()}
        )
        cfg = cfg.model_copy(update={"mlflow": tracking})
        result = run_training(cfg, write_train_config(cfg))
        mlflow.log_metrics({k: v for k, v in result.metrics.items() if k.startswith("val/")})
        mlflow.log_metric("global_step", result.global_step)
        record_training(cfg, key, result)
    print(
        f"trained {result.global_step} steps ({result.world_size} x batch "
        f"{result.global_batch_size // result.world_size}); checkpoint {result.checkpoint}"
    )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset folder or fsspec URL")
    p.add_argument("--model", help="model preset name or YAML path (default: tiny)")
    p.add_argument("--out", dest="out_dir", help="run folder (checkpoints, metrics, tokenizer)")
    p.add_argument("--config", help="a TrainConfig YAML (configs/train/*.yaml)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per device")
    p.add_argument("--devices", type=int, help="processes (GPUs, or CPU ranks with gloo)")
    p.add_argument("--accelerator", choices=["auto", "cpu", "gpu", "cuda", "mps"])
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        metavar="PRECISION",
        help=f"{accepted_spellings()} (clip_model/precision.py)",
    )
    p.add_argument("--registered-model", help="MLflow model registry name")
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other TrainConfig field, dotted for nested (repeatable)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = vars(parse_args(argv))
    result = train(**args)
    print(result.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
