"""python -m pipeline.train --config configs/<recipe>.yaml [key=value ...]

Trains (or resumes) one run with DeepSpeed ZeRO. Start one process per GPU with the `deepspeed` launcher,
`torchrun` or Slurm's `srun` (see launch/); started alone it is a world of one. Overrides use dotted keys:
`train.zero_stage=3 optim.base_lr=5e-4 checkpoint.resume=none`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=10")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.engine.distributed import init_distributed

    world = init_distributed()
    logging.basicConfig(level=logging.INFO if world.is_main else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s [rank {world.rank}] %(name)s %(levelname)s %(message)s", force=True)
    import torch.distributed as dist

    from pipeline.engine.loop import TrainingDiverged, train

    try:
        summary = train(cfg, world)
        if world.is_main:
            print(json.dumps(summary, indent=1), flush=True)
        return 0
    except TrainingDiverged as e:
        if world.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
