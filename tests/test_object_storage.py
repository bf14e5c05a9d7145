"""Object storage: stage paths keep their URL's protocol, and the `micro` pipeline runs end to end
against a real S3 API (moto's standalone server on 127.0.0.1, started and stopped here)."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from tasks.pipeline import ProfileError, load_profile

# ---- a real S3 API -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on a free loopback port, found by every process through the environment
    (AWS_ENDPOINT_URL: the trainer and img2dataset are subprocesses); yields an s3fs client."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs = s3fs.S3FileSystem()
        fs.mkdir("bucket")
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        # the server's buckets live in this process's moto backends, not in the server: reset them
        reset = urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset, timeout=30).close()
        server.stop()


def test_listings_see_what_other_processes_wrote(s3):
    """img2dataset's workers write the crawl's shards while the flow lists them: a listing cached
    by this process must never hide them (s3fs caches listings for good by default)."""
    import s3fs

    from storage.fs import exists, filesystem

    other = s3fs.S3FileSystem(skip_instance_cache=True)  # another process's client
    other.pipe("bucket/crawl/shards/_tmp/0.feather", b"rows")
    fs, root = filesystem("s3://bucket/crawl/shards")
    assert fs.glob(f"{root}/*_stats.json") == []
    other.pipe("bucket/crawl/shards/00000_stats.json", b"{}")
    assert fs.glob(f"{root}/*_stats.json") == ["bucket/crawl/shards/00000_stats.json"]
    assert exists("s3://bucket/crawl/shards/00000_stats.json")


def test_local_path_fetches_a_remote_file_once_per_version(s3, tmp_path, monkeypatch):
    from storage.fs import atomic_write_bytes, local_path

    monkeypatch.setenv("CLIP_PIPELINE_FS_CACHE", str(tmp_path / "cache"))
    atomic_write_bytes("s3://bucket/run/tokenizer.json", b"first")
    first = local_path("s3://bucket/run/tokenizer.json")
    assert first.endswith("/tokenizer.json") and open(first, "rb").read() == b"first"
    assert local_path("s3://bucket/run/tokenizer.json") == first
    atomic_write_bytes("s3://bucket/run/tokenizer.json", b"second, longer")
    second = local_path("s3://bucket/run/tokenizer.json")
    assert second != first and open(second, "rb").read() == b"second, longer"
    assert local_path(str(tmp_path / "x.json")) == str(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="s3://bucket/run/nothing.json"):
        local_path("s3://bucket/run/nothing.json")


def test_local_output_uploads_only_what_succeeded(s3):
    from storage.fs import local_output

    with local_output("s3://bucket/out/plot.png") as path:
        assert path.endswith("/plot.png")
        with open(path, "wb") as f:
            f.write(b"png")
    assert s3.cat("bucket/out/plot.png") == b"png"
    with pytest.raises(RuntimeError), local_output("s3://bucket/out/broken.png") as path:
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("the library failed")
    assert not s3.exists("bucket/out/broken.png")
    assert s3.ls("bucket/out") == ["bucket/out/plot.png"]


def test_stage_paths_keep_the_url_protocol():
    cfg = load_profile(
        "micro",
        {
            "data_root": "s3://bucket/clip/",
            "sample_web": None,
            "ingest.url_list": "s3://b/u.parquet",
        },
    )
    assert cfg.path("ingest") == "s3://bucket/clip/ingest/micro"
    assert cfg.path("curate") == "s3://bucket/clip/curate/micro"
    out_dir = next(o.value for o in cfg.train_overrides(cfg.path("curate")) if o.key == "out_dir")
    assert out_dir.startswith("s3://bucket/clip/train/micro/run-")


def test_sample_web_has_its_own_local_folder_under_object_storage(tmp_path):
    cfg = load_profile(
        "micro", {"data_root": "s3://bucket/clip", "sample_web.dir": str(tmp_path / "web")}
    )
    assert cfg.sample_dir == str(tmp_path / "web")
    assert cfg.path("evaluate") == "s3://bucket/clip/evaluate/micro"


def test_local_data_root_is_unchanged(tmp_path):
    cfg = load_profile("micro", {"data_root": str(tmp_path / "data")})
    assert cfg.path("curate") == str(tmp_path / "data" / "curate" / "micro")
    assert cfg.sample_dir == str(tmp_path / "data" / "sample_web")


def test_sample_web_under_object_storage_is_refused():
    with pytest.raises(ProfileError, match=r"sample_web\.dir: .*local folder.*s3://bucket/clip"):
        load_profile("micro", {"data_root": "s3://bucket/clip"})
    with pytest.raises(ProfileError, match=r"sample_web\.dir: .*local folder"):
        load_profile("micro", {"sample_web.dir": "s3://bucket/web"})


@pytest.mark.slow
@pytest.mark.timeout(2400)  # two pipeline runs and an index; past 900 s on a loaded 2-core machine
def test_micro_pipeline_runs_on_object_storage(s3, tmp_path, prefect_harness, mlflow_tmp):
    from flows.pipeline import clip_pipeline

    cfg = load_profile(
        "micro",
        {  # a fixed port: the URL list, and so the crawl, stay the same for the rerun
            "data_root": "s3://bucket/clip",
            "sample_web.dir": str(tmp_path / "web"),
            "sample_web.port": free_port(),
        },
    )
    result = clip_pipeline(config=cfg)

    assert result.dataset == "s3://bucket/clip/ingest/micro"
    assert result.curated == "s3://bucket/clip/curate/micro"
    for dataset in ("ingest", "curate"):
        assert s3.exists(f"bucket/clip/{dataset}/micro/manifest.json")
    assert result.checkpoint.startswith("s3://bucket/clip/train/micro/run-")
    assert s3.exists(result.checkpoint)
    assert s3.exists("bucket/clip/evaluate/micro/results.json")
    assert s3.glob("bucket/clip/evaluate/micro/*/results.json")
    assert result.headline["curate/kept"] > 0 and "digits/acc1" in result.headline
    # nothing of the run's outputs on the local disk: the sample web and MLflow's store only
    local = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in local if n != "web" and not n.startswith(("mlflow", "mlruns"))] == [], local

    again = clip_pipeline(config=cfg)
    assert again.reused == ["ingest", "curate", "train", "evaluate"]
    assert again.checkpoint == result.checkpoint and again.metrics == result.metrics

    # the index of the curated data, built and searched on object storage too
    from flows.index import index
    from tasks.search import SearchIndex

    built = index(
        checkpoint=result.checkpoint, data=result.curated, output="s3://bucket/clip/index/micro"
    )
    assert 0 < built.vectors <= result.headline["curate/kept"]
    assert s3.find("bucket/clip/index/micro")
    hits = SearchIndex.open("s3://bucket/clip/index/micro").query_text("a red circle", k=3)
    assert len(hits) == 3 and all(h.key for h in hits)
