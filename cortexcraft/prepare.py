"""``cortexcraft prepare``: download + vocabulary + shards into one directory."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from cortexcraft.config import DataConfig
from cortexcraft.fileio import TempDir
from cortexcraft.errors import CortexCraftError
from cortexcraft.parts import prepare_parts, workers_that_pay
from cortexcraft.shards import check_out_dir, write_shards
from cortexcraft.sources import download
from cortexcraft.threads import threads_per_worker
from cortexcraft.tokenizer import build_vocab, check_tokenizer_config

log = logging.getLogger(__name__)


def prepare(data_cfg: DataConfig, out_dir: Path, cache_dir: Path | None = None, workers: int = 1,
            part_bytes: int | None = None, init_from: str | None = None) -> dict:
    """Write ``out_dir`` (tokenizer file, ``manifest.json``, train/val shards); returns the manifest.

    Downloads are cached in ``cache_dir`` (default: ``downloads/`` beside ``out_dir``). With
    ``workers`` > 1 that many processes collect a source of many documents (by file, parquet row
    groups or hub shards), then count and encode the corpus in parts of about ``part_bytes`` (by
    default small enough to keep every worker busy to the end); the output is byte-identical.
    Without ``part_bytes``, only the workers that pay off encode (``workers_that_pay``): a BPE
    corpus, or a small char one, is encoded in one process. With ``init_from`` (``hf:...``) the
    shards use that pretrained model's tokenizer (in one process)."""
    if workers < 1:
        raise CortexCraftError(f"--workers {workers} must be at least 1")
    if init_from and workers > 1:
        raise CortexCraftError(
            f"--init-from with --workers {workers}: a pretrained tokenizer is applied in one "
            f"process only; drop --workers"
        )
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir.parent / "downloads"
    check_out_dir(out_dir)
    pretrained = None
    if init_from:
        from cortexcraft.pretrained import pretrained_tokenizer

        pretrained = pretrained_tokenizer(init_from)  # fails now, not after the download, when it cannot load
    else:
        check_tokenizer_config(data_cfg)
    corpus = download(data_cfg, cache_dir, workers=workers)
    log.info(
        "corpus %s: %s chars, %s documents (%s)",
        corpus["spec"],
        f"{corpus['chars']:,}",
        f"{corpus['documents']:,}",
        corpus["origin"],
    )
    vocab_dir = TempDir(out_dir.parent, out_dir.name, kind="vocab")
    try:
        encoders = workers if part_bytes is not None else workers_that_pay(corpus["bytes"], data_cfg.tokenizer, workers)
        if encoders < workers:
            log.info(
                "encoding with %d of %d workers: on %s MB of %s text more would not finish sooner",
                encoders, workers, f"{corpus['bytes'] / 1e6:,.0f}", data_cfg.tokenizer,
            )
        if encoders > 1:
            return prepare_parts(
                corpus, data_cfg, vocab_dir.path, vocab_dir.path / "parts", out_dir, encoders, part_bytes,
                encode_threads=threads_per_worker(encoders),
            )
        vocab = build_vocab(corpus, data_cfg, vocab_dir.path, tokenizer=pretrained)
        log.info("vocabulary: %s", vocab["preview"])
        return write_shards(corpus, vocab, data_cfg, out_dir)
    finally:
        shutil.rmtree(vocab_dir.path, ignore_errors=True)
        vocab_dir.close()
