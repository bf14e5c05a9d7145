"""`clip_pipeline`: a URL list to an evaluated CLIP, each stage its own flow run as a subflow.

    python -m flows.pipeline --profile tiny            # the sample web, on this CPU (make sample)
    python -m flows.pipeline --profile cc3m_vitb32     # a CC3M-sized crawl, ViT-B/32, torchrun
    python -m flows.pipeline --profile tiny --set train.settings.max_steps=50

    ingest (img2dataset) -> curate (filters, dedup, decontamination) -> train (Lightning)
    -> evaluate (zero-shot, retrieval, linear probe)

One MLflow parent run per pipeline run, a nested child run per stage, the headline metrics, the
training dataset and the model on the parent, and a saved runs-table view that shows them; the
evaluation scores the registered version (models:/clip/N), linked to it. A stage whose input digest and parameters are unchanged is reused, not redone, so a rerun
after a failure resumes at the stage that failed.
"""

from __future__ import annotations

if __name__ == "__main__":  # parse and check the command line before the imports below
    from flows.cli import main

    raise SystemExit(main("pipeline"))

import time

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from flows import cli
from flows.curate import curate
from flows.evaluate import evaluate
from flows.ingest import ingest, print_summary
from flows.train import train
from storage import open_dataset
from storage.tracking import (
    fetch_registered_model,
    log_dataset,
    log_model_output,
    registered_uri,
    share_runs_view,
    stage_run,
    tracking_uri,
)
from tasks.evaluate import format_results_table, mlflow_metrics
from tasks.ingest import IngestResult
from tasks.params.pipeline import PipelineParams
from tasks.pipeline import (
    PipelineConfig,
    goal_line,
    load_profile,
    prepare_sample_web,
    summary_markdown,
    url_list_for,
    validate_stage_configs,
    with_project_paths,
)


class PipelineResult(BaseModel):
    name: str
    crawl: IngestResult
    dataset: str
    curated: str
    checkpoint: str | None
    metrics: dict[str, dict[str, float]]
    headline: dict[str, float]
    mlflow_run_id: str
    mlflow_view: str = ""  # the runs table with the headline columns: mlflow ui's URL + this
    reused: list[str]


@flow(name="clip-pipeline", flow_run_name="clip-pipeline-{profile}", log_prints=True)
def clip_pipeline(profile: str = "tiny", config: PipelineConfig | None = None) -> PipelineResult:
    """Run every stage for a profile name/path, or for an explicit `config`."""
    logger = get_run_logger()
    cfg = with_project_paths(config) if config is not None else load_profile(profile)
    validate_stage_configs(cfg)
    with stage_run(
        "pipeline", run_name=f"pipeline-{cfg.name}", params=cfg.model_dump(mode="json")
    ) as run:
        mlflow.log_dict(cfg.model_dump(mode="json"), "pipeline_config.json")
        eval_dirs = list(cfg.curate.eval_dirs)
        if cfg.sample_web is not None:
            prepare_sample_web(cfg.sample_web, cfg.sample_dir)
            eval_dirs.append(f"{cfg.sample_dir}/eval")
        with url_list_for(cfg) as url_list:
            crawled = ingest(url_list=url_list, output=cfg.path("ingest"), params=cfg.ingest.crawl)
        curated = curate(
            input=crawled.dataset,
            output=cfg.path("curate"),
            filters=cfg.curate.filters,
            eval_dirs=eval_dirs,
            num_shards=cfg.curate.num_shards,
            workers=cfg.curate.workers,
            engine=cfg.curate.engine,
            ray_address=cfg.curate.ray_address,
        )
        trained = train(
            data=curated.dataset,
            config=cfg.train.config,
            settings=cfg.train_items(curated.dataset, curated.digest),
        )
        # the registered version when there is one: its page then lists this evaluation
        model_uri = registered_uri(trained.registered_model, trained.registered_version)
        evaluated = evaluate(
            checkpoint=model_uri or trained.checkpoint,
            suite=cfg.evaluate.suite,
            root=cfg.evaluate.root or cfg.sample_dir,
            output=cfg.path("evaluate"),
            tasks=cfg.evaluate.tasks,
            precision=cfg.evaluate.precision,
        )
        headline = {
            "ingest/samples": crawled.samples,
            "ingest/success_rate": crawled.samples / crawled.rows,
            "curate/kept": curated.kept,
            "curate/removed": curated.input_samples - curated.kept,
            **{k: v for k, v in trained.metrics.items() if k.endswith("loss")},
            **mlflow_metrics(evaluated.metrics),
        }
        mlflow.log_metrics(headline)
        # the runs table: this run's training data, model and headline metrics in view
        log_dataset(open_dataset(curated.dataset), context="training")
        if model_uri:
            log_model_output(run.info.run_id, fetch_registered_model(model_uri).model_id)
        view = share_runs_view(run.info.experiment_id, "pipeline", list(headline))
        stages = {"ingest": crawled, "curate": curated, "train": trained, "evaluate": evaluated}
        reused = [name for name, r in stages.items() if getattr(r, "skipped", False)]
        mlflow.set_tags(
            {"pipeline.profile": cfg.name, "pipeline.reused_stages": ",".join(reused) or "none"}
        )
        run_url = f"{tracking_uri()} run {run.info.run_id} (mlflow ui: {view})"
        create_markdown_artifact(
            key=f"pipeline-{cfg.name}".lower().replace("_", "-").replace(".", "-"),
            markdown=summary_markdown(cfg, stages, headline, run_url),
            description=f"clip_pipeline {cfg.name}",
        )
        logger.info("pipeline %s done; reused: %s", cfg.name, ", ".join(reused) or "nothing")
    return PipelineResult(
        name=cfg.name,
        crawl=crawled,
        dataset=crawled.dataset,
        curated=curated.dataset,
        checkpoint=trained.checkpoint,
        metrics=evaluated.metrics,
        headline=headline,
        mlflow_run_id=run.info.run_id,
        mlflow_view=view,
        reused=reused,
    )


def run(params: PipelineParams) -> int:
    """The command line's work, after flows/cli.py parsed and checked it."""
    cfg = params.config()
    result = clip_pipeline(profile=params.profile, config=cfg)
    print_summary(result.crawl)
    print(f"\nZero-shot results of {result.checkpoint}:")
    print(format_results_table(result.metrics))
    if cfg.goals is not None:
        import psutil

        # from this process's start: imports and the Prefect server's start-up count too
        wall = time.time() - psutil.Process().create_time()
        print(goal_line(cfg.goals, result.metrics, wall))
    print(f"\nReused stages: {', '.join(result.reused) or 'none'}")
    print(f"MLflow run {result.mlflow_run_id}; browse every run with:")
    print(f"    .venv/bin/mlflow ui --backend-store-uri {tracking_uri()}")
    print(f"and open http://127.0.0.1:5000/{result.mlflow_view} (the headline metrics' view)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("pipeline", argv)
