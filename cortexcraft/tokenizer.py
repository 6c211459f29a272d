"""Tokenizers: a character vocabulary (vocab.txt) and byte-level BPE, behind one interface.

Both expose ``kind``, ``vocab_size``, ``encode(text) -> np.ndarray``, ``decode(ids) -> str`` and
``save(out_dir) -> section``. ``save`` writes the tokenizer file plus ``tokenizer.section.json``
(the same dict the shards manifest stores under ``tokenizer``), so ``load_tokenizer(dir)`` works
on a shard directory (reads ``manifest.json``) and on a run directory (reads the section file).

vocab.txt (format ``cortexcraft-vocab/1``): a header line, then one token per line, line k after
the header being token id k. Each token is written as a JSON string literal, so every character
round-trips (newline, CR, tab, NUL, U+2028, combining marks, astral characters) while the file
stays readable: ``"a"``, ``" "``, ``"\\n"``, ``"\\u0301"``, ``"<eos>"``. Characters that would be
invisible, ambiguous or line-breaking on their own line are escaped; everything else is literal.

Special tokens (e.g. ``<pad> <unk> <bos> <eos>``) get the ids after the characters, so the
character ids match nanoGPT's (sorted characters from 0). Text containing a special token's
spelling encodes to that token's id.
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from cortexcraft.config import DataConfig
from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import atomic_write_json, atomic_write_text, read_json, sha256_file
from cortexcraft.sources import corpus_chunks, default_separator, train_val_cut

VOCAB_HEADER = "#cortexcraft-vocab/1 one token per line below, line k = token id k, written as JSON strings"
SECTION_FILE = "tokenizer.section.json"
CHAR_FILE = "vocab.txt"
BPE_FILE = "tokenizer.json"
UNK = "<unk>"
BPE_SEPARATOR = "<|endoftext|>"
MAX_CODE_POINT = 0x10FFFF
# Characters per numpy chunk: ~4 MB of UTF-32, big enough to amortise overhead, small enough for cache.
CHUNK_CHARS = 1 << 20
# The byte the ASCII fast path of CharTokenizer gives characters outside the vocabulary.
ASCII_UNKNOWN = 255

# Vocabulary sizes used only to print parameter counts in `cortexcraft presets`.
TINYSHAKESPEARE_CHARS = 65
# Estimate: the seed-000 OpenWebText vocab.txt holds 5,520 distinct characters; a real extraction
# depends on how many documents are read.
OPENWEBTEXT_CHARS_ESTIMATE = 5520
# Estimate for any other source we cannot inspect without downloading it: the byte range.
UNKNOWN_SOURCE_CHARS_ESTIMATE = 256


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    dtype: np.dtype  # of the shard files: the smallest unsigned type holding every id

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def stream_decoder(self) -> Callable[[int], str | None]: ...
    def save(self, out_dir: Path) -> dict: ...


def limit_encode_threads(threads: int) -> None:
    """At most ``threads`` threads for this process's batched BPE encoding (the tokenizers library
    otherwise starts one per core in every process, and workers sharing the cores then fight over
    them). Call it in a worker before it encodes: rayon sizes its pool once per process, while
    "no parallelism" (``threads`` 1) is read at every call."""
    if threads <= 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        os.environ["RAYON_NUM_THREADS"] = str(threads)


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids 0..vocab_size-1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise CortexCraftError(f"vocabulary of {vocab_size:,} tokens does not fit uint32; lower --vocab-size")


# ---------------------------------------------------------------------------------------------
# vocab.txt format


def _needs_escape(ch: str) -> bool:
    # Control/format/separator characters and lone combining marks are invisible or break lines.
    return ch != " " and unicodedata.category(ch)[0] in "CZM"


def escape_token(token: str) -> str:
    literal = json.dumps(token, ensure_ascii=False)
    if not any(_needs_escape(ch) for ch in token):
        return literal
    parts = []
    for ch in literal[1:-1]:
        if _needs_escape(ch):
            encoded = ch.encode("utf-16-be")
            parts.extend(f"\\u{int.from_bytes(encoded[i:i + 2], 'big'):04x}" for i in range(0, len(encoded), 2))
        else:
            parts.append(ch)
    return '"' + "".join(parts) + '"'


def format_vocab(tokens: list[str]) -> str:
    return VOCAB_HEADER + "\n" + "".join(escape_token(t) + "\n" for t in tokens)


def read_vocab_file(path: Path) -> tuple[list[str], str]:
    """Tokens of a vocab file and its format: ``cortexcraft`` or ``seed`` (the set of characters
    in the file, sorted, like seed 000's OpenWebText vocab.txt)."""
    path = Path(path)
    if not path.is_file():
        raise CortexCraftError(f"vocab file {path} does not exist; pass an existing vocab.txt to --vocab")
    try:
        # newline="" keeps "\r" as written (a seed-format file may hold it as a character).
        with open(path, encoding="utf-8", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise CortexCraftError(
            f"vocab file {path} is not UTF-8 ({exc.reason} at byte {exc.start}); convert it to UTF-8"
        ) from None
    if not text.startswith("#cortexcraft-vocab/"):
        return sorted(set(text)), "seed"
    header, *lines = text.split("\n")
    if not header.startswith("#cortexcraft-vocab/1 "):
        raise CortexCraftError(
            f"vocab file {path} has unsupported header {header[:40]!r}; re-create it with `cortexcraft prepare`"
        )
    if lines and lines[-1] == "":
        lines.pop()
    tokens = []
    for number, line in enumerate(lines, start=2):
        try:
            token = json.loads(line.removesuffix("\r"))  # tolerate an editor's CRLF line ends
        except json.JSONDecodeError:
            token = None
        if not isinstance(token, str) or not token:
            raise CortexCraftError(
                f"vocab file {path} line {number} is not a JSON string token: {line[:40]!r}; fix or re-create the file"
            )
        tokens.append(token)
    if len(set(tokens)) != len(tokens):
        duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
        raise CortexCraftError(
            f"vocab file {path} lists tokens twice: {', '.join(map(escape_token, duplicates[:10]))}; "
            f"remove the duplicates"
        )
    return tokens, "cortexcraft"


def describe_chars(counts: dict[str, int], limit: int = 20) -> str:
    """``'é' (x12), '\\u2028' (x1), ...`` most frequent first, for error messages."""
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{escape_token(ch)} (x{n:,})" for ch, n in ordered[:limit])
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return shown + more


# ---------------------------------------------------------------------------------------------
# character tokenizer


def code_points(text: str) -> np.ndarray:
    # ASCII text (str.isascii is O(1) in CPython) takes the 1-byte path: a quarter of the memory.
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def count_chars(chunks: Iterable[str]) -> np.ndarray:
    """Occurrences of every code point (length 0x110000) over the chunks."""
    counts = np.zeros(MAX_CODE_POINT + 1, dtype=np.int64)
    for chunk in chunks:
        for start in range(0, len(chunk), CHUNK_CHARS):
            chunk_counts = np.bincount(code_points(chunk[start : start + CHUNK_CHARS]))
            counts[: len(chunk_counts)] += chunk_counts
    return counts


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: list[str], special_tokens: list[str] | None = None, unk: str | None = None):
        special_tokens = list(special_tokens or [])
        if unk is not None and unk not in special_tokens:
            special_tokens.append(unk)
        bad = [c for c in chars if len(c) != 1]
        if bad:
            raise CortexCraftError(
                f"character vocabulary holds multi-character entries {bad[:5]}; list them as --special-tokens instead"
            )
        clash = [t for t in special_tokens if len(t) < 2 or t in chars]
        if clash:
            raise CortexCraftError(
                f"special tokens {clash} are single characters or already in the vocabulary; use names like <eos>"
            )
        self.chars = list(chars)
        self.special_tokens = special_tokens
        self.unk = unk
        self.tokens = self.chars + self.special_tokens
        self.vocab_size = len(self.tokens)
        self.dtype = dtype_for(self.vocab_size)
        self.stoi = {t: i for i, t in enumerate(self.tokens)}
        # Signed so -1 marks unknown characters; int16 halves the gather traffic for small vocabularies.
        self._table = np.full(MAX_CODE_POINT + 1, -1, dtype=np.int16 if self.vocab_size < 2**15 else np.int32)
        if self.chars:
            self._table[code_points("".join(self.chars))] = np.arange(len(self.chars))
        # With fewer than 256 ids, one byte value is free to mark unknown ASCII characters.
        self._ascii_table = None
        if self.vocab_size < ASCII_UNKNOWN:
            self._ascii_table = bytes(int(i) if i >= 0 else ASCII_UNKNOWN for i in self._table[:256])
        self._special_re = (
            re.compile("|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True)))
            if special_tokens
            else None
        )
        self._itos = np.array(self.tokens, dtype=object)

    @classmethod
    def from_file(cls, path: Path, special_tokens: list[str] | None = None, unk: str | None = None) -> "CharTokenizer":
        tokens, fmt = read_vocab_file(path)
        if fmt == "seed":
            return cls(tokens, special_tokens, unk)
        chars = [t for t in tokens if len(t) == 1]
        specials = [t for t in tokens if len(t) > 1]
        if tokens != chars + specials:
            raise CortexCraftError(
                f"vocab file {path} mixes special tokens between characters; special tokens must come last"
            )
        extra = [t for t in (special_tokens or []) if t not in specials]
        return cls(chars, specials + extra, unk)

    def _ids(self, chunk: str) -> tuple[np.ndarray, int]:
        """The ids of a chunk without special tokens, and the value that marks unknown characters."""
        if self._ascii_table is not None and chunk.isascii():
            return self._ascii_ids(chunk.encode("ascii")), ASCII_UNKNOWN
        return np.take(self._table, code_points(chunk)), -1

    def _ascii_ids(self, raw: bytes) -> np.ndarray:
        # bytes.translate maps ASCII through a 256-byte table ~2x faster than a numpy gather.
        return np.frombuffer(raw.translate(self._ascii_table), dtype=np.uint8)

    def _encode_plain(self, text: str, out: np.ndarray) -> None:
        for start in range(0, len(text), CHUNK_CHARS):
            ids, unknown = self._ids(text[start : start + CHUNK_CHARS])
            if ids.size and (ids == unknown).any():
                if self.unk is None:
                    raise self._unknown_error(text)
                ids = np.where(ids == unknown, self.stoi[self.unk], ids)
            out[start : start + len(ids)] = ids

    def _unknown_error(self, text: str) -> CortexCraftError:
        return CortexCraftError(
            f"text has characters outside the vocabulary: {describe_chars(self.unknown_chars(text))}; "
            f"use only characters of the training corpus (or prepare with --allow-unk)"
        )

    @property
    def encodes_ascii_bytes(self) -> bool:
        """Whether ``encode_ascii`` applies: fewer than 255 ids and no special tokens to match."""
        return self._ascii_table is not None and not self.special_tokens

    def encode_ascii(self, raw: bytes) -> np.ndarray:
        """``encode(raw.decode("ascii"))`` without building the string (see ``encodes_ascii_bytes``)."""
        ids = self._ascii_ids(raw)
        if (ids == ASCII_UNKNOWN).any():
            raise self._unknown_error(raw.decode("ascii"))
        return ids

    def unknown_chars(self, text: str) -> dict[str, int]:
        return self.unknown_in_counts(count_chars([text]))

    def unknown_in_counts(self, counts: np.ndarray) -> dict[str, int]:
        """Characters with a nonzero count (from ``count_chars``) that the vocabulary lacks."""
        missing = np.flatnonzero((counts > 0) & (self._table < 0))
        return {chr(cp): int(counts[cp]) for cp in missing}

    def encode(self, text: str) -> np.ndarray:
        if self._special_re is None:
            out = np.empty(len(text), dtype=self.dtype)
            self._encode_plain(text, out)
            return out
        pieces = []
        position = 0
        for match in self._special_re.finditer(text):
            plain = np.empty(match.start() - position, dtype=self.dtype)
            self._encode_plain(text[position : match.start()], plain)
            pieces += [plain, np.array([self.stoi[match.group()]], dtype=self.dtype)]
            position = match.end()
        tail = np.empty(len(text) - position, dtype=self.dtype)
        self._encode_plain(text[position:], tail)
        return np.concatenate(pieces + [tail])

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise CortexCraftError(
                f"token ids outside 0..{self.vocab_size - 1}; the ids come from a different vocabulary"
            )
        return "".join(self._itos[ids])

    def stream_decoder(self) -> Callable[[int], str]:
        """The text of each id in turn: every id is whole characters, so no id waits for the next."""
        return lambda token: self.decode([token])

    def section(self, sha256: str) -> dict:
        return {
            "type": "char",
            "file": CHAR_FILE,
            "sha256": sha256,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            "unk": self.unk,
        }

    def save(self, out_dir: Path) -> dict:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / CHAR_FILE, format_vocab(self.tokens))
        section = self.section(sha256_file(out_dir / CHAR_FILE))
        atomic_write_json(out_dir / SECTION_FILE, section)
        return section

    def preview(self, limit: int = 80) -> str:
        shown = " ".join(escape_token(t)[1:-1] if t != " " else "␠" for t in self.tokens[:limit])
        more = f" … (+{self.vocab_size - limit})" if self.vocab_size > limit else ""
        return f"{self.vocab_size} tokens: {shown}{more}"


# ---------------------------------------------------------------------------------------------
# byte-level BPE (Hugging Face tokenizers)


class BPETokenizer:
    kind = "bpe"

    def __init__(self, hf_tokenizer, special_tokens: list[str]):
        self._tok = hf_tokenizer
        self.special_tokens = list(special_tokens)
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.dtype = dtype_for(self.vocab_size)
        self.unk = None

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int, special_tokens: list[str]) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, special_tokens)

    @classmethod
    def from_file(cls, path: Path, special_tokens: list[str]) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)), special_tokens)

    @classmethod
    def from_tokenizer_file(cls, path: Path, special_tokens: list[str]) -> "BPETokenizer":
        """An existing tokenizer.json (e.g. GPT-2's); every special token must be in it."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise CortexCraftError(
                f"tokenizer file {path} does not exist; pass an existing tokenizer.json to --tokenizer-file"
            )
        try:
            hf_tokenizer = HFTokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 -- tokenizers raises a bare Exception on bad JSON
            raise CortexCraftError(
                f"tokenizer file {path} is not a Hugging Face tokenizer.json ({str(exc)[:120]}); "
                f"pass the tokenizer.json of a tokenizers/transformers tokenizer"
            ) from None
        missing = [t for t in special_tokens if hf_tokenizer.token_to_id(t) is None]
        if missing:
            raise CortexCraftError(
                f"tokenizer file {path} has no token for {', '.join(missing)} (special tokens and the "
                f"document separator); pass --separator with a token it has, or another tokenizer file"
            )
        return cls(hf_tokenizer, special_tokens)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=self.dtype)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """``[encode(t) for t in texts]`` on all cores (the tokenizers batch API, without offsets)."""
        return [
            np.asarray(e.ids, dtype=self.dtype) for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)
        ]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in np.asarray(ids).ravel()]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise CortexCraftError(
                f"token ids outside 0..{self.vocab_size - 1}; the ids come from a different vocabulary"
            )
        return self._tok.decode(ids, skip_special_tokens=False)

    def stream_decoder(self) -> Callable[[int], str | None]:
        """The new text of each id in turn, None while the ids end inside a character split across
        tokens; the pieces join to ``decode`` of all ids, each id costing one short decode."""
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=False)
        return lambda token: stream.step(self._tok, token)

    def section(self, sha256: str) -> dict:
        return {
            "type": "bpe",
            "file": BPE_FILE,
            "sha256": sha256,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            "unk": None,
        }

    def save(self, out_dir: Path) -> dict:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / BPE_FILE, self._tok.to_str())
        section = self.section(sha256_file(out_dir / BPE_FILE))
        atomic_write_json(out_dir / SECTION_FILE, section)
        return section

    def preview(self, limit: int = 30) -> str:
        vocab = sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1])
        merged = [self.decode([i]) for _, i in vocab if i >= 256 + len(self.special_tokens)][:limit]
        return f"{self.vocab_size} tokens; first merges: " + " ".join(escape_token(t) for t in merged)


# ---------------------------------------------------------------------------------------------
# building, loading and sizes


def char_tokenizer_from_counts(counts: np.ndarray, data_cfg: DataConfig) -> CharTokenizer:
    """The character tokenizer of a corpus with these ``count_chars`` counts (summed over parts
    when it was counted in parts)."""
    unk = UNK if data_cfg.allow_unk else None
    if data_cfg.vocab_file is None:
        return CharTokenizer([chr(cp) for cp in np.flatnonzero(counts)], data_cfg.special_tokens, unk)
    tok = CharTokenizer.from_file(Path(data_cfg.vocab_file), data_cfg.special_tokens, unk)
    unknown = tok.unknown_in_counts(counts)
    if unknown and unk is None:
        raise CortexCraftError(
            f"the corpus has {len(unknown)} characters missing from --vocab {data_cfg.vocab_file}: "
            f"{describe_chars(unknown)}; add them to the vocab file or pass --allow-unk"
        )
    return tok


def bpe_special_tokens(data_cfg: DataConfig) -> list[str]:
    """The configured special tokens plus the document separator when it is ``<|endoftext|>``."""
    specials = list(data_cfg.special_tokens)
    if default_separator(data_cfg) == BPE_SEPARATOR and BPE_SEPARATOR not in specials:
        specials.append(BPE_SEPARATOR)
    return specials


def check_tokenizer_config(data_cfg: DataConfig) -> None:
    """Fail fast on tokenizer settings that would only break after the download."""
    if data_cfg.tokenizer == "bpe" and data_cfg.tokenizer_file is not None:
        BPETokenizer.from_tokenizer_file(Path(data_cfg.tokenizer_file), bpe_special_tokens(data_cfg))
    elif data_cfg.tokenizer == "bpe":
        if data_cfg.vocab_size is None:
            raise CortexCraftError("--tokenizer bpe needs a vocabulary size; pass --vocab-size N (e.g. 2048)")
        floor = 256 + len(bpe_special_tokens(data_cfg))
        if data_cfg.vocab_size < floor:
            raise CortexCraftError(
                f"--vocab-size {data_cfg.vocab_size} is below the {floor} byte and special tokens BPE starts from; "
                f"use at least {floor}"
            )
        if data_cfg.vocab_file:
            raise CortexCraftError("--vocab applies to the char tokenizer only; drop it or use --tokenizer char")
    elif data_cfg.tokenizer_file is not None:
        raise CortexCraftError("--tokenizer-file loads a BPE tokenizer; add --tokenizer bpe or drop --tokenizer-file")
    elif data_cfg.vocab_file is not None:
        read_vocab_file(Path(data_cfg.vocab_file))
    bad = [t for t in data_cfg.special_tokens if len(t) < 2 or any(c.isspace() for c in t)]
    if bad:
        raise CortexCraftError(
            f"special tokens {bad} must be at least 2 characters without whitespace; write them like <eos>"
        )


def build_vocab(
    corpus: dict,
    data_cfg: DataConfig,
    out_dir: Path,
    char_counts: np.ndarray | None = None,
    tokenizer: Tokenizer | None = None,
) -> dict:
    """Build the tokenizer of ``data_cfg`` from the corpus and save it into ``out_dir``.

    Char: the characters of the whole corpus (nanoGPT's 65 for Tiny Shakespeare; ``char_counts``
    when they were counted already), or ``--vocab``. BPE: ``--tokenizer-file``, or trained on the
    first ``bpe_train_chars`` characters of the train split. With ``tokenizer`` (e.g. a pretrained
    model's own, see ``cortexcraft.pretrained``): that one, whatever ``data_cfg`` says. Returns the
    vocab manifest."""
    out_dir = Path(out_dir)
    if tokenizer is None:
        check_tokenizer_config(data_cfg)
    if tokenizer is not None:
        tok = tokenizer
    elif data_cfg.tokenizer == "char":
        counts = count_chars(corpus_chunks(corpus)) if char_counts is None else char_counts
        tok = char_tokenizer_from_counts(counts, data_cfg)
    elif data_cfg.tokenizer_file is not None:
        tok = BPETokenizer.from_tokenizer_file(Path(data_cfg.tokenizer_file), bpe_special_tokens(data_cfg))
    else:
        check_tokenizer_config(data_cfg)
        cut = train_val_cut(corpus, data_cfg.val_fraction)
        sample = corpus_chunks(corpus, 0, min(cut, data_cfg.bpe_train_chars))
        tok = BPETokenizer.train(sample, data_cfg.vocab_size, bpe_special_tokens(data_cfg))
    section = tok.save(out_dir)
    path = out_dir / section["file"]
    return {
        "dir": str(out_dir.resolve()),
        "path": str(path.resolve()),
        "sha256": section["sha256"],
        "vocab_size": tok.vocab_size,
        "tokenizer": section,
        "preview": tok.preview(),
        "corpus_fingerprint": corpus["fingerprint"],
    }


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer stored in ``directory``: a shard directory (``manifest.json``) or any directory
    a tokenizer was ``save``d into (``tokenizer.section.json``)."""
    directory = Path(directory)
    manifest_path, section_path = directory / "manifest.json", directory / SECTION_FILE
    if manifest_path.is_file():
        section = read_json(manifest_path).get("tokenizer")
    elif section_path.is_file():
        section = read_json(section_path)
    else:
        raise CortexCraftError(
            f"no tokenizer in {directory} (neither manifest.json nor {SECTION_FILE}); run `cortexcraft prepare` first"
        )
    if not isinstance(section, dict) or section.get("type") not in ("char", "bpe"):
        raise CortexCraftError(f"tokenizer section in {directory} is missing or unknown; re-run `cortexcraft prepare`")
    path = directory / section["file"]
    if not path.is_file():
        raise CortexCraftError(f"tokenizer file {path} is missing; re-run `cortexcraft prepare` (or copy it back)")
    if sha256_file(path) != section["sha256"]:
        raise CortexCraftError(
            f"tokenizer file {path} does not match its recorded sha256; re-run `cortexcraft prepare`"
        )
    if section["type"] == "char":
        tok = CharTokenizer.from_file(path, section.get("special_tokens"), section.get("unk"))
    else:
        tok = BPETokenizer.from_file(path, section.get("special_tokens", []))
    if tok.vocab_size != section["vocab_size"]:
        raise CortexCraftError(
            f"tokenizer file {path} has {tok.vocab_size} tokens, its section says {section['vocab_size']}; "
            f"re-run `cortexcraft prepare`"
        )
    return tok


def preset_vocab_size(data_cfg: DataConfig) -> int:
    """Vocabulary size ``data_cfg`` will produce, for parameter counts only (see the constants
    above for which figures are estimates)."""
    extra = len(data_cfg.special_tokens) + (1 if data_cfg.allow_unk and UNK not in data_cfg.special_tokens else 0)
    if data_cfg.tokenizer == "bpe" and data_cfg.tokenizer_file:
        return BPETokenizer.from_tokenizer_file(Path(data_cfg.tokenizer_file), bpe_special_tokens(data_cfg)).vocab_size
    if data_cfg.tokenizer == "bpe":
        return data_cfg.vocab_size or UNKNOWN_SOURCE_CHARS_ESTIMATE
    if data_cfg.vocab_file:
        tokens, _ = read_vocab_file(Path(data_cfg.vocab_file))
        return len(tokens) + extra
    known = {
        "tinyshakespeare": TINYSHAKESPEARE_CHARS,
        "openwebtext": OPENWEBTEXT_CHARS_ESTIMATE,
        "openwebtext-10k": OPENWEBTEXT_CHARS_ESTIMATE,
    }
    return known.get(data_cfg.source, UNKNOWN_SOURCE_CHARS_ESTIMATE) + extra
