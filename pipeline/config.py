"""The typed run config: one dataclass tree per run, read from a recipe YAML, overridden by `key=value`
arguments (dotted paths, values parsed as YAML: `optim.base_lr=5e-4`, `train.zero_stage=3`,
`data.rand_augment=null`), checked against the field types, and dumped with every run (`config.yaml`).

Unknown keys are errors, never silently ignored: a typo in a recipe must not train the wrong model. A field with
a fixed set of values is a typing.Literal (`data.backend`, `schedule.decay`, `train.precision`,
`train.zero_stage`, `transfer.bias_tables`, `transfer.head`): a value outside it is refused here, with the rest
of the config, in a second and before torch is imported; the code that uses the field takes the config's word.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from swin_common.errors import UserError

Backend = Literal["auto", "dali", "torch"]
Decay = Literal["cosine", "linear", "constant"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
ZeroStage = Literal[0, 1, 2, 3]
BiasTables = Literal["bicubic", "zeros"]
Head = Literal["map", "fresh"]


class ConfigError(UserError, ValueError):
    """A config file, key or value that cannot make a run: named, with what it takes."""


@dataclass
class ModelConfig:
    arch: str = "swin_base"  # swin_nano (CPU twin) | swin_tiny | swin_small | swin_base | swin_large
    img_size: int = 224
    window_size: int = 7
    drop_path: float = 0.2  # stochastic depth rate at the last block (timm's drop_path_rate)
    grad_checkpointing: bool = False  # recompute blocks in backward: less activation memory, ~30% more compute
    fused_attn: bool = True  # timm's SDPA attention (F.scaled_dot_product_attention); false = eager softmax(QK^T)V


@dataclass
class DataConfig:
    shards: str = ""  # shard set folder or s3://bucket/prefix (written by `python -m data_prep shard`)
    train_split: str = "train"
    val_split: str = "val"  # "" = no evaluation
    backend: Backend = "auto"  # auto: dali where it imports, else torch
    workers: int = 4  # DALI threads / DataLoader worker processes per rank
    seed: int = 0
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    random_erasing: float = 0.25
    crop_pct: float = 0.875  # eval: resize shorter side to img_size / crop_pct, centre crop
    max_bad_shards: int = 0
    cache_dir: str = "/tmp/swin-shard-cache"  # S3 shards are copied here: node-local disk, one per node
    cache_bytes: int = 64 << 30  # the node's budget, shared by its ranks and their workers
    read_ahead: int = 4  # S3 shards each rank fetches ahead of where it reads (0: none)


@dataclass
class OptimConfig:
    base_lr: float = 1.25e-4  # per `lr_batch_base` images: lr = base_lr * global_batch / lr_batch_base
    lr_batch_base: int = 512
    weight_decay: float = 0.05  # not applied to norms, biases and relative position bias tables
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 5.0  # max global grad norm; 0 = off


@dataclass
class ScheduleConfig:
    epochs: float = 90
    warmup_epochs: float = 5  # linear warm-up, per optimizer step, from warmup_lr
    decay: Decay = "cosine"  # after warm-up
    warmup_lr: float = 1.25e-7  # scaled like base_lr (per lr_batch_base images)
    min_lr: float = 1.25e-6  # scaled like base_lr


@dataclass
class TrainConfig:
    global_batch: int = 4096  # images per optimizer step over all ranks
    micro_batch: int = 128  # images per rank per forward/backward; accumulation = global / (micro x world)
    zero_stage: ZeroStage = 2  # DeepSpeed ZeRO stage; 0 = DDP
    precision: Precision = "auto"  # auto: bf16 where the GPU has it, fp16 on V100, fp32 on CPU
    seed: int = 0
    max_steps: int = 0  # stop after this many optimizer steps (0 = the whole schedule)
    log_every: int = 10  # optimizer steps
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops with an error
    # every collective gives up after this long: a dead or stopped rank ends the job this fast (DeepSpeed: 600)
    collective_timeout_s: float = 600.0
    # ranks waiting for rank 0's long work (the export and registration, an elastic resume's conversion)
    long_wait_timeout_s: float = 14400.0


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # auto (newest complete checkpoint in the run's folder, if any) | none | <checkpoint dir>
    # saves refused by storage (full, over quota, an I/O error) in a row before the run stops (exit 74): a full disk
    # may clear (a cleanup, another job's end), so a refused save only warns and the next interval tries again, but
    # past this many the steps since the newest checkpoint are at stake and a person must free space
    max_failed_saves: int = 3


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 = only at the end of each epoch
    batch_size: int = 128  # per rank


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # MLFLOW_TRACKING_URI wins; neither: a local store in out_dir/mlflow
    # artifacts of an experiment this project creates in a local store (sqlite/file): here, else out_dir/mlflow/
    # artifacts (never where the launcher happens to run); a server keeps its own (--artifacts-destination)
    artifact_location: str = ""
    experiment: str = "swin-pipeline"
    register: bool = True  # register the exported model at the end of training
    model_name: str = ""  # registered model name (default: the run's name)
    # set on the new version; "candidate" by default: the alias users pull (champion) moves only by a deliberate
    # step, `python -m pipeline.evaluate ... --promote champion --if-better-than champion` (MLflow reserves "latest")
    aliases: list[str] = field(default_factory=lambda: ["candidate"])
    system_metrics: bool = True  # CPU/GPU/memory/network per node, every system_metrics_s seconds
    system_metrics_s: float = 10.0
    start_timeout_s: float = 30.0  # MLflow unreachable that long at start: the run is not tracked
    final_timeout_s: float = 120.0  # at the end, wait that long for records kept during an outage


@dataclass
class TransferConfig:
    bias_tables: BiasTables = "bicubic"  # bicubic: resize each head's (2M-1)^2 grid (paper, official code) | zeros
    head: Head = "map"  # map: class rows from the source rows of the same synsets | fresh: a new head


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run's folder is out_dir/name: config.yaml, checkpoints/, model/, metrics.jsonl
    # start from another model's weights (fine-tuning): a checkpoint folder, an exported model folder or its
    # model.safetensors, or models:/NAME@ALIAS | models:/NAME/VERSION; ignored when resuming a checkpoint
    init_from: str = ""
    transfer: TransferConfig = field(default_factory=TransferConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    tree: dict = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        # `key=` sets an empty string, `key=null` sets None
        _set_path(tree, key.strip().split("."), yaml.safe_load(text) if text.strip() else "")
    return _build(RunConfig, tree, "")


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML, every string redacted (URI passwords, query-string tokens, secret
    environment values: swin_common.redact), so the dump can be shared and logged as it is."""
    from swin_common.redact import redact_tree

    Path(path).write_text(yaml.safe_dump(redact_tree(_plain(config_to_dict(cfg))), sort_keys=False))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _set_path(tree: dict, keys: list[str], value) -> None:
    for key in keys[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {key} is not a section")
        tree = node
    tree[keys[-1]] = value


def _build(cls, tree: dict, where: str):
    if not isinstance(tree, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a section (mapping), got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(where + k for k in unknown)}; "
            f"{where or 'top level'} takes: {', '.join(sorted(names))}"
        )
    values = {}
    for name in tree:
        hint, value = hints[name], tree[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{where}{name}.")
        else:
            values[name] = _coerce(value, hint, where + name)
    return cls(**values)


def _coerce(value, hint, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        kind = type(args[0])
        if kind is not str:  # `train.zero_stage=two`: the type first, as for any int field
            value = _coerce(value, kind, key)
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], key) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
