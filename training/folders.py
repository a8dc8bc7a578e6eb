"""Folders that appear whole or not at all: build in a staging folder beside the target, then
swap it in with renames, and clear the staging folders of processes that were killed."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path


def staging_folder(target: Path) -> Path:
    """An empty staging folder for `target` (``.NAME.tmp-PID`` beside it), after clearing
    what killed writers of `target` left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target)
    out = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    return out


def remove_orphans(target: Path) -> None:
    """Remove the staging folders (`.NAME.tmp-PID`, `.NAME.old-PID`) of writes whose process
    is gone. A writer killed between its two renames left `target` missing and the previous
    version as `.NAME.old-PID`: that one is put back instead of removed."""
    for p in sorted(target.parent.glob(f".{glob.escape(target.name)}.*-*")):
        kind, _, pid = p.name.removeprefix(f".{target.name}.").partition("-")
        # One of this process's own pid is another's that had it (a container's restarts
        # repeat pids): this process has not begun its write yet.
        if kind not in ("tmp", "old") or not pid.isdigit() or (
                int(pid) != os.getpid() and _alive(int(pid))):
            continue
        if kind == "old" and not target.exists():
            p.rename(target)
        else:
            shutil.rmtree(p, ignore_errors=True)


def replace_folder(new: Path, target: Path, *, carry_over: bool = False) -> None:
    """Put the finished folder `new` in `target`'s place (the old one is removed after).

    `carry_over`: the entries of the old folder that `new` does not hold are moved into it
    first (files a user put beside the written ones stay)."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if carry_over and target.is_dir():
        for entry in target.iterdir():
            if not (new / entry.name).exists() and not (new / entry.name).is_symlink():
                entry.rename(new / entry.name)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
