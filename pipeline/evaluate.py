"""python -m pipeline.evaluate MODEL --shards SET [--split val] [--promote ALIAS --if-better-than ALIAS2]

Scores a registered model (MODEL: models:/NAME@ALIAS or models:/NAME/VERSION, from the MLflow registry at
MLFLOW_TRACKING_URI) on one split of a shard set (a folder or s3://bucket/prefix): loss, top-1 and top-5 over
every sample of the split exactly once. MODEL may also be a model no registry holds, scored and printed only (no
tags, no --promote): an export folder, or a released Swin as `python -m pipeline.import_model` takes it
(Microsoft's .pth, timm:NAME, a timm or transformers folder), so the released model is the bar to beat.

Start it alone (a world of one) or once per rank with a launcher
(`python -m swin_common.node_launch --procs N --module pipeline.evaluate ...`, the `deepspeed` launcher, torchrun,
srun): each rank reads its part of the split and one all-reduce adds the parts up. Rank 0 prints

    models:/NAME/VERSION on SET (split val, N samples): loss X, top-1 Y%, top-5 Z%

and records the scores as tags of that model version (eval.<set_id>.<split>.loss|top1|top5|samples|shards, where
set_id is the set folder's name and 8 hex digits of its manifest's sha256: pipeline/tracking/scores.py), so the
MLflow UI shows every version's scores on every shard set.

The preprocessing is the model's own (its img_size and crop_pct; the val loader's eval transform). The model's
label layout (its synsets) must be the set's synsets.txt, or hold every synset of it: then the model's classifier
rows of the set's synsets are scored, mapped by synset.

--promote ALIAS --if-better-than ALIAS2 (both of the model NAME): after the evaluation, ALIAS is moved to the
evaluated version when its top-1 on this set and split beats that of the version ALIAS2 names (its recorded
score on this set and split, or, when it has none, one evaluated now the same way). A tie is not better. Both
figures are printed. ALIAS2 naming no version yet: when ALIAS2 is ALIAS itself, this is its first promotion and ALIAS
is moved (nothing to compare, said so); any other ALIAS2 that names no version (a typo) is an error, exit 2, and
nothing moves. ALIAS2 naming the evaluated version itself: nothing to do.

Exit status: 0 the model was scored (with --promote: ALIAS was moved, or there was nothing to compare);
3 with --promote: not better, ALIAS left where it was; 2 a model, alias, shard set or split that does not exist,
or another expected failure (one line, `error: ...`; --debug shows its traceback); 1 a bug (a traceback).
Under a launcher every rank exits with the same status (DeepSpeed's launcher passes it on; torchrun turns any
non-zero status into 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# what --help, the argument checks and the scoring records need: none of it imports torch or MLflow; the
# evaluation itself (torch, the loader, the process group) and MLflow's client are imported where they start
from data_prep.shardset.layout import map_layouts
from data_prep.shardset.manifest import MANIFEST_NAME, read_manifest
from data_prep.shardset.store import LocalStore, open_store
from pipeline.engine.init_source import check_init_source, init_source_kind
from pipeline.tracking.registry import parse_models_uri, pull_to_folder
from pipeline.tracking.scores import (
    alias_version,
    as_recorded,
    move_alias,
    record_scores,
    score_key,
    shard_set_id,
    version_scores,
)
from pipeline.tracking.store import Store, reading_store
from swin_common.cli import (
    ArgumentParser,
    CommandError,
    command,
    configure_logging,
    describe,
    error_context,
    exit_code_of,
    exit_process,
    rank,
)
from swin_common.redact import redact_text

NOT_BETTER = 3


def parse_args(argv):
    p = ArgumentParser(
        prog="python -m pipeline.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "uri",
        metavar="MODEL",
        help="models:/NAME@ALIAS or models:/NAME/VERSION; or, scored without tags, an export folder or a released "
        "Swin (Microsoft's .pth, timm:NAME, a timm or transformers folder)",
    )
    p.add_argument("--shards", required=True, help="shard set: a folder or s3://bucket/prefix")
    p.add_argument("--split", default="val", help="split of the set to score (default: val)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch and rank (default: 128)")
    p.add_argument(
        "--workers",
        type=int,
        default=4,
        help="DALI threads / DataLoader worker processes per rank (default: 4; 0: none)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "dali", "torch"),
        default="auto",
        help="loader backend, as data.backend: auto is DALI where it imports (default: auto)",
    )
    p.add_argument(
        "--cache-dir",
        default="/tmp/swin-shard-cache",
        help="where the shards of an S3 set are cached on each node (default: /tmp/swin-shard-cache)",
    )
    p.add_argument(
        "--promote",
        metavar="ALIAS",
        help="move this alias of NAME to the evaluated version when it "
        "beats the version --if-better-than names (exit 3 when not)",
    )
    p.add_argument("--if-better-than", metavar="ALIAS2", help="the alias of NAME whose version to beat on top-1")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # launchers
    args = p.parse_args(argv)
    if (args.promote is None) != (args.if_better_than is None):
        p.error("--promote ALIAS and --if-better-than ALIAS2 go together")
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be at least 1 and --workers at least 0")
    return args


@contextlib.contextmanager
def naming(what: str):
    """An expected failure inside that does not name `what` (an S3 error, say) is prefixed with it."""
    try:
        yield
    except Exception as e:
        if what in str(e):
            raise
        with error_context(what):  # names it, unless something inside named it already
            raise


# -- what to score -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SetInfo:
    url: str  # as given
    where: str  # the url, or a local folder's absolute path: what the tags record
    split: str
    set_id: str  # pipeline.tracking.scores.shard_set_id
    synsets: list[str]
    samples: int  # the split's samples per the manifest

    @property
    def shown(self) -> str:
        return redact_text(self.url)


def open_set(url: str, split: str) -> SetInfo:
    """The set's identity, label layout and split size, from its manifest; one clear error when the set or the
    split does not exist."""

    store = open_store(url)
    if isinstance(store, LocalStore) and not store.root.is_dir():
        raise CommandError(
            f"shard set not found: {url} (no such folder; give a shard set folder or s3://bucket/prefix)"
        )
    read_manifest(store)  # no manifest ("is the shard set finalized?") or another format: one clear error
    raw = store.read(MANIFEST_NAME)  # the bytes the set's id hashes (the training runs' data.manifest_sha256)
    manifest = json.loads(raw)
    splits = sorted({entry["split"] for entry in manifest["shards"]})
    if split not in splits:
        raise CommandError(
            f"{url} has no {split!r} split (its splits: {', '.join(splits) or 'none'}): give --split one of them"
        )
    samples = sum(entry["samples"] for entry in manifest["shards"] if entry["split"] == split)
    where = str(store.root.resolve()) if isinstance(store, LocalStore) else url
    return SetInfo(url, where, split, shard_set_id(where, raw), list(manifest["label_layout"]["synsets"]), samples)


def head_rows(model_synsets: list[str], set_synsets: list[str], model: str, shards: str) -> list[int] | None:
    """None when the model's classes are the set's labels as they are; else, for each label of the set, the
    model's classifier row of the same synset. A set synset the model does not know: an error naming both."""
    if list(model_synsets) == list(set_synsets):
        return None

    rows, missing = map_layouts(model_synsets, set_synsets)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CommandError(
            f"{model} cannot be scored on {shards}: {len(missing)} of the set's {len(set_synsets)} "
            f"synsets are not among the model's {len(model_synsets)} classes ({shown}); score it "
            f"on a set whose synsets.txt its synsets cover"
        )
    return rows


@dataclass
class Version:
    """One registered version to score: pulled, its metadata read and checked against the set."""

    name: str
    version: str
    folder: str
    meta: dict
    rows: list[int] | None  # head_rows

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def prepare_version(name: str, version: str, info: SetInfo, mlflow_store: Store) -> Version:
    """Pulls the version (the node's model cache: every rank may call it at once) and checks its preprocessing and
    label layout against the set, before any weights are loaded."""
    from pipeline.data.samples import MEAN, STD

    uri = f"models:/{name}/{version}"
    with error_context(uri):
        folder = pull_to_folder(uri, store=mlflow_store)
        meta = json.loads((folder / "model.json").read_text())
    pre = meta["preprocessing"]
    if [round(v, 4) for v in pre["mean"]] != [round(v, 4) for v in MEAN] or [round(v, 4) for v in pre["std"]] != [
        round(v, 4) for v in STD
    ]:
        raise CommandError(
            f"{uri} normalises with mean {pre['mean']} and std {pre['std']}; the shard loader's "
            f"are {list(MEAN)} and {list(STD)}: it cannot score this model"
        )
    rows = head_rows(meta["synsets"], info.synsets, uri, info.shown)
    return Version(name, str(version), str(folder), meta, rows)


@dataclass
class Plan:
    """What every rank scores, as rank 0 resolved it (broadcast: the ranks agree even if an alias moves)."""

    name: str
    candidate: str  # version
    champion: str | None = None  # the version --if-better-than names (None: none, or not asked)
    champion_scores: dict | None = None  # its recorded scores on this set and split (None: to evaluate)
    versions: dict = field(default_factory=dict)  # version -> Version prepared on this rank (not broadcast)

    def broadcastable(self) -> dict:
        return {
            "name": self.name,
            "candidate": self.candidate,
            "champion": self.champion,
            "champion_scores": self.champion_scores,
        }

    @property
    def champion_to_score(self) -> str | None:
        """The champion's version when it is scored here too (no recorded scores on this set and split yet)."""
        if self.champion is not None and self.champion != self.candidate and self.champion_scores is None:
            return self.champion
        return None


def make_plan(args, info: SetInfo, client, mlflow_store: Store) -> Plan:
    """Resolves the model and the alias to beat, reads the recorded scores, pulls what will be scored: every
    failure a user can fix (an unknown model, version or alias, a set that does not fit) happens here, on every
    rank alike, before any process group."""
    name, alias, number = parse_models_uri(args.uri)  # its error names it
    with error_context(args.uri):
        if alias is not None:
            number = alias_version(client, name, alias)
            if number is None:
                raise CommandError(
                    f"{args.uri}: the registered model {name} has no alias {alias!r} (its aliases: "
                    f"{known_aliases(client, name)})"
                )
        else:
            number = str(int(client.get_model_version(name, number).version))
    plan = Plan(name, number)
    if args.promote is not None:
        plan.champion = alias_version(client, name, args.if_better_than)
        if plan.champion is None and args.if_better_than != args.promote:
            # only the alias being moved may name nothing yet (its first promotion): a gate a typo cannot open
            raise CommandError(
                f"--if-better-than {args.if_better_than}: the registered model {name} has no alias "
                f"{args.if_better_than!r} (its aliases: {known_aliases(client, name)}); nothing to "
                f"compare against, so {args.promote} is not moved. Only the alias being promoted "
                f"may name no version yet (its first promotion: --if-better-than {args.promote})"
            )
        if plan.champion is not None and plan.champion != plan.candidate:
            plan.champion_scores = version_scores(client, name, plan.champion, info.set_id, info.split)
    prepare_all(plan, info, mlflow_store)
    return plan


def known_aliases(client, name: str) -> str:
    aliases = client.get_registered_model(name).aliases or {}
    return ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"


def prepare_all(plan: Plan, info: SetInfo, mlflow_store: Store) -> None:
    wanted = [plan.candidate] + ([plan.champion_to_score] if plan.champion_to_score is not None else [])
    for version in wanted:
        if version not in plan.versions:
            plan.versions[version] = prepare_version(plan.name, version, info, mlflow_store)


# -- scoring -----------------------------------------------------------------------------------------------
def start_world():
    """(World, whether a process group was started): a launcher's ranks join one (gloo on CPU, NCCL + gloo on
    GPUs: pipeline.engine.distributed); a process started alone is a world of one without one."""
    from pipeline.engine.distributed import World, rank_environment

    env = rank_environment(dict(os.environ))
    if env["WORLD_SIZE"] == "1":
        import torch

        if torch.cuda.is_available():
            from pipeline.engine.distributed import cuda_device_index

            torch.cuda.set_device(cuda_device_index(env, torch.cuda.device_count()))
        return World(0, 1, int(env["LOCAL_RANK"])), False
    from pipeline.engine.distributed import init_distributed

    return init_distributed(), True


def score(version: Version, info: SetInfo, args, world) -> dict:
    """loss, top1, top5, samples of the version on the set's split: every rank scores its part of the split
    (pipeline.engine.validation: every sample exactly once over the ranks), all-reduced."""
    import torch

    from pipeline.data.loader import LoaderConfig, create_loader
    from pipeline.engine.model_export import load_exported
    from pipeline.engine.validation import evaluate

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model, meta = load_exported(version.folder)
    if version.rows is not None:
        model = map_head(model, version.rows)
    model = model.to(device).eval()
    loader = create_loader(
        LoaderConfig(
            shards=info.url,
            split=info.split,
            train=False,
            batch_size=args.batch_size,
            image_size=meta["img_size"],
            crop_pct=meta["preprocessing"]["crop_pct"],
            backend=args.backend,
            workers=args.workers,
            cache_dir=args.cache_dir,
            dtype="float32",
        ),
        world.rank,
        world.size,
    )
    result = evaluate(model, loader, device)
    del model
    return {
        "loss": result["val_loss"],
        "top1": result["val_top1"],
        "top5": result["val_top5"],
        "samples": result["val_samples"],
    }


def map_head(model, rows: list[int]):
    """The model with its logits of the set's labels only: column i is the model's row of the set's synset i."""
    import torch

    class HeadRows(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("rows", torch.tensor(rows, dtype=torch.long), persistent=False)

        def forward(self, images):
            return self.model(images).index_select(1, self.rows)

    return HeadRows()


def scores_line(uri: str, info: SetInfo, s: dict) -> str:
    return (
        f"{uri} on {info.shown} (split {info.split}, {s['samples']} samples): loss {s['loss']:.4f}, "
        f"top-1 {s['top1']:.2f}%, top-5 {s['top5']:.2f}%"
    )


def is_better(candidate: dict, champion: dict) -> bool:
    """Top-1 as recorded (pipeline.tracking.scores.as_recorded) on both sides; a tie is not better."""
    return as_recorded(candidate)["top1"] > as_recorded(champion)["top1"]


def conclude(client, plan: Plan, info: SetInfo, args, candidate: dict, champion: dict | None) -> tuple[int, list]:
    """Rank 0: records the scores, decides and moves the alias. Returns (exit status, lines to print)."""
    name = plan.name
    recorded = record_scores(client, name, plan.candidate, info.set_id, info.split, candidate, info.where)
    if champion is not None:
        assert plan.champion is not None  # scored here: Plan.champion_to_score
        champion = record_scores(client, name, plan.champion, info.set_id, info.split, champion, info.where)
    scored = [plan.candidate] + ([plan.champion] if champion is not None else [])
    print(
        f"recorded on {', '.join(f'models:/{name}/{v}' for v in scored)}: tags "
        f"{score_key(info.set_id, info.split, '*')}",
        file=sys.stderr,
        flush=True,
    )
    if args.promote is None:
        return 0, []
    alias, alias2 = args.promote, args.if_better_than
    cand = f"models:/{name}/{plan.candidate}"
    if plan.champion is None:
        move_alias(client, name, alias, plan.candidate)
        return 0, [
            f"candidate {cand} top-1 {recorded['top1']:.2f}% on {info.shown}; {alias2} names no version "
            f"of {name} yet: the first promotion of {alias} (nothing to compare): {alias} -> version "
            f"{plan.candidate}"
        ]
    if plan.champion == plan.candidate:
        return 0, [
            f"candidate {cand} is the version {alias2} names already (nothing to compare): {alias} left as it is"
        ]
    if champion is None:
        champion = plan.champion_scores
        assert champion is not None  # not scored here because its scores were recorded: Plan.champion_to_score
    versus = (
        f"candidate {cand} top-1 {recorded['top1']:.2f}% vs {alias2} models:/{name}/{plan.champion} "
        f"top-1 {champion['top1']:.2f}% on {info.shown} (split {info.split})"
    )
    if is_better(recorded, champion):
        move_alias(client, name, alias, plan.candidate)
        return 0, [f"{versus}: {alias} -> version {plan.candidate}"]

    now = alias_version(client, name, alias)
    stays = f"{alias} stays at version {now}" if now is not None else f"{alias} left unset"
    return NOT_BETTER, [f"{versus}: not better: {stays}"]


@command(ranked=True)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(
        level=logging.WARNING, stream=sys.stderr, format=f"[rank {rank()}] %(name)s %(levelname)s %(message)s"
    )
    if not args.uri.startswith("models:/"):
        return score_unregistered(args)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file and rank otherwise
    from mlflow.tracking import MlflowClient

    mlflow_store = reading_store(args.tracking_uri, os.environ, Path.cwd())  # never a store created by this read
    with naming(args.shards):
        info = open_set(args.shards, args.split)
    client = MlflowClient(mlflow_store.uri)
    plan = make_plan(args, info, client, mlflow_store)

    world, grouped = start_world()
    code = run(client, mlflow_store, plan, info, args, world)
    if grouped:  # after a failure the process group stays up for the error report (swin_common.cli)
        from pipeline.engine.distributed import shutdown

        shutdown()
    return code


def score_unregistered(args) -> int:
    """Scores an export folder, or a released Swin imported into a temporary folder by each rank, and prints the
    line; nothing is recorded (no version to tag) and nothing is promoted."""
    if args.promote is not None:
        raise CommandError(
            f"--promote moves an alias of a registered model; {args.uri} is not one: register it first "
            f"(python -m pipeline.register --model DIR --name NAME, after python -m pipeline.import_model)"
        )
    with naming(args.shards):
        info = open_set(args.shards, args.split)
    with error_context(args.uri), tempfile.TemporaryDirectory(prefix="swin-evaluate-") as tmp:
        check_init_source(args.uri, key="MODEL")
        kind, found = init_source_kind(args.uri, key="MODEL")
        if kind == "checkpoint":
            raise CommandError(f"{args.uri} is a training checkpoint: python -m pipeline.export {args.uri} --out DIR")
        if kind == "export":
            folder = found.parent
        else:
            from pipeline.engine.model_export import import_released

            folder = import_released(args.uri, Path(tmp) / "model")
        meta = json.loads((folder / "model.json").read_text())
        version = Version(
            args.uri, "", str(folder), meta, head_rows(meta["synsets"], info.synsets, args.uri, info.shown)
        )
        world, grouped = start_world()
        if world.is_main:
            print(
                f"scoring {args.uri} on {info.shown} (split {info.split}, {info.samples} samples) ...", file=sys.stderr
            )
        scores = score(version, info, args, world)
    if world.is_main:
        print(scores_line(args.uri, info, scores), flush=True)
    if grouped:
        from pipeline.engine.distributed import shutdown

        shutdown()
    return 0


def run(client, mlflow_store: Store, plan: Plan, info: SetInfo, args, world) -> int:
    """Every rank: the scoring; rank 0: the lines, the tags and the alias. Every rank returns rank 0's status."""
    from pipeline.engine.distributed import broadcast_object

    agreed = broadcast_object(plan.broadcastable())
    if agreed != plan.broadcastable():  # an alias moved while the ranks started: rank 0's view holds
        plan = Plan(**agreed, versions=plan.versions)
        prepare_all(plan, info, mlflow_store)
    main_rank = world.is_main

    def scored(version: str, why: str) -> dict:
        if main_rank:
            print(why, file=sys.stderr, flush=True)
        scores = score(plan.versions[version], info, args, world)
        if main_rank:
            print(scores_line(f"models:/{plan.name}/{version}", info, scores), flush=True)
        return scores

    candidate = scored(
        plan.candidate,
        f"scoring models:/{plan.name}/{plan.candidate} on {info.shown} (split "
        f"{info.split}, {info.samples} samples, {world.size} rank(s)) ...",
    )
    champion = None
    if plan.champion_to_score is not None:
        champion = scored(
            plan.champion_to_score,
            f"{args.if_better_than} models:/{plan.name}/{plan.champion} has no score on "
            f"{info.shown} (split {info.split}) yet: scoring it too ...",
        )
    outcome, failure = None, None
    if main_rank:  # MLflow: rank 0 alone; its outcome, or its error's line, then goes to every rank
        try:
            code, lines = conclude(client, plan, info, args, candidate, champion)
            outcome = {"code": code, "lines": lines}
        except Exception as e:  # noqa: BLE001  (raised below, once every rank knows)
            failure = e
            outcome = {"code": exit_code_of(e) or 1, "error": describe(e)}
    outcome = broadcast_object(outcome)
    if failure is not None:
        raise failure
    if "error" in outcome:
        raise CommandError(outcome["error"], exit_code=outcome["code"])
    if main_rank:
        for line in outcome["lines"]:
            print(line, flush=True)
    return outcome["code"]


if __name__ == "__main__":
    exit_process(main())
