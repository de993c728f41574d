"""Where a command may write: never over a file or folder it did not create as its own output.

Every command that writes somewhere the user names (`export --out`, `data dedup|scrub|split|contamination --out`,
`eval.output_dir`, train's `output_dir`) asks here first, before it writes anything. A destination is accepted
when it is new or empty, or when it is an earlier output of the same command, which the command marked:

- a folder output holds MARKER (`.ftcluster-output.json`): the command and the names it writes there. The folder
  counts as the command's own only while it holds nothing else (a file the user added makes it foreign again);
- a file output (or a saved dataset folder written by a data tool) gets a sidecar `<out>.ftcluster.json` beside
  it: the command, and the size and modification time (a folder: its files and sizes) of everything it wrote,
  so a file replaced by hand since is foreign again.

An earlier output is replaced only on request (`--overwrite`; `ftcluster eval` replaces its own earlier report
as it always has). Whatever else is there (the input, a training run, files of the user's) is refused with one
line naming the path and what to do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

from ftcluster.errors import ConfigError, UserError
from ftcluster.util import atomic

MARKER = ".ftcluster-output.json"
SIDECAR = ".ftcluster.json"
# Names the atomic writers use beside a destination while it is being written.
_PENDING = (atomic.PENDING_PREFIX, atomic.OLD_PREFIX)
_SHOWN = 3


def is_run(folder: Path) -> bool:
    """An ftcluster training run: its config.yaml and manifest.json, or the marker its driver writes first."""
    return ((folder / "config.yaml").is_file() and (folder / "manifest.json").is_file()) \
        or (read_marker(folder) or {}).get("command") == "train"


def read_marker(folder: Path) -> dict | None:
    return _read_json(folder / MARKER)


def mark_folder(folder: Path, command: str, names: Iterable[str] | None = None) -> None:
    """Record `folder` as `command`'s output; `names`: what it writes there (default: what it holds now)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(set(names) if names is not None else {p.name for p in folder.iterdir() if p.name != MARKER})
    _write_json(folder / MARKER, {"command": command, "names": names, "written_at": _now()})


def claim_folder(out: Path, command: str, *, option: str, inputs: Iterable[str | Path] = (),
                 overwrite: bool = False, overwrite_hint: str = "--overwrite") -> None:
    """Refuse `out` unless it is new, empty, or `command`'s own earlier output and `overwrite` is set."""
    out = Path(out).resolve()
    _check_inputs(out, inputs, option)
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{option} {out} is a file, not a folder; choose a new or empty folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if is_run(out):
        raise UserError(f"{option} {out} holds an ftcluster training run, which {command} would write into; "
                        f"choose a new or empty folder")
    marker = read_marker(out) or {}
    ours = set(marker.get("names", [])) if marker.get("command") == command else set()
    foreign = [name for name in entries if name != MARKER and not _pending_of(name, ours) and name not in ours]
    if marker.get("command") != command or foreign:
        listed = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
        raise UserError(f"{option} {out} is not empty and holds files {command} did not write ({listed or MARKER}); "
                        f"choose a new or empty folder")
    if not overwrite:
        raise UserError(f"{option} {out} holds an earlier output of {command}; pass {overwrite_hint} to replace it, "
                        f"or choose a new or empty folder")


def claim_files(paths: Iterable[Path], command: str, *, option: str, inputs: Iterable[str | Path] = (),
                overwrite: bool = False) -> None:
    """The same for outputs that sit among other files: `paths[0]` is the output, the rest its reports beside it.
    Each that exists must be what `command` wrote there (its sidecar says so) and `overwrite` set."""
    paths = [Path(p).resolve() for p in paths]
    for path in paths:
        _check_inputs(path, inputs, option)
    sidecar = sidecar_of(paths[0])
    record = _read_json(sidecar)
    written = record.get("written", {}) if record and record.get("command") == command else {}
    if sidecar.exists() and not written:
        raise UserError(f"{option} {paths[0]}: {sidecar} exists and was not written by {command}; choose another "
                        f"{option}")
    earlier = []
    for path in paths:
        if (not path.exists() and not path.is_symlink()) or (path.is_dir() and not any(path.iterdir())):
            continue
        if written.get(path.name) != _fingerprint(path):
            what = "an ftcluster training run" if path.is_dir() and is_run(path) else \
                f"{'a folder' if path.is_dir() else 'a file'} that {command} did not write (or that changed since)"
            raise UserError(f"{option} {paths[0]}: {path} already exists and is {what}; choose another {option}")
        earlier.append(path)
    if earlier and not overwrite:
        raise UserError(f"{option} {paths[0]}: {earlier[0]} is an earlier output of {command}; pass --overwrite to "
                        f"replace it, or choose another {option}")


def mark_files(paths: Iterable[Path], command: str) -> None:
    """After writing them: the sidecar that lets claim_files recognise `paths` as `command`'s output."""
    paths = [Path(p) for p in paths]
    _write_json(sidecar_of(paths[0]), {"command": command, "written_at": _now(),
                                       "written": {p.name: _fingerprint(p) for p in paths if p.exists()}})


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR)


def check_run_dir(value, also_ours: Iterable[str] = ()) -> Path:
    """Train's output_dir: set, and new, empty, or an ftcluster run. `also_ours`: names ftcluster itself leaves in a
    run folder before its run starts (a lock, a sweep trial's record). Returns the resolved path."""
    if value is None or not str(value).strip():
        raise ConfigError("output_dir", "is empty, which would train in the current folder; set output_dir=DIR "
                                        "to a new folder, or to an earlier run to continue it (resume=auto)")
    out = Path(str(value)).resolve()
    if not out.exists():
        return out
    if not out.is_dir():
        raise ConfigError("output_dir", f"{out} is a file; set output_dir to a new folder")
    if is_run(out):
        return out
    ours = {MARKER, *also_ours}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(_PENDING))
    if foreign:
        listed = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
        raise ConfigError("output_dir", f"{out} is not empty and is not an ftcluster run (it holds {listed}); "
                                        f"set output_dir to a new or empty folder")
    return out


def _check_inputs(out: Path, inputs: Iterable[str | Path], option: str) -> None:
    for given in inputs:
        src = Path(given).resolve()
        if out == src:
            raise UserError(f"{option} {out} would overwrite the input {given}; write the result somewhere else")
        if out in src.parents:
            raise UserError(f"{option} {out} would overwrite the input {given}, which it holds; write the result "
                            f"somewhere else")
        if src in out.parents:
            raise UserError(f"{option} {out} is inside the input {given}, which writing there would change; "
                            f"write the result somewhere else")


def _pending_of(name: str, ours: set[str]) -> bool:
    return any(name.startswith(prefix) and name[len(prefix):] in ours for prefix in _PENDING)


def _fingerprint(path: Path):
    if path.is_dir():
        return sorted([str(p.relative_to(path)), p.stat().st_size] for p in path.rglob("*") if p.is_file())
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_json(path: Path) -> dict | None:
    try:
        if not path.is_file() or path.stat().st_size > 2**20:  # a marker is small; anything big is not ours
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, indent=2) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
