"""The ``cortexcraft`` command: prepare, train, generate, evaluate, verify, export, presets, pipeline, models.

Heavy imports (torch, datasets, prefect) happen inside the subcommands so ``--help`` is fast.
Only ``pipeline`` touches Prefect, and only by importing the ``flows`` package.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

from cortexcraft.errors import CortexCraftError
from cortexcraft.interrupt import Interrupted

log = logging.getLogger("cortexcraft")


def default_data_dir() -> Path:
    return Path(os.environ.get("CORTEXCRAFT_DATA_DIR", "data"))


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="tinyshakespeare (default) | openwebtext | openwebtext-10k | "
                        "hf:REPO[@REV][:SPLIT] | a local file, directory or glob | an http(s) URL")
    parser.add_argument("--tokenizer", choices=["char", "bpe"])
    parser.add_argument("--vocab-size", type=int, help="BPE vocabulary size")
    parser.add_argument("--vocab", dest="vocab_file", help="use this vocab.txt instead of extracting one")
    parser.add_argument("--tokenizer-file", help="use this Hugging Face tokenizer.json (e.g. GPT-2's) as the BPE "
                        "tokenizer instead of training one (implies --tokenizer bpe)")
    parser.add_argument("--allow-unk", action="store_true", default=None,
                        help="map characters outside --vocab to <unk> instead of failing")
    parser.add_argument("--special-tokens", nargs="*", help="extra tokens, e.g. <pad> <unk> <bos> <eos>")
    parser.add_argument("--val-fraction", type=float)
    parser.add_argument("--max-docs", type=int)
    parser.add_argument("--max-bytes", type=int)
    parser.add_argument("--shard-tokens", type=int)
    parser.add_argument("--text-column")
    parser.add_argument("--separator", help="document separator (default: blank line, or <|endoftext|> for BPE)")


def _data_config_from_args(args: argparse.Namespace):
    from cortexcraft.config import DataConfig, validate_config

    fields = {name: getattr(args, name) for name in DataConfig.model_fields if getattr(args, name, None) is not None}
    if "tokenizer_file" in fields:
        fields.setdefault("tokenizer", "bpe")
    return validate_config({"data": fields}).data


def _add_config_options(parser: argparse.ArgumentParser, default_preset: str) -> None:
    parser.add_argument("--preset", default=default_preset, help=f"named preset (default {default_preset}); see `cortexcraft presets`")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config value, e.g. --set n_layer=8 --set train.lr=1e-3")


def _add_launch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nnodes", type=int, default=1, help="machines training together (each runs this command)")
    parser.add_argument("--node-rank", type=int, default=0, help="this machine's number, 0 on the one at --rdzv-endpoint")
    parser.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="node 0's address and a free port (c10d rendezvous)")


def _add_parts_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1,
                        help="processes counting and encoding the corpus in parts (same output for any number)")
    parser.add_argument("--part-mb", type=float, default=None,
                        help="size of a part in MB (pipeline: 64; prepare: 64, or less so each worker gets 8 parts)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cortexcraft", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, also show its traceback and Prefect's own failure logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="download a corpus, build vocab.txt and write train/val token shards")
    _add_data_options(p)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--cache-dir", type=Path, help="download cache (default: DATA_DIR/downloads)")
    _add_parts_options(p)
    p.add_argument("--init-from", metavar="hf:DIR|hf:OWNER/NAME",
                   help="tokenize with this pretrained model's tokenizer (to fine-tune it: train --set init_from=...)")

    p = sub.add_parser("train", help="train a GPT on prepared shards")
    p.add_argument("--data", required=True, type=Path, help="directory written by `cortexcraft prepare`")
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, metrics)")
    _add_config_options(p, "cpu")
    p.add_argument("--max-iters", type=int)
    p.add_argument("--max-minutes", type=float, help="wall-clock budget; ends with a checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--start-from", metavar="CHECKPOINT_DIR",
                   help="start a new run from this checkpoint's weights and step, with an lr segment of its own up to --max-iters")
    p.add_argument("--nproc-per-node", type=int, default=1, help="training processes on this machine (torchrun)")
    _add_launch_options(p)

    p = sub.add_parser("generate", help="sample text from a trained run (text to stdout, logs to stderr)")
    _add_model_choice(p)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-kv-cache", dest="kv_cache", action="store_false")

    p = sub.add_parser("evaluate", help="val loss and bits per character of a checkpoint")
    _add_model_choice(p)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--batches", type=int, help="evaluate on this many random batches instead of the whole split")

    p = sub.add_parser("verify", help="check every sha256 of a shard directory or a run directory's checkpoints")
    p.add_argument("dir", type=Path, help="a directory written by `cortexcraft prepare` or `cortexcraft train`")

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face transformers model directory")
    _add_model_choice(p)
    p.add_argument("--format", choices=["hf"], default="hf", help="hf: transformers model, tokenizer and model card")
    p.add_argument("--out", required=True, type=Path, help="directory to write (replaced if it holds an earlier export)")

    p = sub.add_parser("presets", help="list presets with their parameter counts")
    p.add_argument("--show", metavar="NAME", help="print one preset's full config as JSON")
    p.add_argument("--fields", action="store_true", help="list every setting --set accepts")

    p = sub.add_parser("pipeline", help="run the full Prefect pipeline in-process")
    _add_config_options(p, "cpu")
    p.add_argument("--source", help="corpus spec, as for prepare (default: the preset's)")
    p.add_argument("--data-dir", type=Path, help="where stage outputs and the cache live (default ./data)")
    p.add_argument("--refresh", nargs="+", default=[], metavar="STAGE",
                   help="force these stages to re-run: download vocab shards train report, or all")
    p.add_argument("--model", help="register the trained model under this name in DATA_DIR/models (default: the preset's name)")
    p.add_argument("--retrain", choices=["fresh", "continue", "finetune", "auto"],
                   help="fresh (default): from scratch; continue/finetune: from the champion's weights for "
                        "--retrain-iters more steps; auto: continue on unchanged data, finetune on changed data")
    p.add_argument("--retrain-iters", type=int, metavar="N", help="steps continue/finetune train beyond the champion (default 500)")
    p.add_argument("--promote-margin", type=float, metavar="NATS",
                   help="promote a challenger only when its val loss beats the champion's by more than this (default 0)")
    p.add_argument("--nproc", type=int, default=1, help="training processes; > 1 trains under torchrun")
    p.add_argument("--nnodes", type=int, default=1, help="machines training together; this is node 0 (the log says what to run on the others)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="this machine's address and a free port, for the other nodes")
    _add_parts_options(p)
    p.add_argument("--task-runner", choices=["process", "dask"], default="process",
                   help="what runs the part tasks: local processes (default) or a Dask cluster")
    p.add_argument("--dask-address", metavar="tcp://HOST:PORT", help="an existing Dask scheduler (implies --task-runner dask)")

    p = sub.add_parser("models", help="the model registry: list, show, promote, rollback versions")
    p.add_argument("--data-dir", type=Path, help="data directory holding models/ (default ./data)")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("list", help="one row per version of NAME (every model without NAME)")
    a.add_argument("ref", nargs="?", metavar="NAME")
    a = actions.add_parser("show", help="the record of NAME@vN (default NAME@champion) as JSON")
    a.add_argument("ref", metavar="NAME[@vN|@champion]")
    a = actions.add_parser("promote", help="make NAME@vN the champion")
    a.add_argument("ref", metavar="NAME@vN")
    a = actions.add_parser("rollback", help="make the previous champion of NAME (or the earlier champion NAME@vN) the champion again")
    a.add_argument("ref", metavar="NAME[@vN]")
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible), following its champion")
    _add_model_choice(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (any other than loopback needs CORTEXCRAFT_API_KEY)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, logged at start)")
    p.add_argument("--max-batch", type=int, default=16, help="completions generated together in one batch")
    p.add_argument("--max-queue", type=int, default=64, help="completions waiting for the batch; more are answered 429")
    p.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--grace-seconds", type=float, default=30.0,
                   help="on SIGTERM, how long requests in flight may finish")
    p.add_argument("--poll-seconds", type=float, default=0.5, help="how often champion.json is read (NAME@champion)")
    p.add_argument("--stream-interval", type=float, default=0.02, help="seconds between streamed pieces of one answer "
                   "(the first is sent at once; 0: every token)")
    p.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS, else the cores but one)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="do not log every request")
    for command in sub.choices.values():  # also accepted after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _add_model_choice(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", type=Path, help="a run directory")
    which.add_argument("--model", metavar="NAME[@champion|@vN]", help="a registered model (default @champion)")
    parser.add_argument("--checkpoint", default="best", help="best | last | PATH (with --run)")
    parser.add_argument("--data-dir", type=Path, help="data directory holding models/ (with --model; default ./data)")


def _run_dir_of(args: argparse.Namespace) -> tuple[Path, str]:
    """(run directory, checkpoint) chosen by --run/--checkpoint or --model."""
    if args.model is None:
        return args.run, args.checkpoint
    from cortexcraft.registry import models_dir_of, resolve

    path, record = resolve(models_dir_of(args.data_dir or default_data_dir()), args.model)
    log.info("model %s is %s %s (step %d, val %.4f)", args.model, record["name"], record["version"],
             record["step"], record["val_loss"])
    return path, "best"


def _cmd_prepare(args: argparse.Namespace) -> int:
    from cortexcraft.prepare import prepare

    cache_dir = args.cache_dir or default_data_dir() / "downloads"
    manifest = prepare(_data_config_from_args(args), args.out, cache_dir=cache_dir, workers=args.workers,
                       part_bytes=int(args.part_mb * 1e6) if args.part_mb else None, init_from=args.init_from)
    splits = ", ".join(f"{name} {info['tokens']:,} tokens" for name, info in manifest["splits"].items())
    print(f"wrote {args.out}: vocab_size {manifest['vocab_size']}, {splits}", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from cortexcraft.checkpoint import latest_checkpoint
    from cortexcraft.config import build_config
    from cortexcraft.train import torchrun_command, train

    if (args.nproc_per_node > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ:
        # Not yet under torchrun: start it with this same command (minus the launch options).
        build_config(args.preset, args.overrides)  # a bad config fails here, not once per process
        train_args = ["--data", str(args.data), "--out", str(args.out), "--preset", args.preset,
                      *[f"--set={item}" for item in args.overrides],
                      *([f"--max-iters={args.max_iters}"] if args.max_iters is not None else []),
                      *([f"--max-minutes={args.max_minutes}"] if args.max_minutes is not None else []),
                      *(["--resume"] if args.resume else []),
                      *(["--start-from", args.start_from] if args.start_from else [])]
        command = torchrun_command(train_args, args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint,
                                   rdzv_id=Path(args.out).name)
        return subprocess.call(command)

    overrides = list(args.overrides)
    if args.max_iters is not None:
        overrides.append(f"train.max_iters={args.max_iters}")
    if args.max_minutes is not None:
        overrides.append(f"train.max_minutes={args.max_minutes}")
    config = build_config(args.preset, overrides)
    # Re-running into an existing run dir always continues it; --resume only insists that it can.
    if args.resume and latest_checkpoint(args.out) is None:
        raise CortexCraftError(f"--resume: no valid checkpoint in {args.out}; drop --resume to start a new run there")
    summary = train(config, args.data, args.out, resume=True, start_from=args.start_from)
    print(f"best val loss {summary['best_val_loss']:.4f} at step {summary['best_step']}; "
          f"{summary['tokens_seen']:,} tokens in {summary['wall_seconds']:.1f} s", file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from cortexcraft.generate import generate_from_run

    streaming = sys.stdout.isatty()

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    run_dir, checkpoint = _run_dir_of(args)
    text = generate_from_run(
        run_dir, checkpoint=checkpoint, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        kv_cache=args.kv_cache, on_text=write if streaming else None,
    )
    if not streaming:
        sys.stdout.write(text)
    sys.stdout.write("\n")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cortexcraft.train import evaluate_run

    run_dir, checkpoint = _run_dir_of(args)
    result = evaluate_run(run_dir, args.data, checkpoint=checkpoint, batches=args.batches)
    # BPE tokens span several characters, so only bits per token can be reported for them.
    bits = f"bits/char {result['bits_per_char']:.4f}" if result["bits_per_char"] is not None else \
        f"bits/token {result['bits_per_token']:.4f} (BPE)"
    print(f"val loss {result['val_loss']:.4f}  {bits}  ({result['tokens']:,} tokens, checkpoint {result['checkpoint']})")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from cortexcraft.checkpoint import checkpoints_dir, verify_run
    from cortexcraft.shards import MANIFEST, verify_shards

    if (args.dir / MANIFEST).is_file():
        manifest = verify_shards(args.dir, check_hashes=True)
        files = [f for split in manifest["splits"].values() for f in split["files"]]
        print(f"{args.dir}: shard directory OK, the tokenizer and {len(files)} shard files match their sha256")
    elif checkpoints_dir(args.dir).is_dir():
        checked = verify_run(args.dir)
        print(f"{args.dir}: run directory OK, {len(checked)} checkpoints (steps "
              f"{', '.join(str(state['step']) for _, state in checked)}) match their sha256")
    else:
        raise CortexCraftError(f"{args.dir} is neither a shard directory (no {MANIFEST}) nor a run directory "
                               f"(no checkpoints/); pass one of them")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cortexcraft.hf import export_run

    run_dir, checkpoint = _run_dir_of(args)
    record = export_run(run_dir, args.out, checkpoint=checkpoint)
    print(f"wrote {args.out}: {record['architecture']} from step {record['step']:,} ({record['checkpoint']})", file=sys.stderr)
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    import json

    from cortexcraft.config import RunConfig, build_config, preset_description, preset_names, SECTIONS

    if args.fields:
        for section in SECTIONS:
            for name, field in RunConfig.model_fields[section].annotation.model_fields.items():
                print(f"{section}.{name:<20} {field.description or ''}".rstrip())
        return 0
    if args.show:
        print(json.dumps(build_config(args.show).model_dump(mode="json"), indent=2))
        return 0
    from cortexcraft.model import parameter_count
    from cortexcraft.tokenizer import preset_vocab_size

    print(f"{'preset':<18} {'params':>12}  {'layers':>6} {'heads':>5} {'n_embd':>6} {'block':>5}  description")
    for name in preset_names():
        config = build_config(name)
        m = config.model
        params = parameter_count(m, preset_vocab_size(config.data))
        print(f"{name:<18} {params:>12,}  {m.n_layer:>6} {m.n_head:>5} {m.n_embd:>6} {m.block_size:>5}  {preset_description(name)}")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from flows.pipeline import run_pipeline_from_cli

    return run_pipeline_from_cli(
        preset=args.preset, overrides=args.overrides, source=args.source,
        data_dir=args.data_dir or default_data_dir(), refresh=args.refresh, nproc=args.nproc,
        model=args.model, retrain=args.retrain, retrain_iters=args.retrain_iters, promote_margin=args.promote_margin,
        workers=args.workers, task_runner=args.task_runner, dask_address=args.dask_address, part_mb=args.part_mb,
        nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint,
    )


def _cmd_models(args: argparse.Namespace) -> int:
    import json

    from cortexcraft import registry

    models_dir = registry.models_dir_of(args.data_dir or default_data_dir())
    if args.action == "list" and args.ref is None:
        for name in registry.list_models(models_dir):
            champion = registry.read_champion(models_dir, name)
            versions = registry.list_versions(models_dir, name)
            print(f"{name:<24} {len(versions):>3} versions  champion {champion['version'] if champion else '-'}")
        return 0
    if args.action == "list":
        name, _ = registry.parse_ref(args.ref)
        registry.require_model(models_dir, name)
        print(f"  {'version':<8} {'created':<25} {'policy':<9} {'steps':>7} {'val loss':>9} {'bits/char':>9}  {'data':<12}  decision")
        for row in registry.history_rows(models_dir, name):
            bits = f"{row['bits_per_char']:.4f}" if row["bits_per_char"] is not None else "-"
            print(f"{'*' if row['champion'] else ' '} {row['version']:<8} {row['created']:<25} {row['policy']:<9} "
                  f"{row['steps']:>7,} {row['val_loss']:>9.4f} {bits:>9}  {row['data']:<12}  {row['decision'] or '-'}")
        return 0
    if args.action == "show":
        path, record = registry.resolve(models_dir, args.ref)
        print(json.dumps(dict(record, directory=str(path)), indent=2))
        return 0
    pointer = (registry.promote if args.action == "promote" else registry.rollback)(models_dir, args.ref)
    print(f"champion of {registry.parse_ref(args.ref)[0]} is now {pointer['version']} ({pointer['reason']})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from cortexcraft.server import serve

    return serve(model=args.model, run=args.run, checkpoint=args.checkpoint,
                 data_dir=args.data_dir or default_data_dir(), host=args.host, port=args.port,
                 max_batch=args.max_batch, max_queue=args.max_queue, max_tokens_cap=args.max_tokens_cap,
                 grace_seconds=args.grace_seconds, poll_seconds=args.poll_seconds,
                 stream_interval=args.stream_interval, threads=args.threads, access_log=args.access_log)


def _user_error_names() -> set[str]:
    names, todo = set(), [CortexCraftError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class HidePrefectReportsOfUserErrors(logging.Filter):
    """Drops Prefect's own console reports of a task or flow run that failed with a
    CortexCraftError (a traceback and two "Finished in state Failed" lines): the CLI prints that
    error as one line. Installed on console handlers only, so the API still gets the full logs."""

    _STATE = re.compile(r"(?:encountered an exception|during execution):? (\w+)\b")

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        if record.exc_info and isinstance(record.exc_info[1], CortexCraftError):
            return False
        match = self._STATE.search(record.getMessage())
        return not (match and match.group(1) in _user_error_names())


COMMANDS = {
    "prepare": _cmd_prepare, "train": _cmd_train, "generate": _cmd_generate,
    "evaluate": _cmd_evaluate, "verify": _cmd_verify, "export": _cmd_export, "presets": _cmd_presets,
    "pipeline": _cmd_pipeline, "models": _cmd_models,
    "serve": _cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(HidePrefectReportsOfUserErrors())
    try:
        return COMMANDS[args.command](args)
    except CortexCraftError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"cortexcraft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"cortexcraft {args.command}: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"cortexcraft {args.command}: interrupted", file=sys.stderr)
        return 130
