"""The `index` flow: embed a dataset with a CLIP and build a FAISS index to search it.

    python -m flows.index --checkpoint runs/last.pt --data data/crawl --output data/index
    python -m flows.search --index data/index --text "a red star" -k 10

The checkpoint is this project's, OpenAI's or OpenCLIP's (clip_model.from_state_dict reads
them; --model names the architecture of weights that do not say it, docs/checkpoints.md). Every
image and caption is embedded, shard by shard, into OUTPUT/embeddings/ (layout:
storage/embeddings.py); then the image vectors go into a FAISS index, exact below 100k vectors,
IVF above. Rerunning resumes at the first shard not embedded; after the dataset grew, only its
new shards are embedded and added. The run is logged to MLflow (stage "index": vectors,
images/s) and the index's manifest is kept as an artifact.
"""

from __future__ import annotations

import argparse
import sys
import time

import mlflow
from prefect import flow, get_run_logger
from tqdm import tqdm

from clip_model.checkpoint import load_clip
from clip_model.precision import PRECISIONS, accepted_spellings, parse_precision
from storage import open_dataset
from storage.embeddings import EmbeddingStore, choose_spec
from storage.tracking import log_dataset, stage_run
from tasks.index import IndexResult, build_index, embed_shard, plan_index
from tasks.search import ClipEncoder


@flow(name="index", flow_run_name="index-{output}", log_prints=True)
def index(
    checkpoint: str,
    data: str,
    output: str,
    kind: str = "auto",
    batch_size: int = 64,
    dtype: str = "float32",
    precision: str = "fp32",
    device: str = "cpu",
    allow_torchscript: bool = False,
    model: str | None = None,
) -> IndexResult:
    """Embed the dataset `data` with the model in `checkpoint` into the index folder `output`."""
    logger = get_run_logger()
    choose_spec(1, kind=kind)  # refuse an unknown kind before any work
    precision = parse_precision(precision).name  # one name per behaviour: amp_bf16 is bf16
    clip = load_clip(checkpoint, model=model, allow_torchscript=allow_torchscript)
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
        encoder = ClipEncoder(clip, device=device, batch_size=batch_size, precision=precision)
        t0, images = time.perf_counter(), 0
        with tqdm(total=sum(sizes[s.name] for s in pending), unit="img", desc="embed") as bar:
            for entry in pending:
                done = embed_shard(dataset, output, entry, encoder, dtype=dtype, progress=bar)
                images += done.num_vectors
                shards = [done if s.name == done.name else s for s in manifest.shards]
                manifest = store.write_manifest(manifest.model_copy(update={"shards": shards}))
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.index", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="model weights (ours, OpenAI, OpenCLIP)")
    p.add_argument("--data", required=True, help="dataset folder or fsspec URL")
    p.add_argument("--output", required=True, help="index folder or fsspec URL")
    p.add_argument(
        "--kind",
        default="auto",
        choices=["auto", "flat", "ivf", "hnsw"],
        help="FAISS index kind (auto: exact up to 100k vectors, IVF above)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16"],
        help="embedding files on disk (float16: half the size, scores rounded to ~1e-3)",
    )
    p.add_argument(
        "--model",
        help="the architecture, when the weights do not say it: a preset as OpenCLIP names it "
        "(ViT-B-32 is GELU, ViT-B-32-quickgelu OpenAI's) or a config YAML/JSON",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=list(PRECISIONS),
        metavar="PRECISION",
        help=f"{accepted_spellings()} (docs/checkpoints.md)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--allow-torchscript",
        action="store_true",
        help="load a TorchScript checkpoint (OpenAI's .pt releases): it runs the file's code",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = index(**vars(args))
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


if __name__ == "__main__":
    sys.exit(main())
