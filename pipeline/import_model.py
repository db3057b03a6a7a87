"""python -m pipeline.import_model SOURCE --out DIR [--labels FILE] [--file WEIGHTS]

Writes a released Swin as this project's export (DIR/model.safetensors, DIR/model.json with the synset of every
head row, timm's DIR/config.json), which init_from, evaluate, predict, register, pull, serve and timm's
`local-dir:` all take. SOURCE is one of:
  - Microsoft's release file, e.g. swin_base_patch4_window7_224_22k.pth (read with torch.load(weights_only=True):
    nothing in it is run; a file that needs more than tensors to unpickle is refused);
  - timm:NAME, e.g. timm:swin_base_patch4_window7_224.ms_in22k, from your Hugging Face cache (HF_HUB_OFFLINE=1
    works) or from --file WEIGHTS; or a folder timm wrote (config.json + model.safetensors);
  - a Hugging Face transformers folder (save_pretrained of SwinForImageClassification: config.json +
    model.safetensors or pytorch_model.bin).
Architecture, image size and window are read from the weights. The head's rows get their real synsets: a 22K head
(21,841 rows) is in Microsoft's order, not sorted fall11 (docs/released_weights.md says why); a 1K head is in the
standard 1K order; a transformers folder's id2label is checked against them. --labels FILE (a synset per line, in
the head's order) overrides; a head that matches no known layout is refused without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.engine.init_source import check_init_source
from swin_common.cli import ArgumentParser, CommandError, command, configure_logging, error_context, exit_process
from swin_common.released_kind import TIMM_PREFIX


@command()
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m pipeline.import_model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="a Microsoft .pth, timm:NAME, or a timm or transformers folder")
    p.add_argument("--out", required=True, help="folder to write the export into (replaced whole)")
    p.add_argument("--labels", help="the head's synsets, one per line in row order (overrides the detected layout)")
    p.add_argument("--file", help="for timm:NAME, the weights file to read instead of the Hugging Face cache")
    args = p.parse_args(argv)
    configure_logging(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.file and not args.source.startswith(TIMM_PREFIX):
        raise CommandError(f"--file is for a timm:NAME source; {args.source} names its weights itself")
    if args.file and not Path(args.file).is_file():
        raise CommandError(f"--file {Path(args.file).absolute()}: no such file")
    if args.labels and not Path(args.labels).is_file():
        raise CommandError(f"--labels {Path(args.labels).absolute()}: no such file (a synset per line)")
    with error_context("import"):
        check_init_source(
            args.source, key="source"
        )  # from the headers, before torch is imported: a wrong path fails at once
        from pipeline.engine.model_export import import_released

        out = import_released(args.source, args.out, args.labels, args.file)
    meta = json.loads((out / "model.json").read_text())
    print(
        f"{out.absolute()}: {meta['num_classes']} classes ({meta['source']['head_layout']}), from "
        f"{meta['source']['description']}"
    )
    return 0


if __name__ == "__main__":
    exit_process(main())
