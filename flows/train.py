"""The `train` flow: contrastive pretraining of a CLIP on a dataset, tracked in MLflow.

    python -m flows.train --data data/crawl --model tiny --max-steps 500
    python -m flows.train --data data/crawl --config configs/train/tiny.yaml --devices 2 \\
        --accelerator cpu --set precision=bf16-mixed --set checkpoint.every_n_steps=50

The flow resolves the config (file, then these options, then `--set key=value`), opens the MLflow
stage run, and launches `python -m clip_model.train` as a subprocess (torchrun for several
devices) whose child MLflow run holds the per-step and system metrics, artifacts and the registered
pyfunc model (alias @candidate). --promote, or `--set mlflow.champion_metric=val/loss` when the new
value beats the champion's, moves @champion to it. It returns where the checkpoints are and the
final metrics. A rerun of the same training (same config, less `resume`, same data) whose
earlier run died continues it from its newest checkpoint; one that finished is reused.
"""

from __future__ import annotations

if __name__ == "__main__":  # parse and check the command line before the imports below
    from flows.cli import main

    raise SystemExit(main("train"))

import mlflow
from prefect import flow

from clip_model.train_config import TrainConfig
from flows import cli
from storage import Dataset, open_dataset
from storage.tracking import log_dataset, stage_run, tracking_uri
from tasks.params.train import TrainParams
from tasks.train import (
    TrainResult,
    finished_training,
    promote_champion,
    record_training,
    resolve_train_config,
    resume_unfinished,
    run_training,
    training_key,
    write_train_config,
)
from tasks.train_output import start_writing, training_output


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
    promote: bool = False,
    settings: list[str] | None = None,
    force: bool = False,
) -> TrainResult:
    """Train `model` (default: the config's, else "tiny") on the dataset `data`.

    Returns where the checkpoints are and the final metrics (TrainResult). `force`: replace an
    out_dir that holds files no training wrote.
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
        "mlflow.promote": promote or None,  # not given: the config's
    }
    if devices and devices > 1:
        options["strategy"] = "ddp"
    cfg = resolve_train_config(config, options, settings or [])
    dataset = open_dataset(cfg.data)
    key = training_key(cfg, dataset.digest)
    # out_dir: checked, locked and marked unfinished while a run writes it (tasks/train_output.py)
    with training_output(cfg, force) as out:
        result = finished_training(cfg, key)
        if result is not None:
            print(f"{cfg.out_dir} holds this training ({key[:19]}); reusing {result.checkpoint}")
        else:
            start_writing(out)
            result = _train(cfg, key, dataset)
            print(
                f"trained {result.global_step} steps ({result.world_size} x batch "
                f"{result.global_batch_size // result.world_size}); checkpoint {result.checkpoint}"
            )
        out.commit()
    promote_champion(cfg, result)
    return result


def _train(cfg: TrainConfig, key: str, dataset: Dataset) -> TrainResult:
    """One run of the trainer into out_dir, its result recorded there last (train_done.json)."""
    cfg = resume_unfinished(cfg, key)
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
    return result


def run(params: TrainParams) -> int:
    """The command line's work, after flows/cli.py parsed and checked it."""
    result = train(**params.model_dump())
    print(result.model_dump_json(indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("train", argv)
