"""Files written whole or not at all.

Everything localkv saves (profiles, conversations, plots, the assembled model, bench references) goes
through `atomic_write`: it writes a temporary file beside the target, puts it on disk, then renames it
over the target, so a crash, a full disk or Ctrl-C leaves the old file (or none), never half of a new one,
and no temporary file behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator, Union

Writer = Callable[[IO], object]


def atomic_write(path: str | Path, data: Union[str, bytes, Writer], *, binary: bool = False,
                 temp: Path | None = None) -> None:
    """Write `path` whole or not at all. `data`: text (UTF-8), bytes, or a function that writes to the open
    file (a text file unless `binary`). `temp`: the temporary file's name, when the caller cleans up ones a
    killed process left (by default a unique hidden name beside `path`)."""
    if isinstance(data, (str, bytes)):
        binary = isinstance(data, bytes)
        write = lambda f: f.write(data)  # noqa: E731
    else:
        write = data
    with written_aside(Path(path), temp=temp) as tmp:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible


@contextlib.contextmanager
def written_aside(path: Path, *, directory: bool = False, temp: Path | None = None) -> Iterator[Path]:
    """A temporary path beside `path` (a file, or a directory with `directory`) for the block to fill; renamed
    over `path` when the block ends, removed when it raises (Ctrl-C included)."""
    if temp is not None:
        tmp = temp
    elif directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    """Put the rename itself on disk (where the file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
