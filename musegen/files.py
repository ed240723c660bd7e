"""Files a user hands us, read safely; files we write, replaced atomically.

Any path that comes from outside (a corpus folder, `--prompt`, `--samples`, an archive) may be
a FIFO (opening it blocks forever), a link to a device (`/dev/zero` has size 0 and never ends),
a folder, unreadable, vanished, or far too large. `open_regular` is the one gate every reader
goes through: the path must name a regular file (a link to one is fine: DVC's symlink cache
uses them); it is checked with stat() before it is opened, so a device or FIFO is never
opened at all, then opened with O_NONBLOCK (a FIFO swapped in meanwhile cannot block) and
checked again on the descriptor (same inode, still regular, size within the limit) so what is
read is what was checked. `read_regular` reads at most the limit, so a file that grows while
it is read is still bounded.

File names need not be UTF-8 (a Latin-1 `café.mid` is the byte 0xE9): Python gives such names
as str with surrogate escapes, which cannot be written as UTF-8 text. `printable` turns a name
into text that is valid UTF-8, readable and reversible (`from_printable` gives the name back).

`write_atomic` / `replacing` write beside the target under a unique hidden name and rename it
over the target, so a reader never sees half a file and two writers never share a temp file.

`write_headline` writes the few figures of a stage that `dvc metrics show` prints (headline.json,
declared under `metrics:` in dvc.yaml) beside the stage's full report (a plain output).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

#: the file beside a stage's report that dvc.yaml declares under `metrics:`
HEADLINE = "headline.json"
#: the figures headlines hold, each written by one stage: prepare's ok pieces, tokenize's CP
#: words, train's best valid loss, sweep's best and tune's best proxy score (valid split), the
#: STEP select chose, evaluate's proxy score on the test split. Few in all (`dvc metrics show`
#: prints a column per name) and none shared (`dvc exp show` puts the file path before a name
#: two files share), so both tables stay within 120 columns.
HEADLINE_KEYS = (
    "pieces", "words", "valid_loss", "sweep_score", "step", "tune_score", "test_score"
)  # fmt: skip

#: reason codes FileRefusedError may carry
REASONS = ("missing", "not_regular", "unreadable", "too_large")

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class FileRefusedError(ValueError):
    """A path that is not a readable regular file within the size limit."""

    def __init__(self, path: Path | str, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        self.path, self.reason, self.detail = printable(path), reason, detail
        super().__init__(f"{self.path}: {detail}")


def printable(path: Path | str) -> str:
    """A file name as valid, printable UTF-8 text, reversible with `from_printable`.

    Bytes that are not UTF-8 become ``\\xNN``, control characters (a newline in a name)
    ``\\xNN`` too, and a backslash is doubled, so every name maps to exactly one text.
    """
    text = os.fsencode(path).decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def from_printable(text: str) -> str:
    """The file name (str, surrogate-escaped where not UTF-8) that `printable` turned into text."""
    out, pos = bytearray(), 0
    for match in _ESCAPE.finditer(text):
        out += text[pos : match.start()].encode()
        code = match.group(1)
        out += b"\\" if code == "\\" else bytes([int(code[1:], 16)])
        pos = match.end()
    out += text[pos:].encode()
    return os.fsdecode(bytes(out))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


@contextlib.contextmanager
def open_regular(path: Path | str, max_bytes: int | None = None) -> Iterator[tuple[BinaryIO, int]]:
    """Open a user's file for reading after checking it is a regular file within `max_bytes`.

    Yields:
        (binary file object, size in bytes from fstat on the opened descriptor).

    Raises:
        FileRefusedError: missing, not a regular file (folder, FIFO, device, socket, or a link to
            one), unreadable (permissions, I/O error, link loop), or over `max_bytes`.
    """
    path = Path(path)
    try:
        before = path.stat()  # follows links: a link to a regular file is a regular file
    except FileNotFoundError as exc:
        what = "a link to nothing" if path.is_symlink() else "no such file"
        raise FileRefusedError(path, "missing", what) from exc
    except OSError as exc:
        raise FileRefusedError(path, "unreadable", f"cannot stat: {exc.strerror}") from exc
    if not stat.S_ISREG(before.st_mode):  # checked before open(): a FIFO or device is never opened
        raise FileRefusedError(path, "not_regular", f"{_kind(before.st_mode)}, not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise FileRefusedError(path, "unreadable", f"cannot open: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fh:
        now = os.fstat(fd)  # the descriptor: what we read is what we checked
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (
            before.st_dev,
            before.st_ino,
        ):
            raise FileRefusedError(
                path, "not_regular", "replaced by another file while being opened"
            )
        if max_bytes is not None and now.st_size > max_bytes:
            raise FileRefusedError(
                path, "too_large", f"{_mb(now.st_size)} exceeds {_mb(max_bytes)}"
            )
        yield fh, now.st_size


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def read_regular(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of a user's regular file, at most `max_bytes` (see `open_regular`).

    Raises:
        FileRefusedError: as `open_regular`; also too_large when the file grew past the limit
            while it was read.
    """
    with open_regular(path, max_bytes) as (fh, _):
        try:
            data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise FileRefusedError(path, "unreadable", f"cannot read: {exc.strerror}") from exc
    if len(data) > max_bytes:
        raise FileRefusedError(path, "too_large", f"grew past {_mb(max_bytes)} while being read")
    return data


def temp_name(path: Path | str) -> Path:
    """A unique hidden temp path beside `path`, keeping its suffix (np.save adds .npy otherwise)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


@contextlib.contextmanager
def replacing(path: Path | str) -> Iterator[Path]:
    """Yield a unique temp path beside `path`; on success rename it over `path`, else delete it.

    For writers that need a path (np.save, torch.save, a subprocess); `write_atomic` for text
    and bytes.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        tmp.replace(path)  # atomic on POSIX and Windows within one filesystem
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path | str, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically: readers see the old or the new file."""
    with replacing(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def write_headline(report: Path | str, **figures: float | None) -> Path:
    """Write the figures a person compares across experiments to headline.json beside `report`.

    `report` keeps every detail (readers use it); the headline holds a few of HEADLINE_KEYS
    (None values are left out) for `dvc metrics show` and `dvc exp show`.

    Raises:
        ValueError: a figure name outside HEADLINE_KEYS.
    """
    unknown = sorted(set(figures) - set(HEADLINE_KEYS))
    if unknown:
        raise ValueError(f"headline figures {unknown}: use names from {HEADLINE_KEYS}")
    path = Path(report).with_name(HEADLINE)
    kept = {k: v for k, v in figures.items() if v is not None}
    return write_atomic(path, json.dumps(kept, indent=2) + "\n")
