"""Tokenizers: OpenAI's BPE id for id, and a BPE trained on captions, saved and reloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clip_model import get_tokenizer, train_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "openclip"
CASES = json.loads((FIXTURES / "tokenizer_cases.json").read_text())["cases"]
CAPTIONS = [
    f"a {size} {colour} {shape} on a {background} background"
    for size in ("small", "large", "tiny")
    for colour in ("red", "green", "blue", "yellow", "purple")
    for shape in ("circle", "square", "triangle", "star")
    for background in ("white", "black", "grey")
] + [f"the digit {d} written in {c}" for d in range(10) for c in ("red", "blue", "black")]


@pytest.mark.parametrize("case", CASES, ids=[c["text"][:24] for c in CASES])
def test_openai_tokenizer_ids_equal_openais_for_every_fixture_case(case):
    tokens = get_tokenizer("openai")([case["text"]])
    assert tokens.dtype == torch.long
    assert tokens.shape == (1, 77)
    assert tokens[0].tolist() == case["ids"]


def test_openai_vocabulary_has_49408_ids_with_eos_the_highest():
    tokenizer = get_tokenizer("openai")
    assert (tokenizer.vocab_size, tokenizer.sos_id, tokenizer.eos_id) == (49408, 49406, 49407)
    assert tokenizer.decode(tokenizer.encode("A Photo of a DOG.")) == "a photo of a dog ."


def test_truncation_keeps_eos_last_at_any_context_length():
    tokenizer = get_tokenizer("openai", context_length=8)
    tokens = tokenizer(["one two three four five six seven eight nine ten", "short"])
    assert tokens.shape == (2, 8)
    assert tokens[0, 0].item() == tokenizer.sos_id and tokens[0, -1].item() == tokenizer.eos_id
    assert tokens[1].tolist()[:3] == [tokenizer.sos_id, tokenizer.encode("short")[0], 49407]
    assert tokenizer(["short"], context_length=4).shape == (1, 4)


def test_text_that_is_not_a_string_names_its_index_and_type():
    tokenizer = get_tokenizer("openai")
    with pytest.raises(TypeError, match="text at index 2 is bytes, expected str"):
        tokenizer(["a", "b", b"c"])
    with pytest.raises(TypeError, match="text at index 0 is NoneType"):
        tokenizer([None])


def test_unknown_tokenizer_name_says_what_is_accepted():
    with pytest.raises(ValueError, match="expected 'openai' or the path"):
        get_tokenizer("gpt2")


def test_trained_bpe_is_saved_reloaded_and_gives_the_same_ids(tmp_path):
    path = tmp_path / "run" / "tokenizer.json"
    trained = train_tokenizer(CAPTIONS, vocab_size=400, path=path)
    reloaded = get_tokenizer(path, context_length=32)
    texts = ["A Large RED circle on a white background", "the digit 7 written in blue"]
    tokens = reloaded(texts)
    assert tokens.shape == (2, 32)
    assert torch.equal(tokens, trained(texts, context_length=32))
    # lower-cased; the vocabulary learnt whole words from the captions
    assert trained.encode("A LARGE Red Circle") == trained.encode("a large red circle")
    assert len(trained.encode("a large red circle")) == 4
    assert trained.decode(trained.encode("a large red circle")) == "a large red circle"
    assert trained.vocab_size <= 400


def test_trained_bpe_puts_eos_at_the_highest_id_so_argmax_finds_it(tmp_path):
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=400, path=tmp_path / "tok.json")
    assert tokenizer.eos_id == tokenizer.vocab_size - 1
    assert tokenizer.sos_id == tokenizer.vocab_size - 2
    tokens = tokenizer(["a red star", "purple", "a blue square on a black background " * 12])
    lengths = [len(tokenizer.encode("a red star")) + 1, len(tokenizer.encode("purple")) + 1, 76]
    assert tokens.argmax(dim=-1).tolist() == lengths
    # a caption that spells the special token is just text: it cannot inject an [EOS]
    spelled = tokenizer(["a red <end_of_text> star"])[0]
    assert (spelled == tokenizer.eos_id).sum().item() == 1


def test_trained_bpe_reaches_unseen_characters_through_bytes(tmp_path):
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=400, path=tmp_path / "tok.json")
    ids = tokenizer.encode("crème brûlée 😀")
    assert ids and max(ids) < tokenizer.sos_id
    assert tokenizer.decode(ids) == "crème brûlée 😀"


def test_train_tokenizer_rejects_non_strings_and_tiny_vocabularies(tmp_path):
    with pytest.raises(TypeError, match="caption at index 1 is int"):
        train_tokenizer(["a red circle", 5], vocab_size=300, path=tmp_path / "t.json")
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(CAPTIONS, vocab_size=100, path=tmp_path / "t.json")


def test_a_json_file_not_made_by_train_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="not a tokenizer made by train_tokenizer"):
        get_tokenizer(tmp_path / "other.json")


def test_bundled_merges_file_is_openais():
    from clip_model.tokenizer import OPENAI_BPE_PATH

    fixture = FIXTURES / "bpe_simple_vocab_16e6.txt.gz"
    assert OPENAI_BPE_PATH.read_bytes() == fixture.read_bytes()
