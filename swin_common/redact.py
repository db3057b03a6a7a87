"""One redaction function for every piece of text that leaves a process: `redact_text`.

What it cuts (each replaced by `***`):
- the password of a URI's userinfo: `http://user:password@host/` -> `http://user:***@host/` (the user name stays,
  so a reader still sees which account was used); a userinfo without a password is usually a token
  (`https://TOKEN@host/`) and is cut whole: `https://***@host/`;
- query-string credentials: `X-Amz-Signature`, `X-Amz-Credential`, `X-Amz-Security-Token`, `token`,
  `access_token`, `sig`, `signature`, `key`, `api_key`, `client_secret`, `password`, ... (any parameter whose
  name holds token/signature/secret/password/credential/api key/access key/auth) -> `token=***`;
- `Authorization: Bearer ...` / `Basic ...` header values;
- anywhere in the text, the values of secret-looking environment variables (names holding key, token, secret,
  passw, credential, auth, private; values of 6+ characters), the credentials found in URIs held by any
  environment variable (e.g. MLFLOW_TRACKING_URI's password), and values given to `remember_secrets`.

Where it is applied: `install_redaction()` (called by every command through swin_common.cli) wraps the
formatter of every logging handler and the process's sys.stdout/sys.stderr, so log lines, warnings, printed
errors and tracebacks are redacted; the writers of run records, config dumps and MLflow params/tags call
`redact_text` / `redact_tree` on what they write. The function is idempotent: redacting twice changes nothing.

This module imports nothing from the project (data_prep and pipeline both use it).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Mapping

REDACTED = "***"
SECRET_NAME = re.compile(r"key|token|secret|passw|credential|auth|private", re.I)
MIN_SECRET_LEN = 6  # a shorter value cut from all text would mangle ordinary words and numbers

# scheme://user:PASSWORD@host: greedy up to the last "@" before the path, so a password holding "@" is cut whole
URI_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@?#]*:)(?P<secret>[^/\s]*)@")
# scheme://TOKEN@host (no colon: no password, the user part is the credential)
URI_USER_TOKEN = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<secret>[^/\s:@?#]+)@")
QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:[\w.~-]*(?:token|signature|secret|passw|pwd|credential|api[-_]?key|apikey|access[-_]?key"
    r"|auth)[\w.~-]*|sig|key|code)=)(?P<secret>[^&#\s'\"<>]+)",
    re.I,
)
AUTH_HEADER = re.compile(
    r"(?P<head>\bauthorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)"
    r"(?P<secret>[^\s\"',;}]+)|(?P<bhead>\bBearer\s+)(?P<bsecret>[A-Za-z0-9._~+/=-]{8,})",
    re.I,
)

_remembered: set[str] = set()
_lock = threading.Lock()


def uri_secrets(text: str) -> list[str]:
    """The credentials written into the URIs of `text` (userinfo passwords, query-string tokens)."""
    found = [m["secret"] for m in URI_PASSWORD.finditer(text)]
    found += [m["secret"] for m in URI_USER_TOKEN.finditer(text)]
    found += [m["secret"] for m in QUERY_SECRET.finditer(text)]
    return [s for s in found if s and s != REDACTED]


def remember_secrets(*values: str) -> None:
    """Adds values to cut from all text this process writes from now on.

    Values to cut from all text from now on, wherever they appear (e.g. the password of a configured URI).
    A value that holds URIs or query strings adds the credentials in them; any other value adds itself."""
    with _lock:
        for value in values:
            if value:
                found = uri_secrets(value) if ("://" in value or "=" in value) else [value]
                _remembered.update(s for s in found if len(s) >= MIN_SECRET_LEN)


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Every value to cut from text, longest first.

    Values to cut wherever they appear, longest first: secret-looking environment variables, credentials in
    URIs held by any environment variable, and remembered values."""
    environ: Mapping[str, str] = os.environ if env is None else env
    found: set[str] = set()
    for key, value in environ.items():
        if SECRET_NAME.search(key):
            found.add(value)
        if "://" in value or "=" in value:
            found.update(uri_secrets(value))
    with _lock:
        found |= _remembered
    return sorted((v for v in found if len(v) >= MIN_SECRET_LEN and v != REDACTED), key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every credential cut (see the module's docstring).

    `secrets`: the values to cut wherever they
    appear (default: secret_values() of this process's environment)."""
    if not text:
        return text
    text = URI_PASSWORD.sub(rf"\g<head>{REDACTED}@", text)
    text = URI_USER_TOKEN.sub(lambda m: m["head"] + (m["secret"] if m["secret"] == REDACTED else REDACTED) + "@", text)
    text = QUERY_SECRET.sub(rf"\g<head>{REDACTED}", text)
    text = AUTH_HEADER.sub(_auth_header, text)
    for secret in secret_values() if secrets is None else secrets:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _auth_header(m: re.Match) -> str:
    if m["head"] is not None:
        return m["head"] + REDACTED
    return m["bhead"] + REDACTED


def redact_tree(value, secrets: list[str] | None = None):
    """A copy of a JSON/YAML-like tree (dicts, lists, tuples, strings, numbers) with every string redacted."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, dict):
        return {k: redact_tree(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v, secrets) for v in value)
    return value


# -- where text leaves the process -------------------------------------------------------------------------
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colours and cursor moves (MLflow's coloured warnings)


class RedactingFormatter(logging.Formatter):
    """A logging formatter whose lines have every credential cut.

    Formats with the handler's own formatter, then redacts the whole line (message, arguments, traceback);
    `plain`: terminal escape codes dropped too (a handler that writes to a file or a pipe)."""

    def __init__(self, inner: logging.Formatter | None = None, plain: bool = False):
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.plain = plain

    def format(self, record: logging.LogRecord) -> str:
        line = redact_text(self.inner.format(record))
        return ANSI_ESCAPE.sub("", line) if self.plain and "\x1b" in line else line


class RedactingStream:
    """A text stream whose writes have every credential cut.

    A text stream that redacts every write before passing it on (sys.stdout / sys.stderr); when the stream
    is not a terminal (a log file, a pipe) it also drops terminal escape codes, so a log stays text that grep
    reads."""

    def __init__(self, stream):
        self._stream = stream
        try:
            self._plain = not stream.isatty()
        except (AttributeError, ValueError):  # a closed or unusual stream
            self._plain = True

    def write(self, text: str) -> int:
        if isinstance(text, str):
            out = redact_text(text)
            self._stream.write(ANSI_ESCAPE.sub("", out) if self._plain and "\x1b" in out else out)
        else:
            self._stream.write(text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, buffer, ...
        return getattr(self._stream, name)


def install_log_redaction() -> None:
    """Wraps the formatter of every handler of the root logger and of every logger configured so far."""
    loggers = [logging.getLogger()] + [
        lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in list(logger.handlers):
            if not isinstance(handler.formatter, RedactingFormatter):
                handler.setFormatter(RedactingFormatter(handler.formatter, plain=not _is_terminal(handler)))


def _is_terminal(handler: logging.Handler) -> bool:
    try:
        stream = getattr(handler, "stream", None)  # a StreamHandler's stream (a FileHandler's file: False)
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def install_redaction() -> None:
    """Redacts everything this process writes through Python; safe to call again.

    Redacts everything this process writes through Python: logging handlers and sys.stdout/sys.stderr
    (print, warnings, tracebacks, libraries' own handlers such as MLflow's). Safe to call again."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
    install_log_redaction()
