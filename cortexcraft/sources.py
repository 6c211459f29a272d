"""Source specs -> one UTF-8 corpus file (documents joined by a separator) plus its manifest.

Specs: ``tinyshakespeare`` | ``openwebtext`` | ``openwebtext-10k`` | ``hf:REPO[@REVISION][:SPLIT]``
| an http(s) URL | a local file, directory (every file below it, sorted) or glob.

A single local file is used in place (fingerprinted by its content). Everything else is written
to a cache entry ``cache_dir/<kind>-<key>/`` holding ``corpus.txt``, ``doc_starts.npy`` (character
offset where each document starts, when there are several) and ``corpus.json`` (the manifest). An
entry is built in a temp dir and renamed into place when complete, so a failed or partial download
is never cached; a complete entry is reused without touching the network.

Every call first revalidates the source (``source_revision``, see ``cortexcraft.freshness``): cache
entries are keyed by the revision found (ETag/Last-Modified/Content-Length of a URL, the commit sha
of a hub revision, the content of local files), so a changed source is downloaded again and an
unchanged one is not. When no server answers (or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set), the
revision seen last is used, with a warning; with none seen yet it is one immediate, clear error
rather than a slow retry storm or a misleading "file not found".
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import logging
import multiprocessing
import os
import re
import shutil
import urllib.error
import urllib.request
from array import array
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cortexcraft.config import DataConfig
from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import (TempDir, atomic_open, atomic_write_json, fsync_dir, read_json, remove_dead_temps,
                                sha256_file, sha256_json)
from cortexcraft.freshness import (SourceUnreachable, http_revision, hub_revision, local_revision, remembered,
                                   revision_id, state_file)
from cortexcraft.hub import hub_endpoint, hub_token

log = logging.getLogger(__name__)

CORPUS_FORMAT = "cortexcraft-corpus/1"
TINYSHAKESPEARE_REPO = "karpathy/tiny_shakespeare"
TINYSHAKESPEARE_REVISION = "refs/convert/parquet"
TINYSHAKESPEARE_SPLITS = ("train", "validation", "test")
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_CHARS = 1_115_394
HUB_ALIASES = {"openwebtext": "dvruette/openwebtext", "openwebtext-10k": "sam2ai/openwebtext-10k"}
PROBE_TIMEOUT_SECONDS = 5.0
READ_BYTES = 1 << 20
STREAM_BATCH_ROWS = 256
# Text (uncompressed parquet) bytes per segment when several processes collect a corpus, and
# segments per process: fewer leave a worker idle at the end while the other finishes.
SEGMENT_BYTES = 64 << 20
SEGMENTS_PER_WORKER = 8
COPY_BYTES = 1 << 24


def default_separator(data_cfg: DataConfig) -> str:
    if data_cfg.separator is not None:
        return data_cfg.separator
    return "<|endoftext|>" if data_cfg.tokenizer == "bpe" else "\n\n"


def local_copy_hint(spec: str) -> str:
    if spec == "tinyshakespeare":
        return "download input.txt and pass --source /path/to/input.txt"
    return "download the text and pass --source /path/to/local/copy"


# ---------------------------------------------------------------------------------------------
# reading a corpus


def iter_text(path: Path, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Chunks of the UTF-8 file ``path`` (about READ_BYTES each) covering characters ``[start, stop)``."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    position = 0
    with open(path, "rb") as handle:
        while True:
            raw = handle.read(READ_BYTES)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                raise CortexCraftError(
                    f"{path} is not UTF-8 text ({exc.reason} near byte {handle.tell() - len(raw) + exc.start:,}); "
                    f"convert it to UTF-8"
                ) from None
            lo, hi = max(start - position, 0), len(text) if stop is None else min(stop - position, len(text))
            if lo < hi:
                yield text[lo:hi]
            position += len(text)
            if not raw or (stop is not None and position >= stop):
                return


def corpus_chunks(corpus: dict, start: int = 0, stop: int | None = None) -> Iterator[str]:
    return iter_text(Path(corpus["path"]), start, stop)


def corpus_byte_range_text(corpus: dict, start: int, stop: int) -> Iterator[str]:
    """Chunks of the corpus text held in bytes ``[start, stop)``; both ends on character boundaries."""
    path = Path(corpus["path"])
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    with open(path, "rb") as handle:
        handle.seek(start)
        position = start
        while position < stop:
            raw = handle.read(min(READ_BYTES, stop - position))
            if not raw:
                raise CortexCraftError(f"corpus {path} changed since it was read; re-run `cortexcraft prepare`")
            try:
                text = decoder.decode(raw, final=position + len(raw) >= stop)
            except UnicodeDecodeError as exc:
                raise CortexCraftError(
                    f"{path} is not UTF-8 text ({exc.reason} near byte {position + exc.start:,}); convert it to UTF-8"
                ) from None
            position += len(raw)
            if text:
                yield text


def char_to_byte_offset(corpus: dict, char: int) -> int:
    """Byte offset of character ``char`` of the corpus (one pass counting UTF-8 lead bytes)."""
    if corpus["chars"] == corpus["bytes"]:
        return char
    seen = 0
    with open(corpus["path"], "rb") as handle:
        while raw := handle.read(READ_BYTES):
            leads = (np.frombuffer(raw, dtype=np.uint8) & 0xC0) != 0x80
            count = int(np.count_nonzero(leads))
            if seen + count > char:
                return handle.tell() - len(raw) + int(np.flatnonzero(leads)[char - seen])
            seen += count
    if seen == char:
        return corpus["bytes"]
    raise CortexCraftError(f"corpus {corpus['path']} changed since it was read; re-run `cortexcraft prepare`")


def corpus_ascii_blocks(corpus: dict, start: int, stop: int) -> Iterator[bytes]:
    """Bytes ``[start, stop)`` of an ASCII corpus, where character offsets are byte offsets."""
    path = Path(corpus["path"])
    with open(path, "rb") as handle:
        handle.seek(start)
        position = start
        while position < stop:
            raw = handle.read(min(READ_BYTES, stop - position))
            if not raw or not raw.isascii():
                raise CortexCraftError(f"corpus {path} changed since it was read; re-run `cortexcraft prepare`")
            position += len(raw)
            yield raw


def document_starts(corpus: dict) -> np.ndarray:
    if corpus.get("doc_starts") is None:
        return np.zeros(1, dtype=np.int64)
    return np.load(corpus["doc_starts"])


def train_val_cut(corpus: dict, val_fraction: float) -> int:
    """Character offset where validation starts: nanoGPT's ``int(n * (1 - f))``, moved to the nearest
    document start when the corpus has several documents (documents are never cut)."""
    chars = corpus["chars"]
    cut = int(chars * (1 - val_fraction))
    if corpus["documents"] > 1:
        starts = document_starts(corpus)[1:]
        cut = int(starts[np.argmin(np.abs(starts - cut))])
    for name, size in (("train", cut), ("val", chars - cut)):
        if size < 2:
            raise CortexCraftError(
                f"--val-fraction {val_fraction} leaves the {name} split with {size} characters of {chars:,} "
                f"({corpus['documents']:,} documents); use a larger corpus or a different --val-fraction"
            )
    return cut


# ---------------------------------------------------------------------------------------------
# cache entries


class CorpusWriter:
    """Builds a cache entry in a temp dir; ``commit`` renames it into place with its manifest."""

    def __init__(self, entry: Path, info: dict, separator: str):
        self.entry = entry
        remove_dead_temps(entry.parent)
        self._temp = TempDir(entry.parent, entry.name)
        self.tmp = self._temp.path
        self.info = info
        self.separator = separator
        # datasets' own download cache lives in the entry's temp dir and is dropped on commit:
        # the entry's corpus.txt is the cache.
        self.scratch = str(self.tmp / "datasets")
        self.handle = open(self.tmp / "corpus.txt", "wb")
        self.digest = hashlib.sha256()
        self.starts = array("q")
        self.chars = 0
        self.bytes = 0

    def add(self, text: str) -> None:
        if self.starts:
            self._write(self.separator)
        self.starts.append(self.chars)
        self._write(text)

    def _write(self, text: str) -> None:
        data = text.encode("utf-8")
        self.handle.write(data)
        self.digest.update(data)
        self.chars += len(text)
        self.bytes += len(data)

    def add_segment(self, path: str, chars: int, starts: np.ndarray) -> None:
        """Append the documents another process wrote to ``path`` (joined by the separator,
        starting at characters ``starts`` of it), exactly as ``add`` would have, then delete it."""
        if len(starts):
            if self.starts:
                self._write(self.separator)
            self.starts.frombytes((starts + self.chars).astype(np.int64).tobytes())
            with open(path, "rb") as segment:
                while block := segment.read(COPY_BYTES):
                    self.handle.write(block)
                    self.digest.update(block)
                    self.bytes += len(block)
            self.chars += chars
        os.remove(path)

    def commit(self) -> dict:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        sha = self.digest.hexdigest()
        doc_starts_sha = None
        if len(self.starts) > 1:
            starts = np.frombuffer(self.starts, dtype=np.int64)
            with atomic_open(self.tmp / "doc_starts.npy") as handle:
                np.save(handle, starts)
            doc_starts_sha = hashlib.sha256(starts.tobytes()).hexdigest()
        manifest = dict(
            self.info,
            format=CORPUS_FORMAT,
            sha256=sha,
            bytes=self.bytes,
            chars=self.chars,
            documents=len(self.starts),
            separator=self.separator,
            fingerprint=sha256_json({"corpus": sha, "doc_starts": doc_starts_sha}),
        )
        shutil.rmtree(self.scratch, ignore_errors=True)
        atomic_write_json(self.tmp / "corpus.json", manifest)
        if self.entry.exists():
            shutil.rmtree(self.entry)
        os.replace(self.tmp, self.entry)
        self._temp.close()
        fsync_dir(self.entry.parent)
        return _with_paths(manifest, self.entry)

    def abort(self) -> None:
        self.handle.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._temp.close()

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _with_paths(manifest: dict, entry: Path) -> dict:
    doc_starts = entry / "doc_starts.npy"
    return dict(
        manifest,
        path=str((entry / "corpus.txt").resolve()),
        doc_starts=str(doc_starts.resolve()) if manifest["documents"] > 1 else None,
    )


def _cached(entry: Path) -> dict | None:
    try:
        manifest = read_json(entry / "corpus.json")
        complete = manifest["documents"] == 1 or (entry / "doc_starts.npy").is_file()
        if complete and (entry / "corpus.txt").stat().st_size == manifest["bytes"]:
            return _with_paths(manifest, entry)
    except (OSError, ValueError, KeyError):
        pass
    return None


def _entry(cache_dir: Path, kind: str, key: dict) -> Path:
    return Path(cache_dir) / f"{kind}-{sha256_json(key)[:16]}"


# ---------------------------------------------------------------------------------------------
# network


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def probe(url: str) -> tuple[int | None, str | None]:
    """(HTTP status, None) when a server answered ``url``, (None, reason) when none could be reached."""
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_SECONDS
        ) as response:
            return response.status, None
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError) as exc:
        return None, str(getattr(exc, "reason", exc))


def _require_online(spec: str) -> None:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_true(name):
            raise CortexCraftError(
                f"{name} is set, so source {spec!r} cannot be downloaded; unset it or {local_copy_hint(spec)}"
            )


def _require_hub(spec: str) -> None:
    _require_online(spec)
    _, reason = probe(hub_endpoint())
    if reason is not None:
        raise CortexCraftError(
            f"cannot reach the Hugging Face hub for source {spec!r} ({reason}); {local_copy_hint(spec)}"
        )


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def _load_dataset(*args, **kwargs):
    import datasets

    return datasets.load_dataset(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# sources


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:REPO[@REVISION][:SPLIT]`` -> (repo, revision, split)."""
    body = spec[len("hf:") :]
    body, _, split = body.partition(":")
    repo, _, revision = body.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CortexCraftError(
            f"source {spec!r} is not hf:OWNER/NAME[@REVISION][:SPLIT]; write e.g. hf:sam2ai/openwebtext-10k:train"
        )
    return repo, revision or None, split or "train"


def _download_tinyshakespeare(data_cfg: DataConfig, cache_dir: Path, revision: dict) -> dict:
    spec = "tinyshakespeare"
    entry = _entry(cache_dir, spec, {"repo": TINYSHAKESPEARE_REPO, "revision": revision_id(revision)})
    if (hit := _cached(entry)) is not None:
        return hit
    _require_online(spec)
    with CorpusWriter(entry, _info(spec, "tinyshakespeare", revision), default_separator(data_cfg)) as writer:
        text, hub_error = None, "its revision could not be resolved"
        if revision["kind"] == "hub":
            sha = revision["identity"]["sha"]
            try:
                parts = _load_dataset(TINYSHAKESPEARE_REPO, revision=sha, cache_dir=writer.scratch, token=hub_token())
                text = "".join("".join(parts[split]["text"]) for split in TINYSHAKESPEARE_SPLITS)
                writer.info["origin"] = (
                    f"hub {TINYSHAKESPEARE_REPO}@{TINYSHAKESPEARE_REVISION} ({sha[:12]}; train+validation+test)"
                )
            except Exception as exc:  # noqa: BLE001 -- any hub failure falls back to the raw file
                hub_error = _first_line(exc)
                log.warning(
                    "hub download of %s failed (%s); trying %s", TINYSHAKESPEARE_REPO, hub_error, TINYSHAKESPEARE_URL
                )
        if text is None:
            status, reason = probe(TINYSHAKESPEARE_URL)
            if reason is not None or status >= 400:
                raise CortexCraftError(
                    f"cannot reach the Hugging Face hub for source 'tinyshakespeare' ({hub_error}) "
                    f"nor its raw file URL ({reason or f'HTTP {status}'}); {local_copy_hint(spec)}"
                )
            text = "".join(_url_documents(TINYSHAKESPEARE_URL, writer.scratch, spec))
            writer.info["origin"] = TINYSHAKESPEARE_URL
        if len(text) != TINYSHAKESPEARE_CHARS:
            raise CortexCraftError(
                f"source 'tinyshakespeare' from {writer.info['origin']} has {len(text):,} characters, "
                f"expected {TINYSHAKESPEARE_CHARS:,}; {local_copy_hint(spec)}"
            )
        writer.add(text)
        return writer.commit()


def _url_documents(url: str, scratch: str, spec: str) -> Iterator[str]:
    # The `text` builder with sample_by="document" yields each file whole (it turns \r\n into \n).
    try:
        dataset = _load_dataset("text", data_files=url, sample_by="document", split="train", cache_dir=scratch)
    except Exception as exc:  # noqa: BLE001 -- report any datasets failure as one line
        raise CortexCraftError(
            f"downloading source {spec!r} failed ({_first_line(exc)}); {local_copy_hint(spec)}"
        ) from None
    yield from dataset["text"]


def _download_url(data_cfg: DataConfig, cache_dir: Path, revision: dict) -> dict:
    url = data_cfg.source
    entry = _entry(
        cache_dir, "url", {"url": url, "revision": revision_id(revision), "separator": default_separator(data_cfg)}
    )
    if (hit := _cached(entry)) is not None:
        return hit
    _require_online(url)
    with CorpusWriter(entry, dict(_info(url, "url", revision), origin=url), default_separator(data_cfg)) as writer:
        for document in _url_documents(url, writer.scratch, url):
            writer.add(document)
        return writer.commit()


def _download_hub(
    spec: str, repo: str, split: str, data_cfg: DataConfig, cache_dir: Path, revision: dict, workers: int
) -> dict:
    limits = {"max_docs": data_cfg.max_docs, "max_bytes": data_cfg.max_bytes}
    column = data_cfg.text_column
    sha = revision["identity"]["sha"]
    key = {
        "repo": repo,
        "revision": sha,
        "split": split,
        "column": column,
        "separator": default_separator(data_cfg),
        **limits,
    }
    entry = _entry(cache_dir, "hub-" + repo.replace("/", "--"), key)
    if (hit := _cached(entry)) is not None:
        return hit
    _require_hub(spec)
    info = dict(
        _info(spec, "hub", revision),
        origin=f"hub {repo}@{revision['requested']} ({sha[:12]}):{split}",
        text_column=column,
        **limits,
    )
    with CorpusWriter(entry, info, default_separator(data_cfg)) as writer:
        stream = {"kind": "hub", "spec": spec, "repo": repo, "sha": sha, "split": split, "column": column}
        _collect(writer, _hub_segments(stream, writer.scratch, workers), data_cfg, workers)
        if not writer.starts:
            raise CortexCraftError(
                f"source {spec!r} split {split!r} has no rows; choose another split with hf:{repo}:SPLIT"
            )
        return writer.commit()


def _limit_reached(writer: CorpusWriter, data_cfg: DataConfig) -> bool:
    # max_bytes stops after the document that reaches it: documents are never cut.
    return (data_cfg.max_docs is not None and len(writer.starts) >= data_cfg.max_docs) or (
        data_cfg.max_bytes is not None and writer.bytes >= data_cfg.max_bytes
    )


def _local_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise CortexCraftError(f"source directory {path} holds no files; put text files in it or pass a file")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise CortexCraftError(f"source glob {spec!r} matches no files; check the pattern")
        return files
    raise CortexCraftError(
        f"source {spec!r} is not a known name (tinyshakespeare, openwebtext, openwebtext-10k), hf:REPO, "
        f"an http(s) URL, nor an existing file, directory or glob; check the spelling or path"
    )


def _describe_local_file(path: Path, spec: str) -> dict:
    chars = sum(len(chunk) for chunk in iter_text(path))
    if chars == 0:
        raise CortexCraftError(f"source file {path} is empty; pass a file with text")
    sha = sha256_file(path)
    return {
        "format": CORPUS_FORMAT,
        "spec": spec,
        "kind": "file",
        "origin": str(path.resolve()),
        "path": str(path.resolve()),
        "doc_starts": None,
        "sha256": sha,
        "bytes": path.stat().st_size,
        "chars": chars,
        "documents": 1,
        "separator": None,
        "fingerprint": sha256_json({"corpus": sha, "doc_starts": None}),
    }


def _download_local(data_cfg: DataConfig, cache_dir: Path, revision: dict, workers: int) -> dict:
    spec = data_cfg.source
    files = _local_files(spec)
    if len(files) == 1 and Path(spec).expanduser().is_file() and files[0].suffix != ".parquet":
        return _describe_local_file(files[0], spec)
    key = {
        "files": revision["identity"]["files"],
        "separator": default_separator(data_cfg),
        "text_column": data_cfg.text_column,
        "max_docs": data_cfg.max_docs,
        "max_bytes": data_cfg.max_bytes,
    }
    entry = _entry(cache_dir, "local", key)
    if (hit := _cached(entry)) is not None:
        return hit
    segments = _local_segments(files, data_cfg.text_column)
    info = dict(
        _info(spec, "files", revision),
        origin=f"{len(files)} files from {spec}",
        max_docs=data_cfg.max_docs,
        max_bytes=data_cfg.max_bytes,
    )
    with CorpusWriter(entry, info, default_separator(data_cfg)) as writer:
        _collect(writer, segments, data_cfg, workers)
        return writer.commit()


# ---------------------------------------------------------------------------------------------
# segments
#
# A source of many documents is collected as segments, in corpus order: a run of text files, a
# range of a parquet file's row groups, or a contiguous shard of a streamed hub split (of its
# files, or of its row groups when it has fewer files than segments are wanted). One process reads
# the segments in order; several processes write a segment file each, and the corpus is their
# concatenation: the same bytes either way.


def _open_parquet(path: Path, column: str):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 -- pyarrow raises several types for a bad file
        raise CortexCraftError(f"{path} is not a readable parquet file ({_first_line(exc)}); check the file") from None
    if column not in parquet.schema_arrow.names:
        raise CortexCraftError(
            f"parquet file {path} has no column {column!r} (columns: {', '.join(parquet.schema_arrow.names)}); "
            f"pass --text-column NAME"
        )
    return parquet


def _local_segments(files: list[Path], column: str) -> list[dict]:
    """Runs of text files of about ``SEGMENT_BYTES``, and row-group ranges of parquet files of about
    that many uncompressed bytes; every parquet file is opened (and checked) here, before any work."""
    segments: list[dict] = []
    text_files: list[str] = []
    text_bytes = 0
    for path in files:
        if path.suffix != ".parquet":
            if path.stat().st_size == 0:
                raise CortexCraftError(f"source file {path} is empty; pass a file with text")
            text_files.append(str(path))
            text_bytes += path.stat().st_size
            if text_bytes >= SEGMENT_BYTES:
                segments.append({"kind": "text", "files": text_files})
                text_files, text_bytes = [], 0
            continue
        if text_files:
            segments.append({"kind": "text", "files": text_files})
            text_files, text_bytes = [], 0
        metadata = _open_parquet(path, column).metadata
        first, size = 0, 0
        for group in range(metadata.num_row_groups):
            size += metadata.row_group(group).total_byte_size
            if size >= SEGMENT_BYTES or group == metadata.num_row_groups - 1:
                segments.append(
                    {"kind": "parquet", "path": str(path), "column": column, "row_groups": [first, group + 1]}
                )
                first, size = group + 1, 0
    if text_files:
        segments.append({"kind": "text", "files": text_files})
    return segments


def _hub_stream(segment: dict, scratch: str):
    stream = _load_dataset(
        segment["repo"],
        revision=segment["sha"],
        split=segment["split"],
        streaming=True,
        cache_dir=scratch,
        token=hub_token(),
    )
    if segment.get("reshard"):
        stream = stream.reshard()
    if segment.get("shard"):
        index, count = segment["shard"]
        stream = stream.shard(num_shards=count, index=index)
    return stream


def _hub_failure(segment: dict, exc: Exception, documents: int) -> CortexCraftError:
    spec = segment["spec"]
    where = f"shard {segment['shard'][0] + 1} of {segment['shard'][1]} " if segment.get("shard") else ""
    return CortexCraftError(
        f"streaming source {spec!r} from the hub failed {where}after {documents:,} documents "
        f"({_first_line(exc)}); check the id, re-run to retry, or {local_copy_hint(spec)}"
    )


def _hub_segments(stream: dict, scratch: str, workers: int) -> list[dict]:
    """The whole split for one process; else contiguous shards, ``SEGMENTS_PER_WORKER`` per worker
    where the split has that many files or row groups."""
    if workers == 1:
        return [stream]
    wanted = workers * SEGMENTS_PER_WORKER
    try:
        dataset = _hub_stream(stream, scratch)
        reshard = dataset.num_shards < wanted
        count = min(wanted, (dataset.reshard() if reshard else dataset).num_shards)
    except Exception as exc:  # noqa: BLE001 -- a failed listing is one line, and nothing is cached
        raise _hub_failure(stream, exc, 0) from None
    return [dict(stream, reshard=reshard, shard=[index, count]) for index in range(count)]


def _segment_documents(segment: dict, scratch: str) -> Iterator[str]:
    if segment["kind"] == "text":
        for name in segment["files"]:
            yield "".join(iter_text(Path(name)))
    elif segment["kind"] == "parquet":
        parquet = _open_parquet(Path(segment["path"]), segment["column"])
        for batch in parquet.iter_batches(
            batch_size=STREAM_BATCH_ROWS, row_groups=range(*segment["row_groups"]), columns=[segment["column"]]
        ):
            yield from (text or "" for text in batch.column(0).to_pylist())
    else:
        column, documents = segment["column"], 0
        try:
            for batch in _hub_stream(segment, scratch).iter(batch_size=STREAM_BATCH_ROWS):
                if column not in batch:
                    raise CortexCraftError(
                        f"source {segment['spec']!r} has no column {column!r} (columns: {', '.join(batch)}); "
                        f"pass --text-column NAME"
                    )
                for text in batch[column]:
                    yield text or ""
                    documents += 1
        except CortexCraftError:
            raise
        except Exception as exc:  # noqa: BLE001 -- a broken stream is one line, and nothing is cached
            raise _hub_failure(segment, exc, documents) from None


def write_segment(segment: dict, separator: str, path: str) -> tuple[int, np.ndarray]:
    """Write one segment's documents to ``path``, joined by ``separator``; returns its character
    count and where each document starts (a worker's half of ``CorpusWriter.add_segment``)."""
    starts, chars = array("q"), 0
    joint = separator.encode("utf-8")
    with open(path, "wb") as handle:
        for document in _segment_documents(segment, path + ".datasets"):
            if starts:
                handle.write(joint)
                chars += len(separator)
            starts.append(chars)
            handle.write(document.encode("utf-8"))
            chars += len(document)
    shutil.rmtree(path + ".datasets", ignore_errors=True)
    return chars, np.frombuffer(starts, dtype=np.int64)


def _collect(writer: CorpusWriter, segments: list[dict], data_cfg: DataConfig, workers: int) -> None:
    """Every document of ``segments`` into ``writer``: by ``workers`` processes, one segment file
    each, unless a document limit is set (it needs the documents in order, one at a time)."""
    limited = data_cfg.max_docs is not None or data_cfg.max_bytes is not None
    if workers == 1 or len(segments) <= 1 or limited:
        for segment in segments:
            for document in _segment_documents(segment, writer.scratch):
                writer.add(document)
                if _limit_reached(writer, data_cfg):
                    return
        return
    log.info("collecting %d segments of %s with %d processes", len(segments), data_cfg.source, workers)
    paths = [str(writer.tmp / f"segment-{index:05d}.txt") for index in range(len(segments))]
    # spawn: the workers start clean (no inherited threads of pyarrow or datasets to deadlock on).
    pool = ProcessPoolExecutor(min(workers, len(segments)), mp_context=multiprocessing.get_context("spawn"))
    try:
        for path, (chars, starts) in zip(
            paths, pool.map(write_segment, segments, [writer.separator] * len(segments), paths)
        ):
            writer.add_segment(path, chars, starts)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# revisions


def revision_summary(revision: dict) -> dict:
    """What a manifest records of a revision: its id, what identifies it, how it was checked."""
    return {
        "id": revision_id(revision),
        "kind": revision["kind"],
        "checked_by": revision["checked_by"],
        **({"sha": revision["identity"]["sha"]} if revision["kind"] == "hub" else {}),
        **({k: v for k, v in revision["identity"].items() if k != "files"} if revision["kind"] == "http" else {}),
    }


def _info(spec: str, kind: str, revision: dict) -> dict:
    return {"spec": spec, "kind": kind, "revision": revision_summary(revision)}


def _shown(value: str) -> str:
    # Header values come from the server: reports and artifacts render this line as markdown, so
    # anything that is not plain text (backticks, pipes, brackets, HTML) is shown as "?".
    return re.sub(r"[^\w \"'./:+,=()-]", "?", str(value))[:200]


def describe_revision(revision: dict | None) -> str:
    """One line naming a revision (the hub sha, the ETag / Last-Modified, or the content hash),
    safe to put in markdown."""
    if not revision:
        return "unknown"
    if revision["kind"] == "hub":
        text = f"hub commit {_shown(revision['sha'][:12])}"
    elif revision["kind"] == "http":
        parts = [
            f"ETag {_shown(revision['etag'])}" if revision.get("etag") else None,
            f"Last-Modified {_shown(revision['last_modified'])}" if revision.get("last_modified") else None,
            f"{revision['content_length']:,} bytes" if revision.get("content_length") is not None else None,
            f"sha256 {revision['sha256'][:12]}" if revision.get("sha256") else None,
        ]
        text = ", ".join(p for p in parts if p)
    else:
        text = f"content {revision['id']}"
    return f"{text} ({_shown(revision['checked_by'])})"


def _checked(spec: str, check, state: Path) -> dict:
    """``check()``, or the revision seen last when no server answers (a warning says so)."""
    try:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if _env_true(name):
                raise SourceUnreachable(f"{name} is set")
        return check()
    except SourceUnreachable as exc:
        last = remembered(state)
        if last is None:
            raise
        log.warning("could not revalidate source %r (%s); using the revision seen last", spec, exc)
        return dict(last, checked_by=f"not revalidated: {exc}")


def source_revision(data_cfg: DataConfig, cache_dir: Path) -> dict:
    """The current revision of ``data_cfg.source``, found cheaply (see ``cortexcraft.freshness``):
    ``{"kind": "http"|"hub"|"local", "identity": {...}, "checked_by": "..."}``."""
    spec = data_cfg.source.strip()
    cache_dir = Path(cache_dir)
    if spec == "tinyshakespeare":
        return _tinyshakespeare_revision(cache_dir)
    if spec in HUB_ALIASES or spec.startswith("hf:"):
        repo, revision, _ = parse_hub_spec(spec) if spec.startswith("hf:") else (HUB_ALIASES[spec], None, "train")
        try:
            return _checked(
                spec,
                lambda: hub_revision(repo, revision, cache_dir),
                state_file(cache_dir, "hub", [repo, revision or "main"]),
            )
        except SourceUnreachable as exc:
            raise CortexCraftError(
                f"cannot reach the Hugging Face hub for source {spec!r} ({exc}); {local_copy_hint(spec)}"
            ) from None
    if spec.startswith(("http://", "https://")):
        try:
            return _checked(spec, lambda: http_revision(spec, cache_dir), state_file(cache_dir, "url", spec))
        except SourceUnreachable as exc:
            raise CortexCraftError(f"{exc}; {local_copy_hint(spec)}") from None
        except CortexCraftError as exc:
            raise CortexCraftError(f"{exc} or {local_copy_hint(spec)}") from None
    files = _local_files(spec)
    # A single file is used in place and leaves nothing in the cache (its state could land inside
    # an output directory); a directory or glob keeps its stat cache there.
    single = len(files) == 1 and Path(spec).expanduser().is_file()
    return local_revision(files, spec, None if single else cache_dir)


def _tinyshakespeare_revision(cache_dir: Path) -> dict:
    spec = "tinyshakespeare"
    hub_state = state_file(cache_dir, "hub", [TINYSHAKESPEARE_REPO, TINYSHAKESPEARE_REVISION])
    url_state = state_file(cache_dir, "url", TINYSHAKESPEARE_URL)
    try:
        return _checked(
            spec, lambda: hub_revision(TINYSHAKESPEARE_REPO, TINYSHAKESPEARE_REVISION, cache_dir), hub_state
        )
    except CortexCraftError as exc:
        hub_error = str(exc)
    try:
        return _checked(spec, lambda: http_revision(TINYSHAKESPEARE_URL, cache_dir), url_state)
    except CortexCraftError as exc:
        raise CortexCraftError(
            f"cannot reach the Hugging Face hub for source 'tinyshakespeare' ({hub_error}) nor its raw "
            f"file URL ({exc}); {local_copy_hint(spec)}"
        ) from None


def download(data_cfg: DataConfig, cache_dir: Path, revision: dict | None = None, workers: int = 1) -> dict:
    """Resolve ``data_cfg.source`` to a corpus manifest, downloading into ``cache_dir`` when needed.

    ``revision`` is what ``source_revision`` returned (checked now when None); the download is of
    that revision. The manifest (JSON-serialisable) holds ``path`` (the UTF-8 corpus), ``doc_starts``
    (``.npy`` of document start offsets, or None for one document), ``sha256``, ``bytes``,
    ``chars``, ``documents``, ``separator``, ``spec``, ``origin``, ``revision`` and ``fingerprint``
    (content hash). With ``workers`` > 1, a source of many documents (a directory, parquet files, a
    hub split) is collected by that many processes, into the same corpus."""
    spec = data_cfg.source.strip()
    single_document = (
        spec == "tinyshakespeare"
        or spec.startswith(("http://", "https://"))
        or (Path(spec).expanduser().is_file() and Path(spec).suffix != ".parquet")
    )
    if single_document and (data_cfg.max_docs is not None or data_cfg.max_bytes is not None):
        raise CortexCraftError(
            f"--max-docs/--max-bytes pick whole documents from hub, directory and glob sources, but {spec!r} "
            f"is one document; drop them or pass a directory of documents"
        )
    cache_dir = Path(cache_dir)
    revision = revision or source_revision(data_cfg, cache_dir)
    if spec == "tinyshakespeare":
        manifest = _download_tinyshakespeare(data_cfg, cache_dir, revision)
    elif spec in HUB_ALIASES:
        manifest = _download_hub(spec, HUB_ALIASES[spec], "train", data_cfg, cache_dir, revision, workers)
    elif spec.startswith("hf:"):
        repo, _, split = parse_hub_spec(spec)
        manifest = _download_hub(spec, repo, split, data_cfg, cache_dir, revision, workers)
    elif spec.startswith(("http://", "https://")):
        manifest = _download_url(data_cfg, cache_dir, revision)
    else:
        manifest = _download_local(data_cfg, cache_dir, revision, workers)
    # How this call found the revision (a cache entry keeps how the first download did).
    return dict(manifest, revision=revision_summary(revision))
