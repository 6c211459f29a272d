"""The ``cortexcraft`` command: prepare, train, generate, evaluate, verify, export, presets, models, serve.

Heavy imports (torch, datasets) happen inside the subcommands so ``--help`` is fast. The installed
``cortexcraft`` command is ``flows.cli``, which adds ``pipeline``; ``python -m cortexcraft`` (what
torchrun starts) runs the library's commands only.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

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


def add_config_options(parser: argparse.ArgumentParser, default_preset: str) -> None:
    parser.add_argument(
        "--preset", default=default_preset, help=f"named preset (default {default_preset}); see `cortexcraft presets`"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config value, e.g. --set n_layer=8 --set train.lr=1e-3",
    )


def _add_launch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nnodes", type=int, default=1, help="machines training together (each runs this command)")
    parser.add_argument(
        "--node-rank", type=int, default=0, help="this machine's number, 0 on the one at --rdzv-endpoint"
    )
    parser.add_argument(
        "--rdzv-endpoint", metavar="HOST:PORT", help="node 0's address and a free port (c10d rendezvous)"
    )


def add_parts_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes collecting the source, and encoding it in parts where that is faster than one "
        "(char corpora from 80 MB per worker, in the pipeline from 1.5 GB; BPE encodes on every core in one "
        "process); same output for any number",
    )
    parser.add_argument(
        "--part-mb",
        type=float,
        default=None,
        help="size of a part in MB (pipeline: 64; prepare: 64, or less so each worker gets 8 parts); "
        "given, every worker encodes parts, even where one process would be faster",
    )


def build_parser(extra_commands: Iterable[Callable[[Any], None]] = ()) -> argparse.ArgumentParser:
    """The library's commands, plus those that each of ``extra_commands`` adds to the subparsers."""
    parser = argparse.ArgumentParser(prog="cortexcraft", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug", action="store_true", help="on an error, also show its traceback and Prefect's own failure logs"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="download a corpus, build vocab.txt and write train/val token shards")
    _add_data_options(p)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--cache-dir", type=Path, help="download cache (default: DATA_DIR/downloads)")
    add_parts_options(p)
    p.add_argument(
        "--init-from",
        metavar="hf:DIR|hf:OWNER/NAME",
        help="tokenize with this pretrained model's tokenizer (to fine-tune it: train --set init_from=...)",
    )

    p = sub.add_parser("train", help="train a GPT on prepared shards")
    p.add_argument("--data", required=True, type=Path, help="directory written by `cortexcraft prepare`")
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, metrics)")
    add_config_options(p, "cpu")
    p.add_argument("--max-iters", type=int)
    p.add_argument("--max-minutes", type=float, help="wall-clock budget; ends with a checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument(
        "--start-from",
        metavar="CHECKPOINT_DIR",
        help="start a new run from this checkpoint's weights and step, with an lr segment of its own up to --max-iters",
    )
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
    p.add_argument(
        "--out", required=True, type=Path, help="directory to write (replaced if it holds an earlier export)"
    )

    p = sub.add_parser("presets", help="list presets with their parameter counts")
    p.add_argument("--show", metavar="NAME", help="print one preset's full config as JSON")
    p.add_argument("--fields", action="store_true", help="list every setting --set accepts")

    p = sub.add_parser("models", help="the model registry: list, show, promote, rollback versions")
    p.add_argument("--data-dir", type=Path, help="data directory holding models/ (default ./data)")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("list", help="one row per version of NAME (every model without NAME)")
    a.add_argument("ref", nargs="?", metavar="NAME")
    a = actions.add_parser("show", help="the record of NAME@vN (default NAME@champion) as JSON")
    a.add_argument("ref", metavar="NAME[@vN|@champion]")
    a = actions.add_parser("promote", help="make NAME@vN the champion")
    a.add_argument("ref", metavar="NAME@vN")
    a = actions.add_parser(
        "rollback", help="make the previous champion of NAME (or the earlier champion NAME@vN) the champion again"
    )
    a.add_argument("ref", metavar="NAME[@vN]")
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible), following its champion")
    _add_model_choice(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (any other than loopback needs CORTEXCRAFT_API_KEY)"
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, logged at start)")
    p.add_argument("--max-batch", type=int, default=16, help="completions generated together in one batch")
    p.add_argument("--max-queue", type=int, default=64, help="completions waiting for the batch; more are answered 429")
    p.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument(
        "--grace-seconds", type=float, default=30.0, help="on SIGTERM, how long requests in flight may finish"
    )
    p.add_argument("--poll-seconds", type=float, default=0.5, help="how often champion.json is read (NAME@champion)")
    p.add_argument(
        "--stream-interval",
        type=float,
        default=0.02,
        help="seconds between streamed pieces of one answer (the first is sent at once; 0: every token)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS, else the cores but one)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="do not log every request")
    for add_command in extra_commands:
        add_command(sub)
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
    log.info(
        "model %s is %s %s (step %d, val %.4f)",
        args.model,
        record["name"],
        record["version"],
        record["step"],
        record["val_loss"],
    )
    return path, "best"


def _cmd_prepare(args: argparse.Namespace) -> int:
    from cortexcraft.prepare import prepare

    cache_dir = args.cache_dir or default_data_dir() / "downloads"
    manifest = prepare(
        _data_config_from_args(args),
        args.out,
        cache_dir=cache_dir,
        workers=args.workers,
        part_bytes=int(args.part_mb * 1e6) if args.part_mb else None,
        init_from=args.init_from,
    )
    splits = ", ".join(f"{name} {info['tokens']:,} tokens" for name, info in manifest["splits"].items())
    print(f"wrote {args.out}: vocab_size {manifest['vocab_size']}, {splits}", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from cortexcraft.checkpoint import latest_checkpoint
    from cortexcraft.config import build_config
    from cortexcraft.distributed import torchrun_command
    from cortexcraft.interrupt import exit_with_parent_if_asked
    from cortexcraft.train import train

    exit_with_parent_if_asked()
    if (args.nproc_per_node > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ:
        # Not yet under torchrun: start it with this same command (minus the launch options).
        build_config(args.preset, args.overrides)  # a bad config fails here, not once per process
        train_args = [
            "--data",
            str(args.data),
            "--out",
            str(args.out),
            "--preset",
            args.preset,
            *[f"--set={item}" for item in args.overrides],
            *([f"--max-iters={args.max_iters}"] if args.max_iters is not None else []),
            *([f"--max-minutes={args.max_minutes}"] if args.max_minutes is not None else []),
            *(["--resume"] if args.resume else []),
            *(["--start-from", args.start_from] if args.start_from else []),
        ]
        command = torchrun_command(
            train_args,
            args.nproc_per_node,
            args.nnodes,
            args.node_rank,
            args.rdzv_endpoint,
            rdzv_id=Path(args.out).name,
        )
        # torchrun takes this process's place: it gets the signals sent to it and keeps its
        # parent-death signal, and stops its trainers at a checkpoint either way.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)

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
    print(
        f"best val loss {summary['best_val_loss']:.4f} at step {summary['best_step']}; "
        f"{summary['tokens_seen']:,} tokens in {summary['wall_seconds']:.1f} s",
        file=sys.stderr,
    )
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from cortexcraft.generate import generate_from_run

    streaming = sys.stdout.isatty()

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    run_dir, checkpoint = _run_dir_of(args)
    text = generate_from_run(
        run_dir,
        checkpoint=checkpoint,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        kv_cache=args.kv_cache,
        on_text=write if streaming else None,
    )
    if not streaming:
        sys.stdout.write(text)
    sys.stdout.write("\n")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cortexcraft.evaluate import evaluate_run

    run_dir, checkpoint = _run_dir_of(args)
    result = evaluate_run(run_dir, args.data, checkpoint=checkpoint, batches=args.batches)
    # BPE tokens span several characters, so only bits per token can be reported for them.
    bits = (
        f"bits/char {result['bits_per_char']:.4f}"
        if result["bits_per_char"] is not None
        else f"bits/token {result['bits_per_token']:.4f} (BPE)"
    )
    print(
        f"val loss {result['val_loss']:.4f}  {bits}  ({result['tokens']:,} tokens, checkpoint {result['checkpoint']})"
    )
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
        print(
            f"{args.dir}: run directory OK, {len(checked)} checkpoints (steps "
            f"{', '.join(str(state['step']) for _, state in checked)}) match their sha256"
        )
    else:
        raise CortexCraftError(
            f"{args.dir} is neither a shard directory (no {MANIFEST}) nor a run directory "
            f"(no checkpoints/); pass one of them"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cortexcraft.export import export_run

    run_dir, checkpoint = _run_dir_of(args)
    record = export_run(run_dir, args.out, checkpoint=checkpoint)
    print(
        f"wrote {args.out}: {record['architecture']} from step {record['step']:,} ({record['checkpoint']})",
        file=sys.stderr,
    )
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
        print(
            f"{name:<18} {params:>12,}  {m.n_layer:>6} {m.n_head:>5} {m.n_embd:>6} {m.block_size:>5}  "
            f"{preset_description(name)}"
        )
    return 0


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
        print(
            f"  {'version':<8} {'created':<25} {'policy':<9} {'steps':>7} {'val loss':>9} {'bits/char':>9}  "
            f"{'data':<12}  decision"
        )
        for row in registry.history_rows(models_dir, name):
            bits = f"{row['bits_per_char']:.4f}" if row["bits_per_char"] is not None else "-"
            print(
                f"{'*' if row['champion'] else ' '} {row['version']:<8} {row['created']:<25} {row['policy']:<9} "
                f"{row['steps']:>7,} {row['val_loss']:>9.4f} {bits:>9}  {row['data']:<12}  {row['decision'] or '-'}"
            )
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

    return serve(
        model=args.model,
        run=args.run,
        checkpoint=args.checkpoint,
        data_dir=args.data_dir or default_data_dir(),
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_tokens_cap=args.max_tokens_cap,
        grace_seconds=args.grace_seconds,
        poll_seconds=args.poll_seconds,
        stream_interval=args.stream_interval,
        threads=args.threads,
        access_log=args.access_log,
    )


COMMANDS = {
    "prepare": _cmd_prepare,
    "train": _cmd_train,
    "generate": _cmd_generate,
    "evaluate": _cmd_evaluate,
    "verify": _cmd_verify,
    "export": _cmd_export,
    "presets": _cmd_presets,
    "models": _cmd_models,
    "serve": _cmd_serve,
}


def main(
    argv: list[str] | None = None,
    extra_commands: dict[str, tuple[Callable[[Any], None], Callable[..., int]]] = {},
    console_filter: logging.Filter | None = None,
) -> int:
    """Run one command. ``extra_commands`` (name -> (add its parser, run it)) extends the library's
    commands, as ``flows.cli`` adds ``pipeline``; ``console_filter`` goes on the console log
    handlers unless --debug."""
    args = build_parser([add for add, _ in extra_commands.values()]).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if console_filter is not None and not args.debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(console_filter)
    commands = {**COMMANDS, **{name: run for name, (_, run) in extra_commands.items()}}
    try:
        return commands[args.command](args)
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
