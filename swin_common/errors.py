"""The one type of the errors a user can fix, which every command prints as one line.

A UserError is raised on purpose, where the code has found a mistake of the user's or of what the user gave it
(a config key or value, a path, a permission, bad data, a server's refusal, a launch that cannot work), with a
message ready for the user: it names the thing and what to do. `swin_common.cli` prints it as `error: MESSAGE`
and exits with its `exit_code` (2 unless the class says otherwise). Any other exception is a bug and keeps its
traceback, whatever its type and wherever it was raised.

A domain's error that callers catch as a ValueError or RuntimeError derives from both:
`class ConfigError(UserError, ValueError)`.

This module imports nothing, so every layer (data_prep's shard-set contract included) can raise it.
"""

from __future__ import annotations

USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix, raised on purpose with a message ready to print; exits `exit_code`."""

    exit_code: int = USER_ERROR
