"""python -m data_prep {shard,index,finalize,verify,map,embedded} ... (each with --help).

Expected failures (a missing source or shard set, an unfinalized set, a bad layout or option, S3 errors) end in
one line, `error: ...`, and exit 2; `--debug` shows their traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

from swin_common.cli import ArgumentParser, DefaultsHelpFormatter, command, configure_logging

from .shardset.layout import read_layout, write_map

EXAMPLES = """examples:
  python -m data_prep shard --source /data/imagenet22k_tars --out s3://bucket/in22k --holdout-per-class 10 --workers 8
  python -m data_prep index s3://bucket/imagenet-22k-wds --out s3://bucket/in22k-index --set imagenet-22k-wds
  python -m data_prep verify s3://bucket/in22k --workers 8
  python -m data_prep map --from s3-synsets.txt --to imagenet1k_synsets.txt --out in22k_to_in1k.json
"""


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 1GiB, 100000)")
    unit = m.group(2).upper()
    base = 1024 if (m.group(3) or "").lower() == "ib" else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(unit or " "))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m data_prep",
        description=__doc__.split("\n")[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = DefaultsHelpFormatter  # argparse's, without empty or doubled defaults

    s = sub.add_parser(
        "shard",
        formatter_class=fmt,
        help="write webdataset shards from a source",
        description="Reads an ImageFolder tree or a folder of per-synset tars (local or "
        "s3://bucket/prefix) and writes train/ and val/ webdataset shards, their DALI index "
        "files, synsets.txt and manifest.json. Rerun the same command to resume.",
    )
    s.add_argument("--source", required=True, help="folder or s3://bucket/prefix to read")
    s.add_argument("--out", required=True, help="folder or s3://bucket/prefix to write")
    s.add_argument("--source-format", default="auto", choices=["auto", "imagefolder", "synset-tars"])
    s.add_argument("--layout", help="label layout file, one synset per line (default: sorted synsets found)")
    s.add_argument("--seed", type=int, default=0, help="seed of the global shuffle and of the hold-out")
    s.add_argument(
        "--holdout-per-class", type=int, default=0, metavar="N", help="images per class held out into val/ shards"
    )
    s.add_argument("--max-samples", type=int, default=1000, help="samples per shard (0: no limit)")
    s.add_argument(
        "--max-bytes",
        type=parse_bytes,
        default=None,
        help="source bytes per shard, e.g. 500MB (counted before re-encoding)",
    )
    s.add_argument(
        "--resize-shorter",
        type=int,
        metavar="S",
        help="downscale images whose shorter side exceeds S (re-encoded); others keep their bytes",
    )
    s.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded JPEGs")
    s.add_argument(
        "--validate",
        choices=["scaled", "full"],
        default="scaled",
        help="decode each JPEG at 1/8 scale (all entropy-coded data, fast) or at full size",
    )
    s.add_argument(
        "--min-size",
        type=int,
        metavar="PX",
        help="leave out images whose shorter side is under PX (listed in the manifest's rejected)",
    )
    s.add_argument(
        "--exif",
        choices=["apply", "strip", "keep"],
        default="apply",
        help="apply: re-encode JPEGs whose EXIF orientation rotates them, upright, and cut EXIF/XMP/"
        "IPTC from all (every decoder then sees the same pixels); strip: only cut them; keep: as is",
    )
    s.add_argument(
        "--min-images-per-class",
        type=int,
        default=0,
        metavar="N",
        help="set aside classes with fewer than N images (reported in the manifest; left out of the default layout)",
    )
    s.add_argument("--workers", type=int, default=1, help="worker processes on this machine, one shard each")
    s.add_argument(
        "--threads",
        type=int,
        default=2,
        help="threads per worker decoding images while it reads and writes (never changes bytes)",
    )
    s.add_argument("--task-index", type=int, help="this task's index (default: from SLURM_ARRAY_TASK_ID)")
    s.add_argument("--num-tasks", type=int, help="number of tasks (default: SLURM_ARRAY_TASK_COUNT or 1)")
    s.add_argument(
        "--list-only",
        action="store_true",
        help="only list the source into OUT/_prep (what every task then reuses) and exit",
    )
    s.add_argument(
        "--no-finalize", action="store_true", help="do not write manifest.json even when this task finishes the set"
    )

    i = sub.add_parser(
        "index",
        formatter_class=fmt,
        help="index a webdataset shard set in place (timm's, ShardWriter's, GNU tar's)",
        description="Makes a webdataset shard set this project did not write readable by the loaders, "
        "without changing or copying a byte of SOURCE: reads each shard once as a stream and writes under "
        "--out its DALI .idx and labels, the split indexes, synsets.txt and manifest.json (format /2, whose "
        "shards_root is SOURCE). Splits come from --split, else timm's _info.json/info.json, else sub-folders "
        "holding .tar files. timm names its val split 'validation': train with data.val_split=validation. "
        "Rerun the same command to resume; Slurm array tasks share the shards.",
    )
    i.add_argument("source", metavar="SOURCE", help="folder or s3://bucket/prefix holding the shards (read only)")
    i.add_argument(
        "--out", help="folder or s3://bucket/prefix for the index (default: SOURCE, if a writable local folder)"
    )
    i.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="NAME=PATTERN",
        help="a split's shards, relative to SOURCE, brace patterns allowed: train=in22k-train-{0000..4095}.tar "
        "(repeatable)",
    )
    i.add_argument("--labels", metavar="FILE", help="label layout: a synset per line, in the order cls numbers them")
    i.add_argument(
        "--set",
        dest="known_set",
        choices=["imagenet-1k-wds", "imagenet-22k-wds", "imagenet-12k-wds"],
        help="the layout of one of timm's published sets (from timm's own label files); checked against the "
        "json's synset where a sample has one",
    )
    i.add_argument(
        "--label-key",
        default="cls",
        metavar="cls|json:FIELD",
        help="where a sample's label is: its cls member, or a json field (json:label_12k); -1 means not in this "
        "layout (skipped and counted)",
    )
    i.add_argument(
        "--max-bad",
        default="0.1%",
        metavar="N|P%",
        help="bad samples (no image or label, unreadable, truncated tar) allowed before the set is refused",
    )
    i.add_argument("--workers", type=int, default=1, help="worker processes on this machine, one shard each")
    i.add_argument("--task-index", type=int, help="this task's index (default: from SLURM_ARRAY_TASK_ID)")
    i.add_argument("--num-tasks", type=int, help="number of tasks (default: SLURM_ARRAY_TASK_COUNT or 1)")
    i.add_argument("--list-only", action="store_true", help="only resolve the source shards into OUT/_prep and exit")
    i.add_argument(
        "--no-finalize", action="store_true", help="do not write manifest.json even when this task finishes the set"
    )

    f = sub.add_parser(
        "finalize",
        formatter_class=fmt,
        help="write manifest.json once all shards exist",
        description="Writes manifest.json from the shards' completion records; fails, naming "
        "them, while shards are missing. The last shard task does this by itself.",
    )
    f.add_argument("out", help="shard folder or s3://bucket/prefix")
    f.add_argument("--max-bad", metavar="N|P%", help="for a set of `index`: bad samples allowed (default 0.1%%)")

    v = sub.add_parser(
        "verify",
        formatter_class=fmt,
        help="check a shard set against its manifest",
        description="Re-reads every shard: sha256, sample counts, index files, labels in "
        "range, every jpg decodes. Exit 0 only if everything holds.",
    )
    v.add_argument("out", help="shard folder or s3://bucket/prefix")
    v.add_argument("--workers", type=int, default=1)
    v.add_argument("--no-decode", action="store_true", help="skip decoding the JPEGs")

    m = sub.add_parser(
        "map",
        formatter_class=fmt,
        help="map one label layout onto another",
        description="For every synset of the target layout, its row in the source layout "
        "(-1 when absent): the map that initialises a 1K head from 22K head rows. A layout is "
        "a file or a shard folder holding synsets.txt.",
    )
    m.add_argument("--from", dest="source", required=True, help="source layout (e.g. the 22K one)")
    m.add_argument("--to", dest="target", required=True, help="target layout (e.g. the 1K one)")
    m.add_argument("--out", required=True, help="JSON file to write")
    m.add_argument("--strict", action="store_true", help="exit 1 when a target synset is missing")

    e = sub.add_parser(
        "embedded",
        formatter_class=fmt,
        help="write the embedded digits dataset",
        description="Writes scikit-learn's 1,797 handwritten digits as RGB JPEGs, as an "
        "ImageFolder tree or as ImageNet-22K-style per-synset tars (synsets n00000000-9).",
    )
    e.add_argument("--out", required=True)
    e.add_argument("--format", choices=["imagefolder", "synset-tars"], default="synset-tars")
    e.add_argument("--size", type=int, default=64, help="side of the upscaled images")
    return p


@command()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # a log line goes above the progress bar, never into it
        return COMMANDS[args.command](args)


def cmd_shard(args) -> int:
    from .shard import ShardOptions, run_shard, slurm_task_defaults

    task_index, num_tasks = slurm_task_defaults()
    opts = ShardOptions(
        source=args.source,
        out=args.out,
        source_format=args.source_format,
        layout=args.layout,
        seed=args.seed,
        holdout_per_class=args.holdout_per_class,
        max_samples=args.max_samples or None,
        max_bytes=args.max_bytes,
        resize_shorter=args.resize_shorter,
        jpeg_quality=args.jpeg_quality,
        validate=args.validate,
        min_size=args.min_size,
        exif=args.exif,
        min_images_per_class=args.min_images_per_class,
        workers=args.workers,
        threads=args.threads,
        task_index=task_index if args.task_index is None else args.task_index,
        num_tasks=num_tasks if args.num_tasks is None else args.num_tasks,
        finalize=not args.no_finalize,
        list_only=args.list_only,
    )
    summary = run_shard(opts)
    return print_job_summary(summary, args.list_only)


def print_job_summary(summary: dict, list_only: bool) -> int:
    """A shard or index task's summary on stdout; a line on stderr when the set is not finalized yet."""
    print(json.dumps(summary, indent=1))
    if "manifest" not in summary and not list_only:
        print(
            "manifest.json not written yet: other tasks' shards are missing (or --no-finalize); "
            "`python -m data_prep finalize OUT` writes it when they are done",
            file=sys.stderr,
        )
    return 0


def cmd_index(args) -> int:
    from .foreign import IndexOptions, run_index
    from .shard import slurm_task_defaults

    task_index, num_tasks = slurm_task_defaults()
    opts = IndexOptions(
        source=args.source,
        out=args.out,
        splits=args.split,
        labels=args.labels,
        known_set=args.known_set,
        label_key=args.label_key,
        max_bad=args.max_bad,
        workers=args.workers,
        task_index=task_index if args.task_index is None else args.task_index,
        num_tasks=num_tasks if args.num_tasks is None else args.num_tasks,
        finalize=not args.no_finalize,
        list_only=args.list_only,
    )
    summary = run_index(opts)
    return print_job_summary(summary, args.list_only)


def cmd_finalize(args) -> int:
    from .shard import finalize, prepared_output

    out, options = prepared_output(args.out)
    if options.get("kind") == "index":  # an output of `data_prep index`: --max-bad bounds its bad samples
        from .foreign import finalize_index

        manifest = finalize_index(out, options, args.max_bad)
    else:
        manifest = finalize(args.out)
    print(
        json.dumps(
            {
                "manifest": f"{args.out}/manifest.json",
                "totals": manifest["totals"],
                "rejected": len(manifest["rejected"]),
            },
            indent=1,
        )
    )
    return 0


def cmd_verify(args) -> int:
    from .verify import verify

    report = verify(args.out, args.workers, decode=not args.no_decode)
    for problem in report.problems:
        print(problem)
    status = "OK" if report.ok else f"FAILED: {len(report.problems)} problem(s)"
    print(f"verify {args.out}: {report.shards} shards, {report.samples} samples: {status}")
    return 0 if report.ok else 1


def cmd_map(args) -> int:
    source, target = read_layout(args.source), read_layout(args.target)
    doc = write_map(args.out, args.source, args.target, source, target)
    found = len(target) - len(doc["missing"])
    print(
        f"{found} of {len(target)} target synsets found in the source layout ({len(source)} synsets); "
        f"map written to {args.out}"
    )
    if doc["missing"]:
        print(
            f"{len(doc['missing'])} target synset(s) absent from the source (index -1, to be initialised "
            f"fresh): {', '.join(doc['missing'])}"
        )
    return 1 if args.strict and doc["missing"] else 0


def cmd_embedded(args) -> int:
    from .embedded import write_imagefolder, write_synset_tars

    writer = write_imagefolder if args.format == "imagefolder" else write_synset_tars
    print(writer(args.out, args.size))
    return 0


COMMANDS = {
    "shard": cmd_shard,
    "index": cmd_index,
    "finalize": cmd_finalize,
    "verify": cmd_verify,
    "map": cmd_map,
    "embedded": cmd_embedded,
}
