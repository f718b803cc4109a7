"""``python -m tools.ingest_data SOURCES... --out DIR``: text sources -> token shards.

A thin wrapper over :func:`megacontext.data.build_shards` (see ``docs/data.md``).
``SOURCE`` is a file, a folder (walked recursively), a JSONL file, a Hugging Face
dataset saved on disk, or ``PATH=TAG`` to force a curriculum tag. ``--synthetic N``
adds N synthetic long-range tasks (passkey / key-value / code identifier recall).
"""

from __future__ import annotations

import argparse
import sys
import time

from megacontext.data import DEFAULT_EXCLUDE, DEFAULT_SHARD_TOKENS, build_shards
from megacontext.errors import MegaContextError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.ingest_data",
        description="Tokenize text sources into memory-mapped shards (docs/data.md).",
    )
    p.add_argument("sources", nargs="*", help="files, folders, JSONL, HF dirs; PATH=TAG to tag")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--model", default="smollm2-135m", help="base model whose tokenizer to use")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation hash")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    p.add_argument("--max-docs", type=int, default=None, help="keep the first N documents")
    p.add_argument(
        "--exclude",
        action="append",
        default=None,
        help=f"glob on path parts inside folders (repeatable; default {list(DEFAULT_EXCLUDE)})",
    )
    p.add_argument("--text-field", default=None, help="text column of JSONL / HF rows")
    p.add_argument("--synthetic", type=int, default=0, help="add N synthetic long-range tasks")
    p.add_argument("--synthetic-length", type=int, default=2048, help="tokens per task")
    p.add_argument(
        "--synthetic-tasks", default="passkey,kv,code", help="comma-separated task kinds"
    )
    p.add_argument(
        "--synthetic-align",
        choices=["edge", "straddle", "mid"],
        default=None,
        help="place every needle at / across / inside a 32-token block boundary",
    )
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    try:

        from megacontext.base import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        extra = []
        if args.synthetic:
            from megacontext.synthetic import generate_tasks, task_documents

            tasks = generate_tasks(
                tokenizer,
                args.synthetic,
                length=args.synthetic_length,
                tasks=tuple(t.strip() for t in args.synthetic_tasks.split(",") if t.strip()),
                seed=args.seed,
                needle_align=args.synthetic_align,
            )
            extra = task_documents(tasks)
        manifest = build_shards(
            args.sources,
            args.out,
            tokenizer=tokenizer,
            model_name=args.model,
            documents=extra,
            val_fraction=args.val_fraction,
            seed=args.seed,
            shard_tokens=args.shard_tokens,
            max_docs=args.max_docs,
            exclude=tuple(args.exclude) if args.exclude is not None else DEFAULT_EXCLUDE,
            text_field=args.text_field,
            force=args.force,
            progress=not args.no_progress,
        )
    except MegaContextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    for split, entry in manifest["splits"].items():
        tags = ", ".join(
            f"{t} {v['documents']}/{v['tokens']:,}" for t, v in sorted(entry["tags"].items())
        )
        print(
            f"{split}: {entry['documents']} documents, {entry['tokens']:,} tokens, "
            f"{len(entry['shards'])} shards ({tags})"
        )
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} files (listed in manifest.json)")
    print(f"{args.out}: done in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
