"""Curation that scales out: the same output whatever the engine and worker count, a validation
split held out by key hash, and the engine's own contract (results in order, failures raised)."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

from storage import open_dataset
from storage.fs import join, sha256_file
from tasks.curation import REJECTED_NAME, open_input, parse_filter_spec, select_samples
from tasks.curation.write import VAL_NAME, is_validation, write_curated
from tasks.engine import Engine
from tests.test_curate import EXPECTED, SPEC, build_crawl


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    return build_crawl(tmp_path_factory.mktemp("crawl"), per_shard=5)  # 5 input shards


def _curate(crawl, eval_dir, out, engine: Engine, **spec_fields):
    url, _ = crawl
    spec = parse_filter_spec({**SPEC, **spec_fields}).with_eval_dirs([str(eval_dir)])
    ds, bad = open_input(url)
    sel = select_samples(ds, spec, bad_shards=bad, engine=engine, progress=False)
    manifest = write_curated(
        ds,
        sel,
        str(out),
        num_shards=spec.num_shards,
        parameters={"spec": spec.model_dump(mode="json")},
        val_fraction=spec.val_fraction,
        engine=engine,
        progress=False,
    )
    return sel, manifest


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    from tests.test_curate import picture, png

    root = tmp_path_factory.mktemp("eval")
    (root / "digits").mkdir()
    for s in (1000, 1001):
        (root / "digits" / f"{s}.png").write_bytes(png(picture(s, 96)))
    return root


@pytest.mark.slow  # ~50 s on a loaded 2-core machine: two spawned workers import the stack
def test_local_pool_writes_what_one_process_writes(crawl, eval_dir, tmp_path):
    one_sel, one = _curate(crawl, eval_dir, tmp_path / "one", Engine())
    two_sel, two = _curate(crawl, eval_dir, tmp_path / "two", Engine(workers=2))
    assert two.digest == one.digest
    assert one_sel.removed == two_sel.removed
    assert one_sel.reason.tolist() == two_sel.reason.tolist()
    assert sha256_file(join(str(tmp_path / "two"), REJECTED_NAME)) == sha256_file(
        join(str(tmp_path / "one"), REJECTED_NAME)
    )
    rejected = pq.read_table(join(str(tmp_path / "two"), REJECTED_NAME)).to_pylist()
    assert {r["key"] for r in rejected} == set(EXPECTED)


@pytest.mark.slow
def test_ray_writes_what_one_process_writes(crawl, eval_dir, tmp_path):
    ray = pytest.importorskip("ray")
    _, local = _curate(crawl, eval_dir, tmp_path / "local", Engine())
    ray.init(num_cpus=2, include_dashboard=False)  # docs/design.md, trap 15
    try:
        _, on_ray = _curate(crawl, eval_dir, tmp_path / "ray", Engine(kind="ray", workers=2))
    finally:
        ray.shutdown()
    assert on_ray.digest == local.digest
    assert open_dataset(str(tmp_path / "ray"), verify=True).manifest.digest == local.digest


def test_validation_split_is_held_out_by_key_hash(crawl, eval_dir, tmp_path):
    sel, manifest = _curate(crawl, eval_dir, tmp_path / "out", Engine(), val_fraction=0.4)
    kept = sel.samples.column("key").filter(sel.kept).to_pylist()
    expected_val = {k for k, v in zip(kept, is_validation(kept, 0.4), strict=True) if v}
    assert 0 < len(expected_val) < len(kept)

    train = open_dataset(str(tmp_path / "out"), verify=True)
    val = open_dataset(join(str(tmp_path / "out"), VAL_NAME), verify=True)
    train_keys = {s.key for s in train.iter_samples()}
    val_keys = {s.key for s in val.iter_samples()}
    assert val_keys == expected_val and not train_keys & val_keys
    assert train_keys | val_keys == set(kept)
    assert manifest.stats["val"]["samples"] == len(val_keys) == val.manifest.total_samples
    assert manifest.stats["val"]["digest"] == val.manifest.digest
    assert val.manifest.producer.parameters["split"] == VAL_NAME
    # the training shards share the remaining samples evenly
    sizes = [s.num_samples for s in manifest.shards]
    assert sum(sizes) == len(train_keys) and max(sizes) - min(sizes) <= 1


def test_validation_membership_is_stable_and_about_the_fraction():
    keys = [f"{i:09d}" for i in range(20_000)]
    held = is_validation(keys, 0.05)
    assert abs(held.mean() - 0.05) < 0.01
    assert (is_validation(keys[::-1], 0.05)[::-1] == held).all()  # order does not matter
    assert not is_validation(keys, 0.0).any()


def test_engine_returns_results_in_order_and_raises_a_shards_failure():
    items = [9.0, 4.0, 1.0, 16.0, 25.0]
    for engine in (Engine(), Engine(workers=2)):
        assert list(engine.map(math.sqrt, items, progress=False)) == [3.0, 2.0, 1.0, 4.0, 5.0]
        with pytest.raises(ValueError, match="math domain error"):
            list(engine.map(math.sqrt, [1.0, -1.0, 4.0], progress=False))


def test_engine_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="accepted are local, ray"):
        Engine(kind="spark")
    with pytest.raises(ValueError, match="needs engine kind 'ray'"):
        Engine(address="auto")


def test_curate_command_refuses_a_ray_address_without_the_ray_engine(tmp_path):
    from tests.test_cli import refused, run_cli

    p = run_cli("flows.curate", "--input", str(tmp_path), "--output", str(tmp_path / "c"),
                "--filters", "sample", "--ray-address", "auto")  # fmt: skip
    assert "--ray-address auto needs --engine ray" in refused(p)


def test_a_profile_runs_curation_on_ray_by_its_curate_section():
    from tasks.params.pipeline import ProfileError, load_profile

    cfg = load_profile("micro", ["curate.engine=ray", "curate.ray_address=auto"])
    assert (cfg.curate.engine, cfg.curate.ray_address, cfg.curate.workers) == ("ray", "auto", 0)
    with pytest.raises(ProfileError, match="ray_address auto needs engine: ray"):
        load_profile("micro", ["curate.ray_address=auto"])


def test_engine_draws_a_bar_per_shard_when_asked(monkeypatch, capsys):
    monkeypatch.setenv("CLIP_PIPELINE_PROGRESS", "1")  # stderr is not a terminal under pytest
    assert list(Engine().map(math.sqrt, [1.0, 4.0, 9.0], desc="curate: scan")) == [1, 2, 3]
    err = capsys.readouterr().err
    assert "curate: scan" in err and "3/3" in err and "shard" in err
    list(Engine().map(math.sqrt, [1.0], desc="quiet", progress=False))
    assert "quiet" not in capsys.readouterr().err


def test_an_engine_block_keeps_one_pool_for_every_map_inside_it():
    engine = Engine(workers=2)
    with engine:
        pool = engine._session["pool"]
        assert list(engine.map(math.sqrt, [4.0, 9.0], progress=False)) == [2.0, 3.0]
        with engine:  # nested (the flow's block around write_curated's own): the same pool
            assert engine._session["pool"] is pool
            assert list(engine.map(math.sqrt, [16.0, 1.0], progress=False)) == [4.0, 1.0]
        assert engine._session["pool"] is pool
    assert "pool" not in engine._session
