"""The ingest flow against the sample web over loopback: every row accounted for, every defect
counted, bad input refused, and a killed crawl resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import sample_crawl_params

from storage import open_dataset
from storage.tracking import tracking_uri
from tasks.ingest import failure_reason
from tasks.sample_web import OUTCOMES

ROOT = Path(__file__).resolve().parents[1]


def test_every_defect_lands_in_its_reason(crawled_sample, sample_web):
    ds = open_dataset(crawled_sample.dataset, verify=True)
    meta = ds.metadata(columns=["expected", "status", "error_message"])
    labels = Counter(meta.column("expected").to_pylist())
    assert labels == Counter(sample_web.labels)  # every input row is in the Parquet, once
    seen = Counter(
        zip(
            meta.column("expected").to_pylist(),
            meta.column("status").to_pylist(),
            meta.column("error_message").to_pylist(),
            strict=True,
        )
    )
    for label, count in sample_web.labels.items():
        status, message = OUTCOMES[label]
        matching = sum(
            n
            for (lab, st, msg), n in seen.items()
            if lab == label and st == status and (message is None or message in (msg or ""))
        )
        assert matching == count, (
            f"{label}: {matching} rows as ({status}, {message}), expected {count}"
        )


def test_reasons_add_up_to_the_input_rows(crawled_sample, sample_web):
    reasons = crawled_sample.reasons
    assert sum(reasons.values()) == crawled_sample.rows == sample_web.rows
    want: Counter[str] = Counter()
    for label, count in sample_web.labels.items():
        status, message = OUTCOMES[label]
        want["success" if status == "success" else failure_reason(message)] += count
    assert reasons == dict(want)
    assert {
        "http_404",
        "http_500",
        "timeout",
        "undecodable",
        "too_small",
        "aspect_ratio",
        "robots_disallowed",
    } <= set(reasons)
    ds = open_dataset(crawled_sample.dataset)
    assert ds.manifest.total_samples == reasons["success"] == crawled_sample.samples
    assert ds.manifest.stats["reasons"] == reasons
    assert sum(1 for _ in ds.iter_samples()) == reasons["success"]


def test_crawl_is_logged_to_mlflow(crawled_sample):
    client = mlflow.MlflowClient(tracking_uri())
    run = client.get_run(crawled_sample.mlflow_run_id)
    assert run.data.params["image_size"] == "64"
    assert run.data.metrics["count_http_404"] == crawled_sample.reasons["http_404"]
    assert run.data.metrics["success_rate"] == pytest.approx(
        crawled_sample.samples / crawled_sample.rows
    )
    assert run.data.metrics["images_per_s"] > 0
    (dataset_input,) = run.inputs.dataset_inputs
    tags = {t.key: t.value for t in dataset_input.tags}
    assert (
        tags["manifest_digest"] == crawled_sample.digest and tags["mlflow.data.context"] == "output"
    )
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "ingest_stats.json" in artifacts


def test_rerun_of_a_finished_crawl_does_nothing(crawled_sample, sample_url_list):
    from flows.ingest import ingest

    again = ingest(
        url_list=sample_url_list,
        output=crawled_sample.dataset,
        params=sample_crawl_params(number_sample_per_shard=500),
    )
    assert (
        again.skipped
        and again.digest == crawled_sample.digest
        and again.reasons == crawled_sample.reasons
    )


@pytest.mark.parametrize(
    ("write", "flags", "message"),
    [
        (
            lambda p: pq.write_table(pa.table({"link": ["http://x/a.jpg"], "caption": ["a"]}), p),
            {},
            r"no column 'url' \(--url-col\); its columns are: link, caption",
        ),
        (
            lambda p: pq.write_table(pa.table({"url": ["http://x/a.jpg"], "text": ["a"]}), p),
            {},
            r"no column 'caption' \(--caption-col\); its columns are: url, text",
        ),
        (
            lambda p: pq.write_table(
                pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}),
                p,
            ),
            {},
            "has no rows",
        ),
        (lambda p: p.write_bytes(b"PAR1 this is not parquet"), {}, "unreadable as parquet"),
    ],
    ids=["no-url-column", "no-caption-column", "empty", "unreadable"],
)
def test_bad_url_list_is_refused_and_writes_no_dataset(
    tmp_path, prefect_harness, write, flags, message
):
    from flows.ingest import ingest

    url_list = tmp_path / "urls.parquet"
    write(url_list)
    with pytest.raises(ValueError, match=message):
        ingest(
            url_list=str(url_list),
            output=str(tmp_path / "out"),
            params=sample_crawl_params(save_additional_columns=None, **flags),
        )
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_and_unsupported_url_lists_are_named(tmp_path, prefect_harness):
    from flows.ingest import ingest

    with pytest.raises(FileNotFoundError, match="nowhere.csv': no such file"):
        ingest(url_list=str(tmp_path / "nowhere.csv"), output=str(tmp_path / "out"))
    (tmp_path / "urls.xlsx").write_bytes(b"x")
    with pytest.raises(
        ValueError, match=r"unsupported file type '.xlsx'; accepted: .parquet, .csv, .tsv, .jsonl"
    ):
        ingest(url_list=str(tmp_path / "urls.xlsx"), output=str(tmp_path / "out"))


def test_csv_tsv_and_jsonl_url_lists_are_read(tmp_path):
    from tasks.ingest import CrawlParams, read_url_list

    rows = [{"u": f"http://127.0.0.1:9/{i}.jpg", "c": f"caption {i}"} for i in range(3)]
    (tmp_path / "a.csv").write_text("u,c\n" + "".join(f"{r['u']},{r['c']}\n" for r in rows))
    (tmp_path / "a.tsv").write_text("u\tc\n" + "".join(f"{r['u']}\t{r['c']}\n" for r in rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("a.csv", "a.tsv", "a.jsonl"):
        staged = read_url_list.fn(
            str(tmp_path / name),
            str(tmp_path / f"out-{name}"),
            CrawlParams(url_col="u", caption_col="c"),
        )
        table = pq.read_table(staged.staged)
        assert staged.rows == 3 and table.column("caption").to_pylist() == [
            "caption 0",
            "caption 1",
            "caption 2",
        ]


def test_output_on_a_file_is_refused(tmp_path):
    from tasks.ingest import CrawlParams, read_url_list

    (tmp_path / "file").write_text("not a folder")
    pq.write_table(pa.table({"url": ["http://x/a.jpg"], "caption": ["a"]}), tmp_path / "u.parquet")
    with pytest.raises(PermissionError, match="file/out' is not writable"):
        read_url_list.fn(str(tmp_path / "u.parquet"), str(tmp_path / "file" / "out"), CrawlParams())


def _ingest_command(
    url_list: str, output: Path, per_shard: int, distributor: str = "multiprocessing"
) -> list[str]:
    params = sample_crawl_params(number_sample_per_shard=per_shard)
    return [
        sys.executable, "-m", "flows.ingest", "--url-list", url_list, "--output", str(output),
        "--number-sample-per-shard", str(per_shard), "--timeout", str(params.timeout),
        "--min-image-size", str(params.min_image_size), "--max-aspect-ratio", str(params.max_aspect_ratio),
        "--save-additional-columns", "expected", "--processes-count", "1", "--thread-count", "8",
        "--distributor", distributor,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "distributor", ["multiprocessing", pytest.param("ray", marks=pytest.mark.slow)]
)
def test_killed_crawl_resumes_and_skips_finished_shards(
    tmp_path, sample_url_list, prefect_harness, distributor
):
    """Kill a real crawl (SIGKILL to its whole process group) once a shard is done, then resume.
    With `ray`, the command starts its own local Ray, whose raylet and workers share the process
    group and die with it; the rerun's new Ray must still skip what the first one finished."""
    from prefect.settings import PREFECT_API_URL

    subset = tmp_path / "urls.parquet"
    pq.write_table(pq.read_table(sample_url_list).slice(0, 1000), subset)
    labels = Counter(pq.read_table(subset).column("expected").to_pylist())
    out = tmp_path / "crawl"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the session's server: no ephemeral one
    cmd = _ingest_command(str(subset), out, per_shard=250, distributor=distributor)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
        )
        shards_dir = tmp_path / ".crawl.staging" / ".ingest" / "shards"  # bound to this list
        deadline = time.monotonic() + 300
        while (
            not list(shards_dir.glob("*_stats.json"))
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in shards_dir.glob("*_stats.json")}
    assert finished, (
        "the crawl was killed before it finished a shard:\n"
        + (tmp_path / "killed.log").read_text()[-2000:]
    )
    assert len(finished) < 4, "the crawl finished before it was killed"
    assert not (out / "manifest.json").exists()

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    crawled = {p.name: p.stat().st_mtime_ns for p in (out / ".output.json").parent.glob("*.tar")}
    for name in finished:  # finished shards were not crawled again: moved, not rewritten
        shard = name.split("_")[0] + ".tar"
        assert crawled[shard] <= max(finished.values()), f"{shard} was crawled again"
    ds = open_dataset(str(out), verify=True)
    statuses = Counter(ds.metadata(columns=["status"]).column("status").to_pylist())
    assert sum(statuses.values()) == 1000
    ok = sum(n for label, n in labels.items() if OUTCOMES[label][0] == "success")
    assert statuses["success"] == ok == ds.manifest.total_samples
    assert "success" in done.stdout and "reason" in done.stdout  # the printed per-reason table


def test_crawl_off_the_main_thread_runs_img2dataset_in_a_subprocess(tmp_path, sample_url_list):
    """img2dataset's SIGINT handler needs a main thread: from a worker thread it gets a process."""
    import logging
    import threading

    from tasks.ingest import UrlList, _download_in_subprocess, _img2dataset_kwargs

    subset = tmp_path / "urls.parquet"
    pq.write_table(pq.read_table(sample_url_list).slice(0, 20).select(["url", "caption"]), subset)
    staged = UrlList(source=str(subset), staged=str(subset), rows=20, digest="")
    kwargs = _img2dataset_kwargs(
        staged, str(tmp_path / "shards"), sample_crawl_params(save_additional_columns=None)
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _download_in_subprocess(kwargs, logging.getLogger("test"))
        except BaseException as e:  # noqa: BLE001 - reported to the main thread below
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=300)
    assert not errors and not worker.is_alive()
    table = pq.read_table(tmp_path / "shards" / "00000.parquet")
    assert table.num_rows == 20 and (tmp_path / "shards" / "00000_stats.json").exists()


def test_only_transient_failures_are_retried():
    from prefect.states import Failed

    from tasks.ingest import transient_failure

    assert transient_failure(None, None, Failed(data=ConnectionResetError("reset by peer")))
    assert transient_failure(None, None, Failed(data=TimeoutError("read timed out")))
    assert not transient_failure(None, None, Failed(data=FileNotFoundError("urls.csv")))
    assert not transient_failure(None, None, Failed(data=ValueError("no column 'url'")))


def test_crawl_parameters_are_img2dataset_s_own_names_and_defaults():
    """Every argument of the installed img2dataset.download, under its name and with its default,
    less the five the stage sets; the one default that differs is caption_col (documented)."""
    import importlib
    import inspect

    from tasks.ingest import CrawlParams, UrlList, _img2dataset_kwargs
    from tasks.params.ingest import RESERVED, img2dataset_arguments

    signature = inspect.signature(importlib.import_module("img2dataset.main").download)
    assert img2dataset_arguments() == tuple(signature.parameters)
    fields = CrawlParams.model_fields
    assert set(fields) == set(signature.parameters) - set(RESERVED)
    differ = {
        name: (field.get_default(call_default_factory=True), signature.parameters[name].default)
        for name, field in fields.items()
        if field.get_default(call_default_factory=True) != signature.parameters[name].default
    }
    assert differ == {"caption_col": ("caption", None)}
    staged = UrlList(source="u.parquet", staged="u.parquet", rows=1, digest="")
    signature.bind(**_img2dataset_kwargs(staged, "out", CrawlParams()))  # all of them, by name


def test_unknown_img2dataset_arguments_are_refused_naming_the_close_ones(tmp_path):
    from pydantic import ValidationError

    from tasks.params.ingest import CrawlParams
    from tasks.params.pipeline import ProfileError, load_profile

    with pytest.raises(
        ValidationError,
        match=r"unknown img2dataset argument 'samples_per_shard'; did you mean "
        r"number_sample_per_shard\? \(img2dataset.download's arguments: bbox_col, ",
    ):
        CrawlParams(samples_per_shard=10)
    with pytest.raises(ValidationError, match="'output_format' is set by the ingest stage"):
        CrawlParams(output_format="files")
    with pytest.raises(ValidationError, match="Input should be 'multiprocessing' or 'ray'"):
        CrawlParams(distributor="dask")
    with pytest.raises(
        ProfileError,
        match=r"ingest.crawl: unknown img2dataset argument 'keep_columns' \(img2dataset",
    ):
        load_profile("micro", {"ingest.crawl.keep_columns": ["expected"]})
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), url_list)
    cli = subprocess.run(
        [sys.executable, "-m", "flows.ingest", "--url-list", str(url_list), "--output",
         str(tmp_path / "out"), "--samples-per-shard", "10"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1, cli.stderr
    assert "--samples-per-shard -> --number-sample-per-shard" in cli.stderr
    assert not (tmp_path / "out").exists()


def test_img2dataset_itself_refuses_an_argument_it_does_not_take(tmp_path):
    """The last check, against the signature of the img2dataset that runs, before any work."""
    from tasks.crawl import download

    with pytest.raises(ValueError, match="unexpected keyword argument 'samples_per_shard'"):
        download(
            {"url_list": str(tmp_path / "u.parquet"), "output_folder": str(tmp_path / "out"),
             "samples_per_shard": 10}
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def _write_parts(folder: Path, table: pa.Table, sizes: list[int], kind: str = "parquet") -> None:
    folder.mkdir(parents=True)
    start = 0
    for i, size in enumerate(sizes):
        part = table.slice(start, size)
        if kind == "parquet":
            pq.write_table(part, folder / f"part-{i}.parquet")
        else:
            import pyarrow.csv as pacsv

            pacsv.write_csv(part, folder / f"part-{i}.csv")
        start += size
    (folder / "_SUCCESS").write_text("")  # what Spark leaves beside its parts: skipped


def test_url_list_folders_and_globs_stage_like_one_file(tmp_path, monkeypatch):
    """A folder or a glob of parts (any sizes) is staged, streaming, in parts of whole shards: the
    same rows, in the same shards, as the same list in one file; the digest covers every part."""
    import tasks.url_list
    from tasks.ingest import CrawlParams, read_url_list
    from tasks.url_list import staged_shards

    monkeypatch.setattr(tasks.url_list, "READ_BATCH_ROWS", 7)  # many batches per part
    monkeypatch.setattr(tasks.url_list, "PART_ROWS", 40)  # several staged parts
    n = 130
    table = pa.table(
        {"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)],
         "caption": [f"caption {i}" for i in range(n)], "n": list(range(n))}
    )  # fmt: skip
    pq.write_table(table, tmp_path / "one.parquet")
    _write_parts(tmp_path / "parts", table, [33, 1, 60, 36])
    _write_parts(tmp_path / "csv", table, [50, 80], kind="csv")
    params = CrawlParams(number_sample_per_shard=20, save_additional_columns=["n"])
    staged = {
        name: read_url_list.fn(str(tmp_path / name), str(tmp_path / f"out-{i}"), params)
        for i, name in enumerate(["one.parquet", "parts", "parts/part-*.parquet", "csv"])
    }
    want = [table.slice(s, 20).select(["url", "caption"]) for s in range(0, n, 20)]
    for name, url_list in staged.items():
        assert url_list.rows == n, name
        parts = sorted(Path(url_list.staged).glob("*.parquet"))
        assert [pq.read_metadata(p).num_rows for p in parts] == [40, 40, 40, 10], name
        shards = list(staged_shards(url_list.staged, 20))
        assert [s.to_pylist() for s in shards] == [w.to_pylist() for w in want], name
        kept = pq.read_table(url_list.staged).column("n").to_pylist()
        assert kept == list(range(n)), name
    assert staged["parts"].digest == staged["parts/part-*.parquet"].digest
    assert len({staged[k].digest for k in ("one.parquet", "parts", "csv")}) == 3
    before = staged["parts"].digest
    pq.write_table(table.slice(33, 1).set_column(0, "url", pa.array(["http://x/y"])),
                   tmp_path / "parts" / "part-1.parquet")  # fmt: skip
    assert read_url_list.fn(str(tmp_path / "parts"), str(tmp_path / "o"), params).digest != before


def test_url_list_folder_problems_are_named(tmp_path):
    from tasks.ingest import CrawlParams, read_url_list

    params = CrawlParams()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="'.*empty' is a folder with no .parquet, .csv"):
        read_url_list.fn(str(tmp_path / "empty"), str(tmp_path / "o1"), params)
    with pytest.raises(FileNotFoundError, match=r"'.*/nothing-\*.csv': no file matches"):
        read_url_list.fn(str(tmp_path / "nothing-*.csv"), str(tmp_path / "o2"), params)
    mixed = tmp_path / "mixed"
    _write_parts(mixed, pa.table({"url": ["http://x/a"], "caption": ["a"]}), [1])
    (mixed / "more.csv").write_text("url,caption\nhttp://x/b,b\n")
    with pytest.raises(ValueError, match=r"mixes file types: csv \(.*more.csv\), parquet"):
        read_url_list.fn(str(mixed), str(tmp_path / "o3"), params)
    lacking = tmp_path / "lacking"
    _write_parts(
        lacking, pa.table({"url": ["http://x/a", "http://x/b"], "caption": ["a", "b"]}), [1, 1]
    )
    pq.write_table(pa.table({"url": ["http://x/c"], "text": ["c"]}), lacking / "part-2.parquet")
    with pytest.raises(
        ValueError, match=r"part-2.parquet' has no column 'caption' \(--caption-col\)"
    ):
        read_url_list.fn(str(lacking), str(tmp_path / "o4"), params)


@pytest.mark.slow
def test_a_folder_of_parts_is_crawled_over_loopback(
    tmp_path, sample_url_list, prefect_harness, mlflow_tmp, monkeypatch
):
    """img2dataset crawls the staged parts as one list: every row accounted for in its shard,
    each shard checked against the staged list (several staged parts, shards across them)."""
    import tasks.url_list
    from flows.ingest import ingest

    monkeypatch.setattr(tasks.url_list, "PART_ROWS", 100)  # staged in 3 parts of 2 shards
    subset = pq.read_table(sample_url_list).slice(0, 250)
    _write_parts(tmp_path / "urls", subset, [90, 90, 70])
    result = ingest(
        url_list=str(tmp_path / "urls"),
        output=str(tmp_path / "out"),
        params=sample_crawl_params(number_sample_per_shard=50, thread_count=16),
    )
    ds = open_dataset(result.dataset, verify=True)
    assert len(ds.manifest.shards) == 5 and result.rows == 250 == sum(result.reasons.values())
    meta = ds.metadata(columns=["url", "expected", "status"])
    assert sorted(meta.column("url").to_pylist()) == sorted(subset.column("url").to_pylist())
    want = Counter(
        "success" if OUTCOMES[label][0] == "success" else "failed"
        for label in subset.column("expected").to_pylist()
    )
    got = Counter(
        "success" if s == "success" else "failed" for s in meta.column("status").to_pylist()
    )
    assert got == want


@pytest.mark.slow
def test_ray_distributor_gives_the_multiprocessing_digest(
    tmp_path, sample_url_list, prefect_harness, mlflow_tmp
):
    """The same list crawled by local processes and by img2dataset's `ray` distributor on a local
    Ray (started here, as img2dataset expects: initialised before `download`) gives the same
    dataset digest, every row accounted for and the crawl logged to MLflow."""
    import pyarrow.compute as pc
    import ray

    from flows.ingest import ingest

    full = pq.read_table(sample_url_list)
    # rows whose outcome does not depend on timing (no slow endpoint): the digests must agree
    steady = full.filter(pc.invert(pc.equal(full["expected"], "slow"))).slice(0, 150)
    url_list = tmp_path / "urls.parquet"
    pq.write_table(steady, url_list)

    def crawl(name: str, **settings):
        params = sample_crawl_params(number_sample_per_shard=40, timeout=10, **settings)
        return ingest(url_list=str(url_list), output=str(tmp_path / name), params=params)

    local = crawl("local", distributor="multiprocessing", processes_count=2, thread_count=4)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        on_ray = crawl("ray", distributor="ray", thread_count=16)
    finally:
        ray.shutdown()
    assert on_ray.digest == local.digest
    assert on_ray.reasons == local.reasons and sum(on_ray.reasons.values()) == 150
    ds = open_dataset(on_ray.dataset, verify=True)
    assert len(ds.manifest.shards) == 4 and ds.manifest.total_samples == on_ray.samples
    run = mlflow.MlflowClient(tracking_uri()).get_run(on_ray.mlflow_run_id)
    assert run.data.params["distributor"] == "ray"
    assert run.data.metrics["count_success"] == on_ray.reasons["success"]
