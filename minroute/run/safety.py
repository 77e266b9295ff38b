"""What keeps a run safe to use for days: user errors as one line, file hashes, a run-folder lock,
checked numbers.

- `UserError` (a ValueError), `MissingFile` (also a FileNotFoundError) and `WriteError` (also an
  OSError) are mistakes a user can fix: a bad path, a corrupt file, mismatched data, a full disk.
  The scripts end them with one line `error: ...` and exit code 2 (`run_cli`); so does an OSError
  that names a file (the operating system refused a path: permissions, a read-only or full file
  system). A closed stdout (`| head`) ends quietly. Any other exception is an internal bug and keeps
  its traceback.
- `ArgumentParser`: argparse with its errors as one line `error: --flag: ...` (exit code 2), no
  usage block.
- `file_records` / `verify_files`: size and sha256 of the files a manifest or checkpoint promises,
  checked on load so that a corrupt, truncated or swapped file is named instead of silently used.
- `RunLock`: an exclusive, non-blocking `flock` on `<run>/.lock`, so two processes never write one
  run. The kernel drops it when the process dies (also on SIGKILL), so a crash never leaves a stale
  lock.
- argparse types that refuse impossible numbers up front (`positive_int`, `positive_float`,
  `seed_int`, ...; ASCII digits only, finite), and `device` which refuses `cuda` on a machine
  without CUDA.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import sys
from pathlib import Path


class UserError(ValueError):
    """A mistake the user can fix (bad path, file, setting or data); the message says what to do."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder that should exist does not; the message names it."""


class WriteError(UserError, OSError):
    """The operating system refused a write (full disk, read-only folder); the message names the
    path."""


def os_cause(e: BaseException) -> str:
    """What the operating system said, without the errno noise: 'No space left on device'."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def run_cli(main, argv=None) -> int:
    """Run a script's main: a UserError, or an OSError naming a file, becomes one line `error: ...`
    on stderr and exit code 2, without a traceback."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the reader of stdout went away (`| head`): stop quietly, as Unix tools do
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except OSError as e:
        if not e.filename:
            raise
        names = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
        print(
            f"error: {names}: {os_cause(e)}; check that the path is right, that its folder is"
            " writable and that the disk has space",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_records(root, names) -> dict[str, dict]:
    """{relative name: {"bytes", "sha256"}} of files under root."""
    root = Path(root)
    return {n: {"bytes": (root / n).stat().st_size, "sha256": sha256_file(root / n)} for n in names}


def verify_files(
    root, records: dict[str, dict], what: str, fix: str = "restore it or rebuild the folder"
):
    """Check that every recorded file exists with its size and sha256; name the first one that does
    not."""
    root = Path(root)
    for name, rec in records.items():
        path = root / name
        if not path.is_file():
            raise MissingFile(f"{path}: missing ({what} lists it); the {what} is incomplete")
        if path.stat().st_size != rec["bytes"] or sha256_file(path) != rec["sha256"]:
            raise UserError(
                f"{path}: size or sha256 does not match the {what} (corrupt, truncated or replaced "
                f"file); {fix}"
            )


class FileLock:
    """Exclusive, non-blocking flock on `path` for the life of the process, until release, or as a
    `with` block; a second holder is refused with one line naming `what` and the pid that holds it.
    """

    def __init__(self, path, what: str, remove: bool = True):
        self.path, self.remove = Path(path), remove
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                f"{what}: cannot create the lock file {self.path} ({e.strerror})"
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            holder = self.path.read_text().strip() or "another process"
            raise UserError(
                f"{what} is being written by {holder}; wait for it to finish or use another folder"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()}\n".encode())

    def release(self):
        if self.fd is not None:
            if self.remove:
                self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class RunLock(FileLock):
    """Exclusive lock on a run folder (`<run>/.lock`, kept) for the life of the process (or until
    release)."""

    def __init__(self, run_dir):
        super().__init__(Path(run_dir) / ".lock", str(run_dir), remove=False)


# ----------------------------------------------------------------------------- argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: --flag: what is wrong; see --help` (exit 2)."""

    def error(self, message):
        message = message.removeprefix("argument ")
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _number(kind, test, what):
    def parse(text: str):
        try:
            # int() and float() also take other scripts' digits ('\u0663') and full-width ones
            if not text.isascii():
                raise ValueError
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}"
            ) from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value

    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v > 0, "a whole number > 0")
nonneg_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
positive_float = _number(float, lambda v: v > 0 and v < float("inf"), "a number > 0")
nonneg_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
probability = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
fraction = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
# numpy's default_rng and torch.manual_seed take it, and so do the seeds derived from it
SEED_LIMIT = 2**32
seed_int = _number(int, lambda v: 0 <= v < SEED_LIMIT, f"a whole number from 0 to {SEED_LIMIT - 1}")


def device(text: str) -> str:
    """'cpu', 'cuda' or 'cuda:N'; refuses CUDA where torch has none."""
    import torch

    if text == "cpu":
        return text
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has no CUDA device (torch "
                f"{torch.__version__}); use --device cpu"
            )
        idx = text.partition(":")[2]
        if idx and (not idx.isdigit() or int(idx) >= torch.cuda.device_count()):
            raise argparse.ArgumentTypeError(
                f"{text!r}: there are {torch.cuda.device_count()} CUDA devices"
            )
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda or cuda:N")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
