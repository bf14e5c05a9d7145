"""Training: the DataModule's data order and counts, the config, exact resume, the `train` flow.

Models here are micro ViTs (32 px, width 64, 2 layers) so a step costs milliseconds; the data is
a few hundred coloured shapes written with storage's own writer, in deliberately uneven shards.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from clip_model.datamodule import ClipDataModule
from clip_model.tokenizer import get_tokenizer
from clip_model.train import ConfigError, TrainConfig, load_config, main, train
from clip_model.transforms import eval_transform, train_transform
from storage import DatasetError, DatasetWriter, describe_shard, open_dataset, write_manifest

ROOT = Path(__file__).resolve().parent.parent
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 20),
}
SHAPES = ("circle", "square", "triangle")
MICRO_MODEL = {
    "image_size": 32,
    "vision_width": 64,
    "vision_layers": 2,
    "vision_patch_size": 8,
    "vision_head_width": 32,
    "text_width": 64,
    "text_heads": 2,
    "text_layers": 2,
    "embed_dim": 64,
    "context_length": 16,
}
UNEVEN = [12, 20, 36, 124]  # shard sizes: the last rank-0 shard dwarfs the others


def shape_jpeg(color: str, shape: str, rng: random.Random, size: int = 48) -> bytes:
    image = Image.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    r = rng.randint(size // 4, size // 2 - 2)
    x, y = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (x - r, y - r, x + r, y + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[color])
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_shapes(path: Path, shard_sizes: list[int], *, seed: int = 0, bad_keys=()) -> str:
    """A dataset of coloured shapes captioned "a red circle", one shard per entry of sizes."""
    rng = random.Random(seed)
    path.mkdir(parents=True)
    entries, index = [], 0
    for number, size in enumerate(shard_sizes):
        part = path / f".part{number}"
        with DatasetWriter(str(part), stage="test", samples_per_shard=size) as writer:
            for _ in range(size):
                color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
                key = f"s{index:05d}"
                image = b"not a jpeg" if key in bad_keys else shape_jpeg(color, shape, rng)
                writer.write(key, image, f"a {color} {shape}")
                index += 1
        name = f"{number:05d}"
        for ext in ("tar", "parquet"):
            (part / f"00000.{ext}").rename(path / f"{name}.{ext}")
        shutil.rmtree(part)
        entries.append(describe_shard(str(path), name))
    write_manifest(str(path), entries, stage="test")
    return str(path)


def corrupt_shard(dataset: str, name: str) -> None:
    """Garble a tar's first header in place: same size, so the manifest's cheap checks pass."""
    with open(Path(dataset) / f"{name}.tar", "r+b") as f:
        f.write(b"\x00garbage" * 64)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    return write_shapes(tmp_path_factory.mktemp("shapes") / "ds", UNEVEN)


def micro_config(tmp_path: Path, data: str, **overrides) -> Path:
    config = {
        "data": data,
        "model": "tiny",
        "model_overrides": MICRO_MODEL,
        "batch_size": 16,
        "lr": 1.0e-3,
        "warmup_steps": 3,
        "precision": "32",
        "workers": 1,
        "shuffle_buffer": 50,
        "val_fraction": 0.0,
        "print_every_n_steps": 1,
        "out_dir": str(tmp_path / "run"),
        "checkpoint": {"every_n_steps": 3, "keep_last": 2},
        "mlflow": {"enabled": False},
        **overrides,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def datamodule(data: str, *, rank=0, world_size=1, workers=0, **kwargs) -> ClipDataModule:
    return ClipDataModule(
        data,
        tokenizer=get_tokenizer("openai", context_length=16),
        train_transform=train_transform(32),
        val_transform=eval_transform(32),
        image_size=32,
        batch_size=8,
        workers=workers,
        seed=3,
        shuffle_buffer=20,
        rank=rank,
        world_size=world_size,
        **kwargs,
    )


def read_losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in map(json.loads, path.read_text().splitlines())}


# ---- data -----------------------------------------------------------------------------------


def test_every_rank_gets_the_same_number_of_batches_from_uneven_shards(shapes):
    counts = {}
    for rank in (0, 1):
        dm = datamodule(shapes, rank=rank, world_size=2, workers=2)
        batches = list(dm.train_dataloader())
        counts[rank] = len(batches)
        assert [int(b["index"]) for b in batches] == list(range(len(batches)))
        assert all(
            b["image"].shape == (8, 3, 32, 32) and b["text"].shape == (8, 16) for b in batches
        )
    # 192 samples / (2 ranks x 8): from the manifest, although rank 1 holds 2.3x rank 0's samples
    assert counts == {0: 12, 1: 12}


def test_data_order_resumes_mid_epoch_without_replay(shapes):
    full = list(datamodule(shapes, workers=2).train_dataloader())
    for start in (1, 4, 7):  # odd and even starts: workers swap roles
        dm = datamodule(shapes, workers=2)
        dm.load_state_dict({"epoch": 0, "batches": start})
        rest = list(dm.train_dataloader())
        assert len(rest) == len(full) - start
        for a, b in zip(full[start:], rest, strict=True):
            assert int(a["index"]) == int(b["index"])
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])


def test_validation_split_is_held_out_by_key_and_padded_per_rank(shapes):
    dm = datamodule(shapes, val_fraction=0.1)
    assert dm.train_samples + dm.val_samples == 192 and dm.val_samples > 0
    per_rank = []
    for rank in (0, 1):
        batches = list(
            datamodule(shapes, rank=rank, world_size=2, val_fraction=0.1).val_dataloader()
        )
        per_rank.append((len(batches), sum(int(b["valid"].sum()) for b in batches)))
    assert per_rank[0][0] == per_rank[1][0]  # equal batch counts: no DDP hang in validation
    assert per_rank[0][1] + per_rank[1][1] == dm.val_samples


def test_a_corrupt_shard_and_an_undecodable_image_are_skipped_and_counted(tmp_path):
    data = write_shapes(tmp_path / "ds", [40, 40, 40, 40], bad_keys={"s00003"})
    corrupt_shard(data, "00002")
    dm = datamodule(data)
    with pytest.warns(UserWarning, match="corrupt shard"):
        batches = list(dm.train_dataloader())
        for batch in batches:
            dm.on_before_batch_transfer(batch, 0)
    assert len(batches) == 160 // 8  # the epoch is still full length
    assert dm.corrupt_shards == {"00002"}
    assert dm.bad_samples >= 1


def test_datasets_that_cannot_train_give_clear_errors(tmp_path, shapes):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a dataset"):
        datamodule(str(tmp_path / "empty"))
    with DatasetWriter(str(tmp_path / "zero"), stage="test"):
        pass
    with pytest.raises(DatasetError, match="zero samples"):
        datamodule(str(tmp_path / "zero"))
    with pytest.raises(DatasetError, match="fewer than one global batch"):
        dm = datamodule(shapes, world_size=2)
        dm.batch_size = 200
        dm.train_dataloader()


# ---- config -----------------------------------------------------------------------------------


def test_config_errors_name_the_field(tmp_path, shapes, capsys):
    path = micro_config(tmp_path, shapes, max_steps=2)
    assert load_config(path).max_steps == 2
    with pytest.raises(ConfigError, match="learning_rate: Extra inputs are not permitted"):
        load_config(path, ["learning_rate=0.1"])
    with pytest.raises(ConfigError, match="batch_size: Input should be greater than 0"):
        load_config(path, ["batch_size=0"])
    with pytest.raises(ConfigError, match="checkpoint.keep_last"):
        load_config(path, ["checkpoint.keep_last=-1"])
    with pytest.raises(ConfigError, match="precision"):
        load_config(path, ["precision=64"])
    with pytest.raises(ConfigError, match="exactly one of max_steps and max_epochs"):
        load_config(path, ["max_epochs=1"])
    assert main(["--config", str(path), "bogus_key=1"]) == 2
    assert "bogus_key" in capsys.readouterr().err


def test_a_missing_resume_checkpoint_is_an_error_not_a_fresh_start(tmp_path, shapes):
    cfg = load_config(micro_config(tmp_path, shapes, max_steps=2), [f"resume={tmp_path}/nope.ckpt"])
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_fresh_run_never_prunes_an_earlier_runs_checkpoints(tmp_path, shapes):
    cfg = load_config(micro_config(tmp_path, shapes, max_steps=2))
    earlier = Path(cfg.checkpoints) / "step-00000007.ckpt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run's weights")
    with pytest.raises(
        ConfigError, match=r"already holds an earlier run's checkpoints.*resume=auto"
    ):
        train(cfg)
    assert earlier.read_bytes() == b"an earlier run's weights"


# ---- training ---------------------------------------------------------------------------------


def test_single_process_training_lowers_the_loss_past_a_corrupt_shard(tmp_path, crawled_sample):
    data = str(tmp_path / "crawl")
    shutil.copytree(crawled_sample.dataset, data)
    shards = open_dataset(data).manifest.shards
    corrupt_shard(data, shards[-1].name)
    cfg = load_config(
        micro_config(tmp_path, data, max_steps=40, batch_size=32, val_fraction=0.05),
        ["val_max_samples=64"],
    )
    threads = torch.get_num_threads()
    try:
        result = train(cfg.model_copy(update={"cpu_threads": 1}))
    finally:
        torch.set_num_threads(threads)
    losses = read_losses(Path(cfg.out_dir) / "metrics.jsonl")
    assert sorted(losses) == list(range(1, 41))
    first = sum(losses[s] for s in range(1, 6)) / 5  # ~ln(32): chance for a batch of 32
    last = sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.25, losses
    assert result["metrics"]["val/text_retrieval_recall_at_5"] > 5 / 64  # above chance
    assert result["data"]["corrupt_shards"] == [shards[-1].name]
    assert result["metrics"]["val/samples"] == 64
    assert 0 <= result["metrics"]["val/image_retrieval_recall_at_5"] <= 1
    assert Path(result["checkpoint"]).name == "step-00000040.ckpt"
    assert Path(cfg.out_dir, "tokenizer.json").exists()  # the preset's BPE, learnt on captions


def run_trainer(config: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "clip_model.train", "--config", str(config), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        # one torch thread: on a shared 2-core machine OpenMP's spinning threads cost 10x
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
    )


def test_a_killed_run_resumes_mid_epoch_with_identical_losses(tmp_path, shapes):
    # 192 samples / batch 16 = 12 batches an epoch; checkpoints every 6 steps fall mid-epoch
    # (6, 18) and on an epoch's last batch (12, 24); 30 steps cross two epoch boundaries
    config = micro_config(tmp_path, shapes, max_steps=30, workers=2)
    config_args = ["checkpoint.every_n_steps=6", "checkpoint.keep_last=5"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    baseline = run_trainer(config, f"out_dir={whole}", *config_args)
    proc = run_trainer(config, f"out_dir={killed}", *config_args)
    first = killed / "checkpoints" / "step-00000006.ckpt"
    deadline = time.monotonic() + 600
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read()[-3000:]
    assert not (killed / "final_metrics.json").exists(), "the run finished before it was killed"
    assert baseline.wait(timeout=600) == 0, baseline.stderr.read()[-3000:]

    mid_epoch = sorted((killed / "checkpoints").glob("step-*.ckpt"))[-1]
    epoch_end = whole / "checkpoints" / "step-00000012.ckpt"
    runs = {
        checkpoint: (
            out,
            run_trainer(config, f"out_dir={out}", f"resume={checkpoint}", *config_args),
        )
        for checkpoint, out in (
            (mid_epoch, tmp_path / "resumed"),
            (epoch_end, tmp_path / "resumed12"),
        )
    }
    expected = read_losses(whole / "metrics.jsonl")
    for checkpoint, (out, proc) in runs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        step = int(checkpoint.stem.split("-")[1])
        got = read_losses(out / "metrics.jsonl")
        assert sorted(got) == list(range(step + 1, 31))
        assert max(abs(got[s] - expected[s]) for s in got) <= 1e-6, (checkpoint, got, expected)
        report = json.loads((out / "final_metrics.json").read_text())
        assert report["resumed_from"] == str(checkpoint) and report["global_step"] == 30


def test_train_flow_runs_two_cpu_ranks_under_torchrun_and_registers_a_pyfunc(
    tmp_path, shapes, prefect_harness, mlflow_tmp
):
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.train import train as train_flow

    config = micro_config(tmp_path, shapes, val_fraction=0.1, mlflow={"enabled": True})
    result = train_flow(
        data=shapes,
        config=str(config),
        max_steps=4,
        devices=2,
        accelerator="cpu",
        registered_model="clip-test",
        settings=["checkpoint.every_n_steps=2"],
    )
    # two ranks of 16: every image competed against the 32 texts of the gathered global batch
    assert result.world_size == 2 and result.global_step == 4
    assert result.metrics["train/global_batch"] == 32
    assert Path(result.checkpoint).name == "step-00000004.ckpt"
    assert sorted(p.name for p in Path(result.checkpoint_dir).glob("*.ckpt")) == [
        "last.ckpt",
        "step-00000002.ckpt",
        "step-00000004.ckpt",
    ]
    last = Path(result.checkpoint_dir, "last.ckpt")
    assert last.read_bytes() == Path(result.checkpoint).read_bytes()  # the newest's twin

    client = MlflowClient(mlflow_tmp)
    child = client.get_run(result.mlflow_run_id)
    parent_id = child.data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).data.tags["stage"] == "train"
    assert child.data.params["batch_size"] == "16" and child.data.params["devices"] == "2"
    history = client.get_metric_history(child.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    for name in ("perf/samples_per_s", "perf/data_wait_frac", "train/temperature", "train/lr"):
        assert client.get_metric_history(child.info.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"config.yaml", "tokenizer.json", "checkpoints"} <= artifacts
    version = client.get_model_version("clip-test", str(result.registered_version))
    assert version.status == "READY"

    # the registered model embeds in a fresh process, from raw bytes and from base64
    sample = next(open_dataset(shapes).iter_samples())
    script = (
        "import base64, json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "image = open(sys.argv[2], 'rb').read()\n"
        "frame = pd.DataFrame({'image': [image, base64.b64encode(image).decode(), None],"
        " 'text': ['a red circle', None, 'a blue square']})\n"
        "out = model.predict(frame)\n"
        "print(json.dumps({c: [None if v is None else list(v) for v in out[c]] for c in out}))\n"
    )
    image_path = tmp_path / "sample.jpg"
    image_path.write_bytes(sample.image)
    done = subprocess.run(
        [sys.executable, "-c", script, "models:/clip-test/1", str(image_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_tmp},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    images, texts = out["image_embedding"], out["text_embedding"]
    assert images[2] is None and texts[1] is None
    assert len(images[0]) == MICRO_MODEL["embed_dim"] and images[0] == pytest.approx(images[1])
    assert sum(v * v for v in texts[0]) == pytest.approx(1.0, abs=1e-5)
    assert mlflow.get_tracking_uri() == mlflow_tmp
    assert isinstance(
        TrainConfig.model_validate(
            yaml.safe_load(Path(result.out_dir, "train_config.yaml").read_text())
        ),
        TrainConfig,
    )
