"""Char and BPE tokenizers: vocab.txt round trips, unknown characters, special tokens, sizes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cortexcraft.config import DataConfig, build_config
from cortexcraft.errors import CortexCraftError
from cortexcraft.sources import download
from cortexcraft.tokenizer import (
    VOCAB_HEADER, BPETokenizer, CharTokenizer, build_vocab, dtype_for, load_tokenizer, preset_vocab_size,
    read_vocab_file,
)

TRICKY = ["\n", "\r", "\t", "\0", " ", '"', "\\", "a", "é", "\u0301", "\u2028", "\u2029", "\x85", "\ufeff", "😀", "𝔘"]


def test_vocab_file_round_trips_every_character_and_stays_readable(tmp_path):
    tok = CharTokenizer(sorted(TRICKY), special_tokens=["<eos>"])
    tok.save(tmp_path)
    lines = (tmp_path / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == VOCAB_HEADER
    assert len(lines) == 1 + tok.vocab_size + 1  # header, one line per token, final newline
    assert '"a"' in lines and '" "' in lines and '"\\n"' in lines and '"\\u2028"' in lines and '"😀"' in lines
    loaded = load_tokenizer(tmp_path)
    assert loaded.tokens == tok.tokens
    text = "".join(TRICKY) + "<eos>" + "".join(reversed(TRICKY))
    assert loaded.decode(loaded.encode(text)) == text


def test_char_ids_are_sorted_characters_and_special_tokens_come_after():
    tok = CharTokenizer(sorted(set("hello world")), special_tokens=["<pad>", "<eos>"])
    plain = CharTokenizer(sorted(set("hello world")))
    ids = tok.encode("hello<eos> world")
    assert list(ids[:5]) == list(plain.encode("hello"))
    assert ids[5] == tok.stoi["<eos>"] == len(plain.tokens) + 1
    assert tok.decode(ids) == "hello<eos> world"


def test_unknown_characters_are_listed_with_counts():
    tok = CharTokenizer(sorted(set("abc ")))
    with pytest.raises(CortexCraftError, match=r'"é" \(x2\).*"\\u2028" \(x1\)') as err:
        tok.encode("a é é\u2028")
    assert "\n" not in str(err.value)


def test_unknown_characters_map_to_unk_when_allowed():
    tok = CharTokenizer(sorted(set("abc")), unk="<unk>")
    assert tok.decode(tok.encode("axb")) == "a<unk>b"


@pytest.mark.parametrize(
    "size, dtype", [(65, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)]
)
def test_dtype_is_the_smallest_that_holds_the_ids(size, dtype):
    assert dtype_for(size) == np.dtype(dtype)


def test_seed_format_vocab_is_the_sorted_set_of_its_characters(openwebtext_vocab_path):
    tokens, fmt = read_vocab_file(openwebtext_vocab_path)
    assert fmt == "seed"
    assert len(tokens) == 5520 and tokens == sorted(tokens) and "\n" in tokens and "\0" in tokens
    tok = CharTokenizer.from_file(openwebtext_vocab_path)
    assert tok.dtype == np.uint16
    assert tok.decode(tok.encode("Hello! Can you see me?")) == "Hello! Can you see me?"


def _corpus(tmp_path, text, name="corpus.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return download(DataConfig(source=str(path)), tmp_path / "cache")


def test_supplied_vocab_missing_corpus_characters_is_an_error_listing_them(tmp_path):
    vocab = tmp_path / "seed_vocab.txt"
    vocab.write_text("abc\n", encoding="utf-8")
    corpus = _corpus(tmp_path, "abc\nabz zz\n")
    out = tmp_path / "vocab"
    with pytest.raises(CortexCraftError, match=r'missing from --vocab .*"z" \(x3\), " " \(x1\).*--allow-unk'):
        build_vocab(corpus, DataConfig(source="x", vocab_file=str(vocab)), out)
    assert not out.exists()
    manifest = build_vocab(corpus, DataConfig(source="x", vocab_file=str(vocab), allow_unk=True), out)
    tok = load_tokenizer(out)
    assert manifest["vocab_size"] == 5 and tok.decode(tok.encode("ab z")) == "ab<unk><unk>"


def test_build_vocab_extracts_characters_and_previews_them(tmp_path):
    corpus = _corpus(tmp_path, "ba\r\nab\n")
    manifest = build_vocab(corpus, DataConfig(source="x"), tmp_path / "vocab")
    assert manifest["vocab_size"] == 4
    assert load_tokenizer(tmp_path / "vocab").tokens == ["\n", "\r", "a", "b"]
    assert manifest["preview"].startswith("4 tokens:")


def test_load_tokenizer_refuses_an_edited_vocab_file(tmp_path):
    CharTokenizer(list("ab")).save(tmp_path)
    (tmp_path / "vocab.txt").write_text(VOCAB_HEADER + '\n"a"\n"c"\n', encoding="utf-8")
    with pytest.raises(CortexCraftError, match="does not match its recorded sha256; re-run"):
        load_tokenizer(tmp_path)


def test_malformed_vocab_line_names_the_line(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text(VOCAB_HEADER + '\n"a"\nb\n', encoding="utf-8")
    with pytest.raises(CortexCraftError, match="line 3 is not a JSON string token"):
        read_vocab_file(path)


def test_missing_tokenizer_directory_says_how_to_fix(tmp_path):
    with pytest.raises(CortexCraftError, match="run `cortexcraft prepare` first"):
        load_tokenizer(tmp_path)


def test_bpe_round_trips_text_and_saves(tmp_path):
    text = "To be, or not to be: that is the question.\nWhether 'tis nobler — 😀 é\r\n" * 40
    tok = BPETokenizer.train(iter([text]), vocab_size=300, special_tokens=["<|endoftext|>"])
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.kind == "bpe" and loaded.vocab_size == tok.vocab_size <= 300
    sample = "not to be<|endoftext|>😀 question\r\n"
    ids = loaded.encode(sample)
    assert tok.vocab_size - 1 >= ids.max() and loaded.decode(ids) == sample
    separator_ids = loaded.encode("<|endoftext|>")
    assert len(separator_ids) == 1 and (ids == separator_ids[0]).sum() == 1


def test_streamed_pieces_join_to_the_full_decode_and_hold_back_split_characters():
    tok = BPETokenizer.train(
        iter(["To be, or not to be: that is the question.\n" * 30]), vocab_size=290, special_tokens=["<|endoftext|>"]
    )
    sample = "be 😀<|endoftext|>日本𝔘 not é"
    # None of these characters was seen in training, so each one spans several byte tokens.
    assert sum("\ufffd" in tok.decode([i]) for i in tok.encode(sample).tolist()) >= 12
    for tokenizer in (tok, CharTokenizer(sorted(set(sample.replace("<|endoftext|>", ""))), ["<|endoftext|>"])):
        ids = tokenizer.encode(sample).tolist()
        pieces = [piece for piece in map(tokenizer.stream_decoder(), ids) if piece]
        assert "".join(pieces) == tokenizer.decode(ids) == sample
        assert not any("\ufffd" in piece for piece in pieces)
    # A stream cut inside a character holds its first bytes back instead of printing U+FFFD.
    cut = tok.encode("be 😀").tolist()[:-1]
    assert tok.decode(cut) == "be \ufffd"
    assert "".join(piece for piece in map(tok.stream_decoder(), cut) if piece) == "be "


def test_bpe_needs_a_vocab_size(tmp_path):
    corpus = _corpus(tmp_path, "some text\n" * 10)
    with pytest.raises(CortexCraftError, match="pass --vocab-size N"):
        build_vocab(corpus, DataConfig(source="x", tokenizer="bpe"), tmp_path / "vocab")


def test_preset_vocab_sizes(tmp_path):
    assert preset_vocab_size(build_config("cpu").data) == 65
    assert preset_vocab_size(build_config("gpt2-small").data) == 69
    vocab = tmp_path / "v.txt"
    vocab.write_text("xyz", encoding="utf-8")
    assert preset_vocab_size(DataConfig(source="x", vocab_file=str(vocab))) == 3
    assert preset_vocab_size(DataConfig(source="x", tokenizer="bpe", vocab_size=1000)) == 1000


def test_section_file_describes_the_tokenizer(tmp_path):
    section = CharTokenizer(list("ab")).save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.section.json").read_text()) == section
    assert section["type"] == "char" and section["file"] == "vocab.txt" and section["vocab_size"] == 2


def test_hand_written_vocab_with_crlf_and_no_final_newline_is_read_whole(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes((VOCAB_HEADER + '\r\n"a"\r\n"\\r"\r\n"<eos>"').encode())
    assert read_vocab_file(path) == (["a", "\r", "<eos>"], "cortexcraft")
    tok = CharTokenizer.from_file(path)
    assert tok.special_tokens == ["<eos>"] and tok.decode(tok.encode("a\r<eos>")) == "a\r<eos>"


def test_ascii_bytes_encode_like_text_and_unknown_bytes_are_named():
    tok = CharTokenizer(sorted(set("hello world\n")))
    assert tok.encodes_ascii_bytes
    assert np.array_equal(tok.encode_ascii(b"hello\nworld"), tok.encode("hello\nworld"))
    with pytest.raises(CortexCraftError, match=r'outside the vocabulary: "a" \(x1\), "y" \(x1\), "z" \(x1\)'):
        tok.encode_ascii(b"lazy")
    assert not CharTokenizer(list("ab"), special_tokens=["<eos>"]).encodes_ascii_bytes
