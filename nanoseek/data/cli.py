"""Subcommands of the data pipeline: `nanoseek data build|tokenize|inspect|tasks`, `nanoseek tokenizer train`.

Thin wrappers over build.build_corpus, tokenizer.train_tokenizer, shards.tokenize_corpus and
(for `data tasks`, which mines verified code tasks and runs mined code in the sandbox)
nanoseek.eval.verify.mine_tasks;
see docs/data.md for the full walk-through. Each command prints where its output went and
returns 0, or prints a one-line error and returns 1 / 2 (bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys

from nanoseek._argparse import int_at_least, number_in, show_defaults


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _cmd_build(args: argparse.Namespace) -> int:
    from nanoseek.data.build import build_corpus

    langs = [s.strip() for s in args.languages.split(",") if s.strip()] if args.languages else None
    try:
        m = build_corpus(
            args.out, args.source or ["default"], workers=args.workers, force=args.force, progress=not args.quiet,
            languages=langs, license_policy=args.license_policy, max_mb=args.max_mb, min_bytes=args.min_bytes,
            max_bytes=int(args.max_kb * 1024), near_dedup=not args.no_near_dedup,
            near_dup_threshold=args.near_dup_threshold, decontaminate=not args.no_decontaminate,
            decontam_extra=args.decontam_extra or [], val_fraction=args.val_fraction, seed=args.seed)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        return _err(str(e))
    c = m["counts"]
    print(f"corpus: {args.out}  kept {c['kept_files']:,} of {c['files_seen']:,} files "
          f"({c['kept_bytes'] / 1e6:,.1f} of {c['bytes_read'] / 1e6:,.1f} MB), "
          f"{m['timing']['mb_per_s']} MB/s; see {args.out}/summary.md")
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from nanoseek.data.shards import tokenize_corpus

    try:
        idx = tokenize_corpus(args.corpus, args.tokenizer, args.out, workers=args.workers, chunk_mb=args.chunk_mb,
                              force=args.force, progress=not args.quiet)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        return _err(str(e))
    s = idx["splits"]
    print(f"shards: {args.out}  train {s['train']['tokens']:,} tokens / {s['train']['docs']:,} docs, "
          f"val {s['val']['tokens']:,} tokens / {s['val']['docs']:,} docs ({idx['dtype']}, "
          f"{idx['bytes_per_token']} bytes/token)")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from nanoseek.data.shards import ShardSet, load_index

    try:
        idx = load_index(args.shards)
        shards = ShardSet(args.shards, args.split)
    except (FileNotFoundError, ValueError) as e:
        return _err(str(e))
    print(json.dumps({k: idx[k] for k in ("dtype", "vocab_size", "splits", "bytes_per_token")}, indent=2))
    if args.tokenizer and len(shards):
        from nanoseek.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        for i in range(min(args.show, len(shards))):
            text = tok.decode(shards.doc(i))
            print(f"--- {args.split} document {i} ({shards.doc(i).size} tokens) ---")
            print(text[: args.chars] + ("..." if len(text) > args.chars else ""))
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    # A command module may use any layer: candidate extraction lives in nanoseek.data.tasks,
    # running mined code (only ever in the sandbox) in nanoseek.eval.verify.
    from nanoseek.eval.sandbox import IsolationUnavailable
    from nanoseek.eval.verify import mine_tasks, output_paths

    try:
        m = mine_tasks(args.source or ["default"], args.out, sft_out=args.sft_out, seed=args.seed,
                       max_tasks=args.max_tasks, held_out_fraction=args.held_out_fraction, workers=args.workers,
                       progress=not args.quiet, license_policy=args.license_policy,
                       decontaminate=not args.no_decontaminate, isolation=args.isolation, force=args.force)
    except (FileNotFoundError, ValueError, IsolationUnavailable, RuntimeError, OSError) as e:
        return _err(str(e))
    c, paths = m["counts"], output_paths(args.out)
    print(f"tasks: {paths['train']} ({c['train']:,} train) + {paths['heldout']} ({c['heldout']:,} held-out)"
          + (f", SFT: {args.sft_out} ({c['sft_examples']:,} conversations)" if args.sft_out else "")
          + f"; kept {c['verified']:,} of {c['functions_seen']:,} documented functions "
          f"({c['candidates']:,} candidates) in {m['timing']['total_s']:.0f} s; see {paths['manifest']}")
    return 0


def _cmd_tok_train(args: argparse.Namespace) -> int:
    from nanoseek.data.tokenizer import train_tokenizer

    try:
        meta = train_tokenizer(args.corpus, args.vocab_size, args.out, pretokenizer=args.pretokenizer,
                               max_train_mb=args.max_train_mb or None, min_frequency=args.min_frequency,
                               force=args.force, progress=not args.quiet)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        return _err(str(e))
    val = meta.get("val", {})
    print(f"tokenizer: {args.out}  vocab {meta['vocab_size']:,}, trained on {meta['trained_on']['bytes'] / 1e6:,.1f} MB"
          + (f", {val['bytes_per_token']} bytes/token on val" if val else ""))
    return 0


def add_subcommands(subparsers) -> None:
    data = subparsers.add_parser("data", help="build the code corpus and token shards",
                                 description="Code-data pipeline (docs/data.md).")
    dsub = data.add_subparsers(dest="data_command", metavar="STEP")
    data.set_defaults(func=lambda a: (data.print_help(), 2)[1])
    _add_build(dsub)
    _add_tokenize(dsub)
    _add_inspect(dsub)
    _add_tasks(dsub)
    tok = subparsers.add_parser("tokenizer", help="train the BPE tokenizer",
                                description="Byte-level BPE with code-aware pre-tokenization (docs/data.md).")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="STEP")
    tok.set_defaults(func=lambda a: (tok.print_help(), 2)[1])
    _add_tokenizer_train(tsub)
    for parser in (*dsub.choices.values(), *tsub.choices.values()):
        show_defaults(parser)


def _add_build(dsub) -> None:
    b = dsub.add_parser("build", help="clean, deduplicate and split source code into a JSONL corpus")
    b.add_argument("--source", action="append", metavar="SRC",
                   help="repeatable: 'default' (stdlib + site-packages), 'stdlib', 'site-packages', a directory "
                        "(project, git checkout, folder of projects or of wheels/sdists), an archive, a JSONL/Parquet "
                        "file or folder; prefix dir:/archive:/table: to force the kind (default: default)")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--languages", help="comma-separated languages to keep (default: all known)")
    b.add_argument("--license-policy", default="permissive", choices=["permissive", "permissive+weak", "open", "any"],
                   help="license categories to keep (default: %(default)s)")
    b.add_argument("--max-mb", type=number_in(0, open_lo=True), help="read at most ~this many MB of source (deterministic sample)")
    b.add_argument("--min-bytes", type=int_at_least(0), default=32, help="drop smaller files (default: %(default)s)")
    b.add_argument("--max-kb", type=number_in(0, open_lo=True), default=1024, help="drop larger files (default: %(default)s)")
    b.add_argument("--max-bytes", dest="max_kb", type=lambda v: int(v) / 1024, default=argparse.SUPPRESS,
                   metavar="N", help="--max-kb in bytes, next to --min-bytes (default: 1048576)")
    b.add_argument("--near-dup-threshold", type=number_in(0, 1), default=0.7, help="MinHash Jaccard threshold (default: %(default)s)")
    b.add_argument("--no-near-dedup", action="store_true", help="exact dedup only")
    b.add_argument("--no-decontaminate", action="store_true", help="keep benchmark overlaps")
    b.add_argument("--decontam-extra", action="append", metavar="JSONL", help="extra evaluation set to exclude")
    b.add_argument("--val-fraction", type=number_in(0, 1, open_hi=True), default=0.05, help="share of bytes (whole groups) in val (default: %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    b.add_argument("--workers", type=int_at_least(1), help="processes (default: all cores)")
    b.add_argument("--force", action="store_true", help="rebuild even if DIR holds a finished corpus")
    b.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_build)


def _add_tokenize(dsub) -> None:
    t = dsub.add_parser("tokenize", help="tokenize a corpus into memory-mapped shards")
    t.add_argument("--corpus", required=True)
    t.add_argument("--tokenizer", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--workers", type=int_at_least(1), help="processes (default: all cores)")
    t.add_argument("--chunk-mb", type=number_in(0, open_lo=True), default=16.0, help="corpus MB per shard (default: %(default)s)")
    t.add_argument("--force", action="store_true", help="redo even if OUT holds finished shards")
    t.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_tokenize)


def _add_inspect(dsub) -> None:
    i = dsub.add_parser("inspect", help="print shard statistics and decode a few documents")
    i.add_argument("shards")
    i.add_argument("--tokenizer", help="decode documents with this tokenizer")
    i.add_argument("--split", default="val")
    i.add_argument("--show", type=int_at_least(0), default=1, help="documents to decode")
    i.add_argument("--chars", type=int_at_least(0), default=800, help="characters to print per document")
    i.set_defaults(func=_cmd_inspect)


def _add_tasks(dsub) -> None:
    k = dsub.add_parser(
        "tasks", help="mine verified HumanEval-shaped code tasks (and SFT examples) from source code",
        description="Mine verifiable code tasks from the sources' documented pure functions: tests from doctests "
                    "and from differential testing against the original implementation, run only in the sandbox "
                    "(docs/data.md, section 4). Writes OUT (train split), OUT's stem + .heldout.jsonl "
                    "(held-out split, by package) and + .manifest.json (counts per drop reason, timing); every "
                    "line has task_id, prompt, entry_point, canonical_solution, test, source, license, split, and "
                    "is scored by `nanoseek eval humaneval --problems FILE`.")
    k.add_argument("--source", action="append", metavar="SRC",
                   help="repeatable, as for `data build`: 'default' (stdlib + site-packages), 'stdlib', "
                        "'site-packages', a directory, a wheel/sdist/archive, a JSONL/Parquet table (default: "
                        "default)")
    k.add_argument("--out", required=True, help="train split, e.g. runs/tasks/tasks.jsonl (held-out and manifest "
                                                "are written next to it)")
    k.add_argument("--sft-out", help="also write SFT conversations (train-split functions) to this JSONL")
    k.add_argument("--max-tasks", type=int_at_least(1), help="stop after this many verified tasks (sources are read in a "
                                                 "seeded order, so a capped run samples every package)")
    k.add_argument("--held-out-fraction", type=number_in(0, 1, open_hi=True), default=0.1,
                   help="share of tasks (whole packages) in the held-out split (default: %(default)s)")
    k.add_argument("--seed", type=int, default=0, help="file order, generated inputs, split (default: %(default)s)")
    k.add_argument("--license-policy", default="permissive", choices=["permissive", "permissive+weak", "open", "any"],
                   help="license categories to keep (default: %(default)s)")
    k.add_argument("--no-decontaminate", action="store_true", help="keep functions that overlap HumanEval")
    k.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "unshare", "none"],
                   help="sandbox isolation for running mined code (default: strongest available)")
    k.add_argument("--workers", type=int_at_least(1), help="extraction processes; sandboxed programs run one more in "
                                               "parallel (default: all cores)")
    k.add_argument("--force", action="store_true", help="redo even if OUT holds a finished run with these settings")
    k.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true", help="no progress bar")
    k.set_defaults(func=_cmd_tasks)


def _add_tokenizer_train(tsub) -> None:
    tt = tsub.add_parser("train", help="train on a corpus built by `nanoseek data build`")
    tt.add_argument("--corpus", required=True)
    tt.add_argument("--vocab-size", type=int_at_least(1), default=32768, help="including the 32 special ids (default: %(default)s)")
    tt.add_argument("--out", required=True)
    tt.add_argument("--pretokenizer", default="code", choices=["code", "plain"],
                    help="'plain' = GPT-2 byte-level regex, the baseline (default: %(default)s)")
    tt.add_argument("--max-train-mb", type=number_in(0), default=100.0, help="train on a sample of this size, 0 = all (default: %(default)s)")
    tt.add_argument("--min-frequency", type=int_at_least(1), default=2, help="minimum pair count for a merge (default: %(default)s)")
    tt.add_argument("--force", action="store_true", help="retrain even if OUT holds a tokenizer")
    tt.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true", help="no progress bar")
    tt.set_defaults(func=_cmd_tok_train)


