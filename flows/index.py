"""The `index` flow: embed a dataset with a CLIP and build a FAISS index to search it.

    python -m flows.index --checkpoint runs/last.pt --data data/crawl --output data/index
    python -m flows.index --checkpoint models:/clip-tiny@champion --data data/crawl --output data/index
    python -m flows.search --index data/index --text "a red star" -k 10

The checkpoint is this project's, OpenAI's or OpenCLIP's (clip_model.from_state_dict reads
them; --model names the architecture of weights that do not say it, docs/checkpoints.md). Every
image and caption is embedded, shard by shard, into OUTPUT/embeddings/ (layout:
storage/embeddings.py); then the image vectors go into a FAISS index, exact below 100k vectors,
IVF above. Rerunning resumes at the first shard not embedded; after the dataset grew, only its
new shards are embedded and added. OUTPUT is written in place under its lock
(docs/stage-outputs.md, `mode="in_place"`): an OUTPUT inside the dataset, a second run on it, or
a folder no index run wrote (without --force) is refused. The run is logged to MLflow (stage "index": vectors,
images/s) and the index's manifest is kept as an artifact.
"""

from __future__ import annotations

if __name__ == "__main__":  # parse and check the command line before the imports below
    from flows.cli import main

    raise SystemExit(main("index"))

import time

import mlflow
from prefect import flow, get_run_logger

from clip_model.checkpoint import load_clip
from clip_model.embedder import Embedder
from clip_model.precision import parse_precision
from clip_model.progress import progress_bar
from flows import cli
from storage import open_dataset, stage_output
from storage.embeddings import EmbeddingStore, choose_spec
from storage.tracking import fetch_registered_model, is_model_uri, log_dataset, stage_run
from tasks.index import IndexResult, build_index, embed_shard, plan_index
from tasks.params.index import IndexParams


class _ImageCount:
    """Images embedded so far, shown beside the shard bar (embed_shard reports every batch)."""

    def __init__(self, bar, total: int):
        self.bar, self.total, self.done = bar, total, 0

    def update(self, n: int) -> None:
        self.done += n
        self.bar.set_postfix_str(f"{self.done}/{self.total} images", refresh=True)


@flow(name="index", flow_run_name="index-{output}", log_prints=True)
def index(
    checkpoint: str,
    data: str,
    output: str,
    kind: str = "auto",
    batch_size: int = 64,
    dtype: str = "float32",
    precision: str = "fp32",
    device: str = "auto",
    allow_torchscript: bool = False,
    model: str | None = None,
    force: bool = False,
) -> IndexResult:
    """Embed the dataset `data` with the model in `checkpoint` into the index folder `output`."""
    choose_spec(1, kind=kind)  # refuse an unknown kind before any work
    precision = parse_precision(precision).name  # one name per behaviour: amp_bf16 is bf16
    # one index run per folder; any index of this stage is resumable state (plan_index refuses
    # one of another model or dtype), anything else needs --force
    local = [] if is_model_uri(checkpoint) else [checkpoint]  # a registry URI names no file here
    with stage_output(
        output, stage="index", inputs=[data, *local], force=force, mode="in_place"
    ) as out:
        result = _index(
            checkpoint, data, output, kind, batch_size, dtype, precision, device,
            allow_torchscript, model,
        )  # fmt: skip
        out.commit()
    return result


def _index(
    checkpoint: str,
    data: str,
    output: str,
    kind: str,
    batch_size: int,
    dtype: str,
    precision: str,
    device: str,
    allow_torchscript: bool,
    model: str | None,
) -> IndexResult:
    logger = get_run_logger()
    # models:/name@alias or models:/name/version: the registered weights, fetched once
    weights = fetch_registered_model(checkpoint).weights if is_model_uri(checkpoint) else checkpoint
    clip = load_clip(weights, model=model, allow_torchscript=allow_torchscript)
    dataset = open_dataset(data)
    params = {
        "checkpoint": checkpoint,
        "data": data,
        "output": output,
        "kind": kind,
        "batch_size": batch_size,
        "dtype": dtype,
        "precision": precision,
        "model_id": clip.model_id,
        "model": clip.model.config.name,
    }
    with stage_run("index", params=params) as run:
        log_dataset(dataset, context="input")
        store = EmbeddingStore(output)
        manifest = plan_index(dataset, output, clip, dtype)
        pending = [s for s in manifest.shards if s.status == "pending"]
        sizes = {s.name: s.num_samples for s in dataset.manifest.shards}
        logger.info(
            "%s: %d shard(s) to embed, %d already embedded",
            output,
            len(pending),
            len(manifest.shards) - len(pending),
        )
        embedder = Embedder.of(  # the flow's own bar counts images over every shard
            clip, device=device, precision=precision, batch_size=batch_size, progress=False
        )
        t0, images = time.perf_counter(), 0
        # a bar per shard (quiet when stderr is not a terminal), the images counted beside it
        with progress_bar(total=len(pending), unit="shard", desc="embed") as bar:
            counter = _ImageCount(bar, sum(sizes[s.name] for s in pending))
            for entry in pending:
                done = embed_shard(dataset, output, entry, embedder, dtype=dtype, progress=counter)
                images += done.num_vectors
                shards = [done if s.name == done.name else s for s in manifest.shards]
                manifest = store.write_manifest(manifest.model_copy(update={"shards": shards}))
                bar.update(1)
        seconds = time.perf_counter() - t0
        manifest, rebuilt = build_index(output, manifest, kind)
        images_per_s = images / seconds if images else 0.0
        mlflow.log_metrics(
            {
                "vectors": manifest.index.vectors,
                "images_per_s": round(images_per_s, 2),
                "embedded_shards": len(pending),
                "skipped_images": sum(s.skipped for s in manifest.shards),
            }
        )
        mlflow.log_dict(manifest.model_dump(mode="json"), "index.json")
        mlflow.set_tag("index_kind", manifest.index.spec.describe())
    return IndexResult(
        index=output,
        vectors=manifest.index.vectors,
        kind=manifest.index.spec.describe(),
        embedded_shards=len(pending),
        reused_shards=len(manifest.shards) - len(pending),
        skipped_images=sum(s.skipped for s in manifest.shards),
        images_per_s=round(images_per_s, 2),
        rebuilt=rebuilt,
        model_id=clip.model_id,
        dataset_digest=dataset.digest,
        mlflow_run_id=run.info.run_id,
    )


def run(params: IndexParams) -> int:
    """The command line's work, after flows/cli.py parsed and checked it."""
    result = index(**params.model_dump())
    print(
        f"\n{result.index}: {result.vectors} vectors ({result.kind}); "
        f"{result.embedded_shards} shard(s) embedded, {result.reused_shards} reused; "
        f"{result.images_per_s:.1f} images/s"
        + (
            f"; {result.skipped_images} undecodable image(s) left out"
            if result.skipped_images
            else ""
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("index", argv)
