"""What every command-line entry point shares: logging set up once, and faults as messages.

``run_main(main, argv)`` runs a CLI's body. A fault the user can fix (a bad option or
config, a missing or damaged file, a locked or unwritable run directory) is printed as one
line, ``error: ...``, and exits with status 2; anything else is a bug and exits with status
1, also in one line. ``--debug`` or ``QPF_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from collections.abc import Callable

from qpf.config import ConfigError
from qpf.data import MissingDataError
from qpf.training.checkpoint import CheckpointError
from qpf.training.runlock import RunLockedError

USER_FAULTS = (ConfigError, MissingDataError, CheckpointError, RunLockedError, ValueError)
FAULT_STATUS = 2
BUG_STATUS = 1

_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_QUIET = ("absl", "jax._src.xla_bridge", "orbax", "grain", "etils")


class _TqdmHandler(logging.StreamHandler):
    """Writes records above any tqdm progress bar (``tqdm.write``) on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # never let logging break a run
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once: our handler and format, libraries kept quiet.

    Handlers of the default ``logging.basicConfig`` kind (plain ``StreamHandler``, e.g. left
    by a library calling ``logging.warning`` before us) are replaced; others (pytest's) stay.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler or isinstance(handler, _TqdmHandler):
            root.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Orbax warns through absl about its own option choices (read-only managers); the
    # project logs what matters about checkpoints itself.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:  # absl routes its own records to the root logger once absl.logging is set up
        import absl.logging

        absl.logging.set_verbosity(absl.logging.WARNING)
    except ImportError:
        pass


def debug_requested(argv: list[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("QPF_DEBUG") == "1"


def describe(err: BaseException) -> str:
    """One line for a fault: the message, or for OS errors the path, the reason and a fix."""
    if isinstance(err, OSError) and not isinstance(err, MissingDataError) and err.filename:
        fix = {
            errno.EROFS: "the file system is read-only: choose a writable --run-dir",
            errno.EACCES: "permission denied: choose a writable --run-dir or fix permissions",
            errno.EPERM: "not permitted: choose a writable --run-dir or fix permissions",
            errno.ENOTDIR: "a part of this path is a file, not a folder: choose another path",
            errno.ENOSPC: "the disk is full: free space or choose another --run-dir",
            errno.ENOENT: "no such file or folder: check the path",
        }.get(err.errno or 0, "check the path")
        return f"cannot use {err.filename}: {err.strerror or err} ({fix})"
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON ({err})"
    text = " ".join(str(err).split()) if str(err) else type(err).__name__
    return text


def run_main(body: Callable[[], int], argv: list[str] | None = None) -> int:
    """``body()``'s status; faults become one ``error:`` line on stderr (see module doc)."""
    if debug_requested(argv):
        return body()
    try:
        return body()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (*USER_FAULTS, OSError) as err:
        print(f"error: {describe(err)}", file=sys.stderr)
        return FAULT_STATUS
    except Exception as err:
        print(
            f"error: internal error {type(err).__name__}: {describe(err)} (a bug; rerun with "
            "--debug or QPF_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return BUG_STATUS
