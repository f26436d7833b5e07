"""The one contract for bad input: one line, exit code 2, on every rank, before any rank waits.

Everything a user supplies (the config file and overrides, model paths and hub ids, tokenizers,
GGUF files, data and prompt files, adapter and checkpoint dirs, grid files, ``run.output_dir``)
is checked before the first collective. A problem is an :class:`InputError` (the project's own
``ConfigError``, ``ModelLoadError``, ``DataError``, ... all derive from it) whose text starts with
the key or file it came from, and the command line prints it as::

    fedsea: error: <key or file>: <what is wrong>; <what is allowed>

on stderr and exits :data:`EXIT_USAGE`. No traceback unless ``FEDSEA_DEBUG=1``. A library's own
exception from reading user input (``FileNotFoundError``, ``json.JSONDecodeError``, a
``safetensors`` or ``transformers`` error, ...) is wrapped by :func:`from_input` with the key it
came from; anything else escaping is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager

EXIT_USAGE = 2
DEBUG_ENV = "FEDSEA_DEBUG"
MAX_LINE = 400  # characters of a foreign error's first line kept in the message


class InputError(ValueError):
    """Bad user input. ``str()`` is one line that starts with the key or file to fix."""


def one_line(e: BaseException) -> str:
    """The first non-empty line of ``e``'s message (its type's name when there is none)."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.strerror}: {e.filename}"  # FileNotFoundError(2, ...): '[Errno 2] ...' reads worse
    text = text or type(e).__name__
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "..."


def _foreign_input_errors() -> tuple[type[BaseException], ...]:
    """What reading a user's file or model can raise from the libraries below us."""
    kinds: list[type[BaseException]] = [OSError, ValueError, UnicodeError, LookupError, TypeError, EOFError]
    try:
        import yaml

        kinds.append(yaml.YAMLError)
    except ImportError:  # pragma: no cover - yaml is a dependency
        pass
    try:
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(kinds)


@contextmanager
def from_input(key: str, allowed: str = ""):
    """Inside this block, a library's error from reading the user's ``key`` becomes an
    :class:`InputError` ``"<key>: <its first line>[; allowed: <allowed>]"``. The project's own
    :class:`InputError` passes through unchanged (it already names its key)."""
    try:
        yield
    except InputError:
        raise
    except _foreign_input_errors() as e:
        tail = f"; allowed: {allowed}" if allowed else ""
        raise InputError(f"{key}: {one_line(e)}{tail}") from e


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report(e: BaseException, prefix: str = "") -> int:
    """Print ``e`` as the one-line error (the traceback too under ``FEDSEA_DEBUG=1``); return 2."""
    if debug():
        traceback.print_exception(e, file=sys.stderr)
    line = " ".join(str(e).split("\n")[0].split()) or type(e).__name__
    sys.stderr.flush()
    os.write(2, f"{prefix}fedsea: error: {line}\n".encode())
    return EXIT_USAGE
