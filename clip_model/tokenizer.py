"""Lower-cased byte-level BPE with [SOS]/[EOS], as the paper's text encoder reads it.

Two vocabularies, one call signature (`list[str] -> LongTensor[N, context_length]`):

- `get_tokenizer("openai")`: OpenAI's 49,408-id BPE (49,152 merges file, bundled here), ids
  identical to OpenAI's `clip.tokenize` and OpenCLIP's tokenizer. ftfy is not used; text is
  NFC-normalised, HTML-unescaped and whitespace-collapsed, which agrees with ftfy on clean text.
- `train_tokenizer(captions, vocab_size, path)`: a byte-level BPE learnt on a dataset's captions
  with Hugging Face `tokenizers`, saved as one JSON file and reloaded by `get_tokenizer(path)`.

Sequences are `[SOS] tokens [EOS] 0 0 ...`; over-long text is cut with [EOS] kept last. In both
vocabularies [EOS] is the highest id, so the text encoder finds it with `argmax`, as OpenAI's does.
"""

from __future__ import annotations

import gzip
import html
import os
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import regex as re
import torch

OPENAI_BPE_PATH = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
BPE_SOS, BPE_EOS = "<start_of_text>", "<end_of_text>"


def clean_text(text: str) -> str:
    """NFC, HTML entities (twice, as OpenAI), collapsed whitespace, lower case."""
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
    """Callable: a string or a list of strings -> LongTensor [N, context_length]."""

    def __init__(
        self, *, name: str, sos_id: int, eos_id: int, vocab_size: int, context_length: int
    ):
        if context_length < 2:
            raise ValueError(f"context_length={context_length}: needs room for [SOS] and [EOS]")
        self.name = name
        self.sos_id, self.eos_id = sos_id, eos_id
        self.vocab_size = vocab_size
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without [SOS]/[EOS]."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text at index {i} is {type(text).__name__}, expected str")
        result = torch.zeros(len(texts), length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sos_id, *self.encode(text), self.eos_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eos_id  # the feature is read at [EOS]: never cut it off
            result[i, : len(ids)] = torch.tensor(ids)
        return result

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"context_length={self.context_length})"
        )


# ---- OpenAI's BPE (a port of openai/CLIP clip/simple_tokenizer.py, MIT licence) -------------


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Reversible map from bytes to printable unicode characters (GPT-2's trick)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class OpenAITokenizer(Tokenizer):
    # words are letter runs, single digits, or runs of other non-space characters
    pattern = re.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        re.IGNORECASE,
    )

    def __init__(self, bpe_path: str | os.PathLike = OPENAI_BPE_PATH, context_length: int = 77):
        merges_text = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges_text[1 : 49152 - 256 - 2 + 1]]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.cache: dict[str, str] = {}
        super().__init__(
            name="openai",
            sos_id=self.encoder["<|startoftext|>"],
            eos_id=self.encoder["<|endoftext|>"],
            vocab_size=len(vocab),
            context_length=context_length,
        )

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        if token in ("<|startoftext|>", "<|endoftext|>"):
            return token
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:], strict=True))
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the best-ranked pair
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        result = " ".join(word)
        if len(self.cache) > 200_000:  # bounded: captions of a web crawl are endless
            self.cache.clear()
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in self.pattern.findall(clean_text(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text if c in self.byte_decoder)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()


# ---- a BPE trained on the captions (Hugging Face `tokenizers`) ------------------------------


class TrainedBPETokenizer(Tokenizer):
    def __init__(self, path: str | os.PathLike, context_length: int = 77):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        self.hf = HFTokenizer.from_file(str(path))
        self.hf.encode_special_tokens = True  # "<end_of_text>" typed in a caption is just text
        sos, eos = self.hf.token_to_id(BPE_SOS), self.hf.token_to_id(BPE_EOS)
        size = self.hf.get_vocab_size(with_added_tokens=True)
        if sos is None or eos is None or eos != size - 1:
            raise ValueError(
                f"{path}: not a tokenizer made by train_tokenizer: needs {BPE_SOS} and {BPE_EOS} "
                "with [EOS] as the highest id"
            )
        super().__init__(
            name=str(path), sos_id=sos, eos_id=eos, vocab_size=size, context_length=context_length
        )

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(clean_text(text), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True).strip()


def train_tokenizer(
    captions: Iterable[str], vocab_size: int, path: str | os.PathLike, *, min_frequency: int = 2
) -> TrainedBPETokenizer:
    """Learn a lower-cased byte-level BPE with `vocab_size` ids (at most) on `captions`, save it
    as JSON at `path` and return it loaded. [SOS] and [EOS] take the two highest ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size={vocab_size}: needs at least 258 (256 bytes + [SOS], [EOS])")

    def cleaned() -> Iterable[str]:
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"caption at index {i} is {type(caption).__name__}, expected str")
            yield clean_text(caption)

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(cleaned(), trainer=trainer)
    hf.add_special_tokens([BPE_SOS, BPE_EOS])  # appended: the two highest ids
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    hf.save(str(tmp))
    os.replace(tmp, path)
    return TrainedBPETokenizer(path)


def get_tokenizer(
    name_or_path: str | os.PathLike = "openai", context_length: int = 77
) -> Tokenizer:
    """`"openai"` for OpenAI's vocabulary, or the path of a file written by `train_tokenizer`."""
    if str(name_or_path) == "openai":
        return _openai_tokenizer(context_length)
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"unknown tokenizer {str(name_or_path)!r}: expected 'openai' or the path of a "
            "tokenizer JSON file saved by clip_model.tokenizer.train_tokenizer"
        )
    return TrainedBPETokenizer(path, context_length=context_length)


@lru_cache(maxsize=4)
def _openai_tokenizer(context_length: int) -> OpenAITokenizer:
    return OpenAITokenizer(context_length=context_length)  # parsing the merges takes ~0.3 s
