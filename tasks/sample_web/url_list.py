"""The URL list's rows (urls.parquet): a URL, a caption, the defect label and the ground truth.

urls.parquet keeps each row's `path`, so `write_url_list(DIR, base_url, out)` writes the same
list for a server on another port.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.sample_web.files import sha256_hex

DEFAULT_PORT = 8765

ROW_FIELDS = {
    "url": pa.string(),
    "caption": pa.string(),
    "expected": pa.string(),
    "path": pa.string(),
    "kind": pa.string(),  # scene, digit, tiny, banner, html, none
    "lang": pa.string(),  # en, fr, de, es; "" for an empty caption
    "image_sha256": pa.string(),  # sha256 of the served bytes; null when nothing is served
    "colour": pa.string(),
    "shape": pa.string(),
    "size": pa.string(),
    "position": pa.string(),
    "count": pa.int8(),
    "digit": pa.int8(),
}


def url_row(
    path: str, caption: str, expected: str, kind: str, data: bytes | None, **labels
) -> dict:
    """One row: `data` is what the server answers at `path` (None when it serves nothing)."""
    row = dict.fromkeys(ROW_FIELDS)
    row.update(path=path, caption=caption, expected=expected, kind=kind, lang="en", **labels)
    row["image_sha256"] = sha256_hex(data) if data is not None else None
    return row


def base_url_of(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def url_table(rows: list[dict], base_url: str) -> pa.Table:
    base = base_url.rstrip("/")
    columns = {name: [r[name] for r in rows] for name in ROW_FIELDS}
    columns["url"] = [base + p for p in columns["path"]]
    return pa.table({k: pa.array(v, type=ROW_FIELDS[k]) for k, v in columns.items()})


def write_url_list(root: str | Path, base_url: str, out_path: str | Path) -> Path:
    """Write DIR/urls.parquet again with every url rebased on `base_url` (e.g. a port-0 server)."""
    table = pq.read_table(Path(root) / "urls.parquet")
    base = base_url.rstrip("/")
    urls = pa.array([base + p for p in table.column("path").to_pylist()], pa.string())
    table = table.set_column(table.schema.get_field_index("url"), "url", urls)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_path)
    return out_path
