"""One machine's ranks, started by DeepSpeed's per-node launcher (`deepspeed.launcher.launch`) with no `deepspeed`
runner in front of it.

    python -m swin_common.node_launch --procs N [--master_addr A] [--master_port P] --module pipeline.train ARGS

launch/pretrain_22k.sh uses it on one machine when it knows how many ranks to start. There the runner
(`deepspeed.launcher.runner`) only encodes the world info, `{"localhost": [0, ..., N-1]}`, and starts this same
launcher: it does that in a process of its own with all of DeepSpeed imported, which costs seconds at its start
and at its exit on every launch. The launcher itself is DeepSpeed's, unchanged: it starts the ranks, passes
SIGTERM to every rank's process tree (SIGKILL 30 s later) and exits with a failed rank's status. Multi-node runs,
GPU counting and every other runner option still go through the runner.
"""

from __future__ import annotations

import base64
import json
import os
import sys

from swin_common.cli import exit_process


def world_info(procs: int) -> str:
    """The runner's encoding of one machine with `procs` ranks (deepspeed.launcher.runner.encode_world_info)."""
    return base64.urlsafe_b64encode(json.dumps({"localhost": list(range(procs))}).encode()).decode()


def launcher_argv(argv: list[str]) -> list[str]:
    """`--procs N` becomes the world info; the rest goes to DeepSpeed's launcher as it is."""
    if len(argv) < 2 or argv[0] != "--procs" or not argv[1].isdigit() or int(argv[1]) < 1:
        raise SystemExit("error: give --procs N first (see --help)")
    return [f"--world_info={world_info(int(argv[1]))}", *argv[2:]]  # --master_addr: 127.0.0.1 as the runner's


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    sys.argv = ["deepspeed.launcher.launch", *launcher_argv(argv)]
    from deepspeed.launcher import launch

    if not os.path.exists("/proc/driver/nvidia/version"):  # no NVIDIA driver: the launcher's GPU list is no news
        launch.logger.addFilter(lambda record: not record.getMessage().startswith("Setting CUDA_VISIBLE_DEVICES"))

    try:
        launch.main()
    except SystemExit as e:  # a failed rank's status, or 1 after a SIGTERM (its handler exits)
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
