"""The files a run writes: each output path checked before any work starts, and every output of a run (the model,
its external data, the JSON report) staged beside its target and moved into place together, or not at all.

Why one owner: the checks (an output that is an input, a folder that is missing or read-only, two outputs on one
path) and the commit must agree on the same list of files, for `compress` and `evaluate` alike.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from onnxspfq.errors import OnnxspfqError

# The external data file save_model writes beside an output model (save.save_model names it so)
DATA_SUFFIX = ".data"


def write_error(err: OSError, target: str) -> OnnxspfqError:
    """One line for an OSError met while writing `target` (full disk, read-only file system, no permission)."""
    hint = {errno.ENOSPC: "free some space or write to another folder",
            errno.EDQUOT: "free some space or write to another folder",
            errno.EROFS: "the file system is read-only: write to another folder",
            errno.EACCES: "no permission: write to a folder you can write to",
            errno.EPERM: "no permission: write to a folder you can write to"}.get(err.errno, "write to another folder")
    return OnnxspfqError(f"cannot write {target}: {err.strerror or err}; {hint} (nothing was written)")


def _same(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check(outputs: dict[str, str | None], inputs: list[str]) -> None:
    """Refuse, before any work, output paths that cannot be written or would destroy something.

    outputs: {option: path} (e.g. {"-o": "q.onnx", "--report": "r.json"}; None = not written). inputs: every file
    the run reads (the model, its external data files, calibration files); none may be an output."""
    given = {opt: p for opt, p in outputs.items() if p is not None}
    claimed: dict[str, str] = {}  # what each earlier output writes: "-o" (the model) or "-o data" (its .data file)
    for opt, path in given.items():
        if not str(path).strip():
            raise OnnxspfqError(f"{opt} is an empty path: give a file name")
        if os.path.isdir(path):
            raise OnnxspfqError(f"{opt} {path} is a folder: give a file name inside it")
        own = [path] + ([path + DATA_SUFFIX] if opt == "-o" else [])
        for p in own:
            for src in inputs:
                if _same(p, src):
                    what = "its external data" if p != path else "an input of this run"
                    raise OnnxspfqError(f"{opt} {path} would overwrite {src} ({what}); inputs are never modified: "
                                        f"choose another {opt} path")
            for other_opt, other in claimed.items():
                if _same(p, other):
                    what = f"{other_opt} {other}" if other_opt in given else f"the external data file {other} of -o"
                    raise OnnxspfqError(f"{opt} {path} and {what} are the same file: give each output its own path")
            claimed[opt if p == path else f"{opt} data"] = p
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise OnnxspfqError(f"{opt} {path}: folder {folder} does not exist; create it or choose another path")
        _probe(folder, opt, path)


def _probe(folder: str, opt: str, path: str) -> None:
    """Create and remove a file in `folder`: the only test that sees read-only mounts, ACLs and quotas alike."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".onnxspfq-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OnnxspfqError(f"{opt} {path}: cannot write in {folder} ({err.strerror or err}); choose a folder you "
                            "can write to") from None


@dataclass
class Staging:
    """Temporary folders beside each target; `path(target)` is where to write it, `commit()` moves everything in.

    Commit order: external data, then the targets as given, the model last (a reader that sees the model sees its
    data and its report).
    A failed move puts back what was already moved (and any file it had replaced), so either every output of the
    run exists or none does. Leaving the context removes the temporary folders whatever happened."""

    targets: list[str]
    _dirs: dict[str, str] = field(default_factory=dict)

    def __enter__(self) -> "Staging":
        try:
            for t in self.targets:
                folder = os.path.dirname(os.path.abspath(t))
                if folder not in self._dirs:
                    self._dirs[folder] = tempfile.mkdtemp(dir=folder, prefix=".onnxspfq-", suffix=".tmp")
        except OSError as err:
            self.close()
            raise write_error(err, self.targets[0]) from None
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for d in self._dirs.values():
            shutil.rmtree(d, ignore_errors=True)

    def path(self, target: str) -> str:
        return os.path.join(self._dirs[os.path.dirname(os.path.abspath(target))], os.path.basename(target))

    def commit(self) -> None:
        """Move every staged file of every target into place (see the class docstring)."""
        moves = []  # (staged, final): every target's external data first, then the targets in the order given
        for t in self.targets:
            staged_dir, final_dir = os.path.dirname(self.path(t)), os.path.dirname(os.path.abspath(t))
            data = os.path.basename(t) + DATA_SUFFIX
            moves += [(os.path.join(staged_dir, f), os.path.join(final_dir, f))
                      for f in sorted(os.listdir(staged_dir)) if f.startswith(data)]
        moves += [(self.path(t), os.path.abspath(t)) for t in self.targets]
        done: list[tuple[str, str, str | None]] = []  # (final, staged, backup of what it replaced)
        try:
            for staged, final in moves:
                if not os.path.exists(staged):
                    continue
                backup = None
                if os.path.isdir(final):  # appeared after the checks: never move a folder aside (it would be lost)
                    raise IsADirectoryError(errno.EISDIR, "a folder has this name", final)
                if os.path.exists(final):
                    backup = staged + ".old"
                    os.replace(final, backup)
                os.replace(staged, final)
                done.append((final, staged, backup))
        except OSError as err:
            for final, staged, backup in reversed(done):
                try:
                    os.replace(final, staged)
                    if backup is not None:
                        os.replace(backup, final)
                except OSError:
                    pass
            raise write_error(err, moves[-1][1]) from None
