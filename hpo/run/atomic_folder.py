"""A folder written whole or not at all: built in a staging folder beside it, then renamed into place.

``hpo promote`` builds its model in ``.<output name>.promote-<host>-<pid>-<random>`` beside
``--output`` (:func:`staging_folder`) and renames it onto a missing or empty ``--output`` in
one step (:func:`publish`): no reader ever sees half a model. A killed promote leaves only its
staging folder, which the next promote of that output on this host removes once the pid that
made it is gone (:func:`remove_stale_staging`); a live promote's folder is left alone. Nothing
here knows what the folder holds.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from pathlib import Path

from hpo.errors import HpoError

STAGING_MARK = ".{name}.promote-"
"""Staging folders beside the output: ``.<output name>.promote-<host>-<pid>-<random>``."""


def staging_folder(output: Path) -> Path:
    """A new folder beside ``output`` to build the model in, named after this host and pid
    (so a later promote can tell a dead run's leftovers), with the umask's mode (not 0700)."""
    staging = output.parent / f"{STAGING_MARK.format(name=output.name)}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    return staging


def remove_stale_staging(output: Path) -> list[Path]:
    """Remove the staging folders for ``output`` left by a killed promote on this host
    (their pid is not running); another live promote's folder is left alone."""
    import psutil

    host, removed = socket.gethostname(), []
    for folder in output.parent.glob(f"{STAGING_MARK.format(name=output.name)}*"):
        rest = folder.name.removeprefix(STAGING_MARK.format(name=output.name))
        owner_host, _, tail = rest.rpartition("-")[0].rpartition("-")
        pid = tail
        if folder.is_dir() and owner_host == host and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def publish(staging: Path, output: Path) -> None:
    """Put the finished ``staging`` folder in place as ``output`` in one step: rename(2)
    replaces a missing or *empty* directory atomically, so ``output`` is whole or untouched."""
    try:
        os.replace(staging, output)
    except OSError as error:
        raise HpoError(f"--output {output}: cannot move the finished model there ({error.strerror}); "
                       "it must be missing or an empty folder on the same file system") from None
