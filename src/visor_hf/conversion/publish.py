"""Writing a conversion's output folder without ever losing data (see `docs/conversion.md`, "Safe output").

The output is written into a fresh hidden folder next to DST (`.DST.tmp-XXXXXXXX`) and published with one atomic
rename:

- a new DST is published with `renameat2(RENAME_NOREPLACE)`: a DST that appears while the conversion runs (made by
  anyone) is never replaced, the conversion fails instead;
- `--overwrite` swaps the new folder and the old DST with `renameat2(RENAME_EXCHANGE)` (DST never goes missing), then
  deletes the old output; it only ever replaces a folder that holds a VISOR or LLaVA-OneVision checkpoint (or an
  empty folder);
- one conversion at a time writes a given DST: each holds an advisory lock (`flock`) on `.DST.lock`, released by the
  kernel when the process dies, so a killed run never blocks the next one;
- hidden folders left by killed runs (`.DST.tmp-*`, `.DST.old-*`) are cleaned up by the next conversion to DST, which
  first puts an old output back if DST is missing (only possible where `RENAME_EXCHANGE` is not available).

Where the kernel has no `renameat2` (not Linux, or a file system without it) the same steps fall back to a check
followed by `os.rename` (and, for `--overwrite`, two renames): the lock still keeps two conversions apart.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..logging_utils import get_logger
from .errors import ConversionError

logger = get_logger(__name__)

# model types a `--overwrite` may replace: the converter's own output and its source
REPLACEABLE_MODEL_TYPES = ("visor", "llava_onevision")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


class OutputError(ConversionError):
    """The output folder cannot be written or published without risking someone's data."""


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """`renameat2(src, dst, flags)`; `False` when the kernel, libc or file system does not offer it."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    function = getattr(libc, "renameat2", None)
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # unsupported here: the caller falls back
        return False
    raise OSError(code, os.strerror(code), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move `src` to `dst`, failing with `FileExistsError` if `dst` exists (even an empty folder) at that moment."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(f"output {dst} appeared while the conversion ran; it is left untouched") from error
        raise
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"output {dst} appeared while the conversion ran; it is left untouched")
    os.rename(src, dst)


def exchange(new: Path, dst: Path, old: Path) -> None:
    """Put `new` at `dst` and the previous `dst` at `old` (atomically where the kernel can swap two paths)."""
    if _renameat2(new, dst, _RENAME_EXCHANGE):
        os.rename(new, old)  # `new` now names the previous output
        return
    os.rename(dst, old)
    try:
        os.rename(new, dst)
    except BaseException:
        os.rename(old, dst)
        raise


def describe_checkpoint(folder: Path) -> str | None:
    """Why `folder` may not be replaced by `--overwrite`, or `None` when it may (a VISOR or LLaVA-OneVision
    checkpoint, or an empty folder)."""
    if not folder.is_dir():
        return "it is not a folder"
    entries = [p for p in folder.iterdir()]
    if not entries:
        return None
    config = folder / "config.json"
    if not config.is_file():
        return "it holds no config.json, so it is not a model checkpoint"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return "its config.json is not a valid model config"
    if model_type not in REPLACEABLE_MODEL_TYPES:
        return f"its config.json has model_type {model_type!r}, not a VISOR or LLaVA-OneVision checkpoint"
    return None


def check_output(dst: Path, overwrite: bool) -> None:
    """Refuse, before anything is loaded, an output that exists (without `overwrite`) or that `overwrite` must not
    replace, and an output folder that cannot be created."""
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise FileExistsError(f"output {dst} already exists; pass overwrite=True (--overwrite) to replace it")
        reason = describe_checkpoint(dst)
        if reason is not None:
            raise OutputError(
                f"--overwrite refuses to replace {dst}: {reason}. Only a VISOR or LLaVA-OneVision checkpoint folder is "
                "replaced; remove it yourself or choose another output"
            )
    parent = dst.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {dst}: {parent} is a file, not a folder")


def _lock_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.lock"


@contextmanager
def output_lock(dst: Path) -> Iterator[None]:
    """Hold the advisory lock of `dst` for the body; a second conversion to `dst` fails at once with `OutputError`."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename is the only guard
        yield
        return
    path = _lock_path(dst)
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise OutputError(f"another conversion is writing {dst} right now (it holds {path}); wait for it to end") from None
        # the lock file may have been removed by the previous holder between our open and our flock: retry then
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def leftovers(dst: Path) -> list[Path]:
    """Hidden folders of earlier conversions to `dst` (temporary outputs and old outputs set aside)."""
    if not dst.parent.is_dir():
        return []
    prefixes = (f".{dst.name}.tmp-", f".{dst.name}.old-")
    return sorted(p for p in dst.parent.iterdir() if p.name.startswith(prefixes) and p.is_dir() and not p.is_symlink())


def clean_leftovers(dst: Path) -> list[str]:
    """Recover from killed conversions to `dst` (call with the lock held, so no live conversion owns them): an old
    output set aside while DST is missing is put back; every other leftover is deleted. Returns what was done."""
    done = []
    stale = leftovers(dst)
    if not (dst.exists() or dst.is_symlink()):
        olds = [p for p in stale if p.name.startswith(f".{dst.name}.old-")]
        if olds:
            newest = max(olds, key=lambda p: p.stat().st_mtime)
            os.rename(newest, dst)
            done.append(f"restored {dst} from {newest.name} (a conversion was killed while replacing it)")
            stale.remove(newest)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path.name} left by a killed conversion")
    for line in done:
        logger.warning("%s", line)
    return done


@contextmanager
def staged_output(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Lock `dst`, recover leftovers, and give a fresh temporary folder next to it; the caller fills it, then
    `publish(tmp, dst, overwrite)`. On any error the temporary folder is removed and `dst` is left as it was."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(dst):
            clean_leftovers(dst)
            check_output(dst, overwrite)  # again: a leftover may have been restored
            tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                yield tmp
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    except PermissionError as error:
        raise OutputError(f"cannot write the output {dst}: {error}") from error


def publish(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Make the finished `tmp` folder the output `dst` (see the module docstring for the guarantees)."""
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise FileExistsError(f"output {dst} appeared while the conversion ran; it is left untouched")
        check_output(dst, overwrite)  # what is there now must still be a checkpoint
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        exchange(tmp, dst, old)
        shutil.rmtree(old, ignore_errors=True)
    else:
        rename_noreplace(tmp, dst)


__all__ = ["OutputError", "check_output", "clean_leftovers", "describe_checkpoint", "publish", "staged_output"]
