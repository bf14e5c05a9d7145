"""Run img2dataset with the project's image decoder: `python -m tasks.crawl CONFIG.json`.

img2dataset installs a SIGINT handler, which Python allows only in the main thread (docs/design.md,
trap 2), so the ingest task launches this module as a subprocess when it is not in the main
thread, and calls `download` directly when it is. CONFIG.json holds `img2dataset.download`'s
keyword arguments.

img2dataset decodes every image with OpenCV in its own worker processes, after the download and
with no size check, and normalises modes its own way. `download` swaps in `DecodingResizer`,
which first reads the header with clip_model.images (a pixel bomb is refused as "image too
large", which the ingest stage counts as `too_large`, before a pixel is decoded) and hands
img2dataset only what OpenCV decodes exactly as clip_model.images does: an 8-bit RGB or grey
JPEG without EXIF rotation as it came, anything else (16-bit, palette, alpha, CMYK, rotated)
decoded by clip_model.images and passed on as an uncompressed BMP. Importing clip_model.images
also sets OpenCV's and Pillow's own caps in this process's environment, which img2dataset's
spawned workers inherit (docs/design.md, trap 13).
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import signal
import sys
import tarfile
import tempfile
from typing import Any

import fsspec
import pyarrow.parquet as pq
import webdataset as wds
from img2dataset.resizer import Resizer
from img2dataset.writer import WebDatasetSampleWriter

from clip_model.images import ImageDecodeError, decode_image, image_header, orientation

_FAILED = (None, None, None, None, None)


def _as_opencv_decodes_it(header) -> bool:
    """True when OpenCV's IMREAD_UNCHANGED gives exactly clip_model.images' pixels."""
    return (
        header.format in ("JPEG", "MPO")
        and header.mode in ("RGB", "L")
        and orientation(header) == 1
    )


class DecodingResizer(Resizer):
    """img2dataset's Resizer behind clip_model.images: size from the header, modes normalised."""

    def __call__(self, img_stream, blurring_bbox_list=None):
        data = img_stream.read()
        try:
            header = image_header(data)
            if not (self.disable_all_reencoding or _as_opencv_decodes_it(header)):
                buf = io.BytesIO()
                decode_image(data).save(buf, "BMP")
                data = buf.getvalue()
        except ImageDecodeError as e:
            return (*_FAILED, str(e))
        return super().__call__(io.BytesIO(data), blurring_bbox_list)


class OrderedShardWriter(WebDatasetSampleWriter):
    """img2dataset's WebDataset writer, with shards whose bytes depend only on what was crawled.

    img2dataset writes each sample as its download finishes, with the write time in every tar
    member, so no two crawls of one list give the same shard (nor the same dataset digest).
    This writer spools the tar locally with a fixed member time, then writes it out in key order
    at close, and the shard's Parquet likewise: the same list and parameters give the same digest
    whatever the distributor, processes or threads. The extra local copy costs one read and write
    of each shard in the worker that crawled it, in parallel with the other workers."""

    def __init__(
        self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format
    ):
        super().__init__(
            shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format
        )
        self.parquet_url = f"{output_folder}/{shard_id:0{oom_shard_count}d}.parquet"
        self.spool = tempfile.TemporaryFile(prefix="clip-shard-")
        self.tarwriter = wds.TarWriter(self.spool, mtime=0)

    def close(self):
        self.buffered_parquet_writer.close()
        self.tarwriter.close()  # the spool stays open: TarWriter does not own it
        self.spool.seek(0)
        with (
            tarfile.open(fileobj=self.spool, mode="r:") as spooled,
            tarfile.open(fileobj=self.tar_fd, mode="w|") as tar,
        ):
            # KEY.jpg, KEY.json, KEY.txt: keys have one width, so names sort in key order
            for member in sorted(spooled.getmembers(), key=lambda m: m.name):
                tar.addfile(member, spooled.extractfile(member))
        self.tar_fd.close()
        self.spool.close()
        fs, path = fsspec.core.url_to_fs(self.parquet_url)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        with fs.open(path, "wb") as f:
            pq.write_table(table.sort_by("key"), f)


def connect_ray() -> None:
    """img2dataset's `ray` distributor submits its tasks to whatever Ray this process is connected
    to, and `ray.remote` would quietly start a private one if none is: connect to the cluster
    RAY_ADDRESS names (how the ingest task hands its Ray to a subprocess crawl), else keep the Ray
    this process already initialised, else start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)


def download(kwargs: dict[str, Any]) -> None:
    """`img2dataset.download(**kwargs)` decoding through DecodingResizer, in this process's main
    thread; the SIGINT handler img2dataset installs is put back afterwards."""
    # the module, not the `main` function img2dataset's __init__ exports under the same name
    img2dataset_main = importlib.import_module("img2dataset.main")
    try:  # its own signature decides: an argument it does not take is named before any work
        inspect.signature(img2dataset_main.download).bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"img2dataset.download refuses these arguments: {e}") from None
    if kwargs.get("distributor") == "ray":
        connect_ray()
    previous = signal.getsignal(signal.SIGINT)
    original = img2dataset_main.Resizer
    img2dataset_main.Resizer = DecodingResizer
    img2dataset_main.WebDatasetSampleWriter = OrderedShardWriter
    try:
        img2dataset_main.download(**kwargs)
    finally:
        img2dataset_main.Resizer = original
        img2dataset_main.WebDatasetSampleWriter = WebDatasetSampleWriter
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tasks.crawl CONFIG.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        kwargs = json.load(f)
    download(kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
