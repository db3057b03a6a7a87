"""`python -m swin_common.launch_env [USER_FILE ...]`: the lines of a DeepSpeed environment file (KEY=VALUE) that
carry this project's settings to every node of a multi-node `deepspeed` launch.

DeepSpeed's runner passes to the other nodes only the variables whose names start with one of its prefixes
(`runner.py` EXPORT_ENVS: MLFLOW, PYTHON, MV2, UCX, plus NCCL on GPUs) and those a `.deepspeed_env` file names.
The project also reads SWIN_* (its own switches), AWS_* (S3 shards and artifacts), TORCH_* (NCCL's watchdog and
flight recorder, torch.distributed's logging) and DEEPSPEED_TIMEOUT. launch/pretrain_22k.sh writes these lines,
after the lines of the user's own files (given as arguments: ~/.deepspeed_env, ./.deepspeed_env), into a private
temporary file and names it in DS_ENV_FILE, which the runner then reads instead.

DeepSpeed writes each value into the remote shell command line, in double quotes when it has other characters
than [A-Za-z0-9_@%+=:,./-], without escaping: a value with a quote, `$`, a backtick, a backslash or a line break
cannot travel that way and is left out, with a warning naming the variable. Values reach the other nodes on
pdsh's command line, which their `ps` shows: prefer credential files or instance roles there for secrets.
"""

from __future__ import annotations

import os
import re
import sys

PREFIXES = ("SWIN_", "AWS_", "TORCH_", "DEEPSPEED_TIMEOUT")
_UNSAFE = re.compile(r'["$`\\\n]')
_LOCAL_ONLY = {"SWIN_STOP_FILE"}  # a path on the launching node, for the launch script itself


def lines(environ: dict[str, str], user_files: list[str]) -> tuple[list[str], list[str]]:
    """(the file's lines, the names of the variables left out)."""
    out, skipped = [], []
    for path in user_files:
        if os.path.isfile(path):
            with open(path) as f:
                out += [line.rstrip("\n") for line in f if "=" in line]
    for key in sorted(environ):
        if not key.startswith(PREFIXES) or key in _LOCAL_ONLY:
            continue
        if _UNSAFE.search(environ[key]):
            skipped.append(key)
            continue
        out.append(f"{key}={environ[key]}")
    return out, skipped


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    found, skipped = lines(dict(os.environ), args)
    for key in skipped:
        print(
            f"warning: {key} is not passed to the other nodes: its value holds a quote, $, backtick, backslash "
            f"or line break, which DeepSpeed's runner cannot pass on; set it on each node instead",
            file=sys.stderr,
        )
    sys.stdout.write("".join(line + "\n" for line in found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
