"""Walking a source tree: every entry listed, nothing opened that could block, links checked.

A hospital export is not a clean folder of files. `discover` lists every entry that is not a
plain folder (regular files, links of any kind, FIFOs, sockets, devices, folders that cannot be
listed) without opening any of them; `screen` then looks at each with `lstat` and keeps only
regular files (or links to regular files) that stay inside the source root. Everything else gets
a reason, so the report balances and one odd entry never stops the batch:

    FIFO, socket, device            NOT_REGULAR_FILE  (opening a FIFO would block for ever)
    link to a missing target, loop  BROKEN_LINK
    link resolving outside the root OUTSIDE_ROOT      (for every kind of input)
    link to a folder inside root    FOLDER_LINK       (ignored: its files are read where they are)
    folder or entry that cannot be
    listed or stat'ed               UNREADABLE

File names are kept exactly as the OS gives them (names that are not valid UTF-8 hold surrogate
escapes, so `open` finds the file again); `printable` gives the escaped form that reports, the
manifest and logs show.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any

from pipeline.errors import InputRejected, Reason

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str) -> str:
    """`text` with bytes that are not valid UTF-8 shown as \\xNN and control characters escaped.

    A name read from a Linux file system with invalid UTF-8 holds lone surrogates
    (surrogateescape); they cannot be encoded as UTF-8 (JSON files, logs, HTTP). The result is
    plain, printable text; the original bytes are readable from it (\\xe9 is the byte 0xe9).
    """
    if text.isascii() and text.isprintable():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that did not come from the file system
        raw = text.encode("utf-8", "backslashreplace")
    shown = raw.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", shown)


def printable_record(value: Any) -> Any:
    """A JSON-ready structure with every string passed through `printable` (keys included)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): printable_record(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable_record(v) for v in value]
    return value


def rel_path(path: Path, root: Path) -> str:
    """`path` relative to `root`, POSIX separators (the form every message and record uses)."""
    return Path(os.path.relpath(path, root)).as_posix()


def discover(source: Path) -> list[Path]:
    """Every entry under `source` that is not a folder, sorted; nothing is opened or followed.

    Links (to files or folders), FIFOs, sockets and devices are listed like regular files: the
    caller screens them (`screen`). A folder that cannot be listed is itself listed, so it is
    reported rather than silently skipped.
    """
    source = Path(source)
    found: list[Path] = []
    pending = [source]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            if folder == source:
                raise
            found.append(folder)
            continue
        for entry in entries:
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_folder = False
            if is_folder:
                pending.append(Path(entry.path))
            else:
                found.append(Path(entry.path))
    return sorted(found)


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), f"a special file (mode {oct(mode)})")


def _screen_one(path: Path, rel: str, root_real: Path) -> InputRejected | None:
    try:
        st = os.lstat(path)
    except OSError as exc:
        return InputRejected(Reason.UNREADABLE, rel, f"cannot stat the entry: {exc.strerror or exc}")
    link = stat.S_ISLNK(st.st_mode)
    if link:
        try:
            target = path.resolve(strict=True)
        except FileNotFoundError:
            return InputRejected(
                Reason.BROKEN_LINK,
                rel,
                f"a symbolic link to {printable(os.readlink(path))}, which does not exist; not read",
                {"link_target": printable(os.readlink(path))},
            )
        except (RuntimeError, OSError) as exc:  # RuntimeError: Python < 3.13 on a loop
            if isinstance(exc, OSError) and exc.errno not in (errno.ELOOP, None):
                return InputRejected(Reason.UNREADABLE, rel, f"cannot follow the link: {exc.strerror or exc}")
            return InputRejected(
                Reason.BROKEN_LINK, rel, "a symbolic link that loops back on itself; not read", {"loop": True}
            )
        try:
            target.relative_to(root_real)
        except ValueError:
            return InputRejected(
                Reason.OUTSIDE_ROOT,
                rel,
                "a link that resolves outside the source root; not read (copy the file into the source "
                "if it belongs to this batch)",
            )
        try:
            st = os.stat(path)
        except OSError as exc:
            why = exc.strerror or exc
            return InputRejected(Reason.UNREADABLE, rel, f"cannot stat the link's target: {why}")
    if stat.S_ISDIR(st.st_mode):
        if link:
            return InputRejected(
                Reason.FOLDER_LINK,
                rel,
                "a link to a folder inside the source: not followed (its files are read where they are)",
            )
        return InputRejected(
            Reason.UNREADABLE, rel, "a folder that cannot be listed (permissions?); not read"
        )
    if not stat.S_ISREG(st.st_mode):
        what = _kind(st.st_mode)
        return InputRejected(
            Reason.NOT_REGULAR_FILE,
            rel,
            f"{what}{' (through a link)' if link else ''}, not a file: listed, never opened",
            {"kind": what},
        )
    return None


def screen(paths: list[Path], root: Path) -> tuple[list[Path], list[InputRejected]]:
    """Split `discover`'s entries into readable regular files and rejections (module docstring).

    Only `lstat`/`stat` and link resolution are used: no entry is opened here.
    """
    root = Path(root)
    root_real = root.resolve()
    files: list[Path] = []
    rejected: list[InputRejected] = []
    for path in paths:
        err = _screen_one(path, rel_path(path, root), root_real)
        if err is None:
            files.append(path)
        else:
            rejected.append(err)
    return files, rejected
