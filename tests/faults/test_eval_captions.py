"""An evaluation retrieval set's captions.jsonl names its images; a name that leaves the set's
folder (an absolute path, a `..`) is refused naming the file and line, even when that file exists."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from clip_model.eval_data import EvalDataError, read_retrieval


@pytest.mark.parametrize(
    "name",
    ["../outside.png", "images/../../outside.png", "./../outside.png", "ABSOLUTE"],
    ids=["parent", "through-images", "dot-parent", "absolute"],
)
def test_captions_naming_an_image_outside_the_root_are_refused(tmp_path, name):
    root = tmp_path / "retrieval"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "images" / "0000.png")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "outside.png")  # it exists
    if name == "ABSOLUTE":
        name = str(tmp_path / "outside.png")
    lines = [
        {"image": "images/0000.png", "captions": ["a red square"]},
        {"image": name, "captions": ["a blue square"]},
    ]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(EvalDataError) as info:
        read_retrieval(root, format="sample")
    message = str(info.value)
    assert message.startswith(f"{root / 'captions.jsonl'}:2: image {name!r}")
    assert "not a relative path inside" in message
