"""What every command of the project shares, below both data_prep and pipeline (it imports neither):

- `swin_common.redact`: the one redaction function (`redact_text`) for every piece of text that leaves a
  process (log lines, printed errors, run records, config dumps, MLflow params and tags), and the hooks that
  apply it to the process's logging and its stdout/stderr.
- `swin_common.errors`: UserError, the one type of the errors a user can fix (a config value, a path, bad data):
  raised on purpose, printed in one line; any other exception is a bug and keeps its traceback.
- `swin_common.cli`: how a command starts and ends: `@command` around each entry point's main, an
  ArgumentParser with `--debug` and one-line usage errors, and the one-line `error: ...` for expected failures
  (tracebacks are for bugs, and for --debug).
- `swin_common.gpu`: what each GPU generation supports (the precision `auto` picks, whether the installed torch
  and DALI builds have kernels for a GPU, peak FLOP/s for MFU), read by the loader, the engine and tracking.
"""
