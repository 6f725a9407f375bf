"""Writing outputs so that nothing is lost: lathe's one atomic writer and its output checks.

- atomic_dir / atomic_file: write under a temporary name beside the output (`.OUT.tmp-PID-*`),
  fsync, then rename into place; a folder being replaced is first renamed to `.OUT.old-PID`
  and removed only once the new one is in place. Permissions follow the umask (0755/0644 by
  default), never mkdtemp's 0700/0600: a serving container running as another user reads them.
- check_output: refuses (BadInput) an output that exists and is not a previous lathe output of
  the same kind (--force overrides that case only), that contains a source, that lies inside a
  source file, or that is the working folder or one of its parents.
- claim: check_output, then an fcntl lock on `OUT.lock` (a second run on the same output exits
  at once: "OUT is being written by pid N"), then recovery of an interrupted earlier run
  (`.OUT.old-*` put back when OUT is missing, stale temp folders whose process is gone removed).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from lathe.errors import BadInput

MANIFEST = "lathe_manifest.json"
# A kind names what lathe writes at an output path; a path holding something else is refused.
KINDS = ("compressed", "compressed-tensors", "onnx", "onnx-folder", "engine", "report-dir", "json")
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)(-[0-9a-f]+)?$")


# ----------------------------------------------------------------------------- permissions


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask


def _chmod_default(path: Path, is_dir: bool):
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _fsync_path(path: Path, is_dir: bool):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if is_dir else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(out: Path, what: str = "tmp") -> Path:
    return out.parent / f".{out.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _disk_error(e: OSError, out: Path):
    """OS errors that come from the machine (disk full, read-only, permissions) are the
    user's environment, not a lathe bug: BadInput (exit 2)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG):
        return BadInput(f"cannot write {out}: {e.strerror}")
    return None


def _safetensors_disk_error(e: Exception, out: Path):
    # safetensors wraps the OS error in SafetensorError ("No space left on device ...")
    if type(e).__name__ == "SafetensorError" or isinstance(e, OSError):
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return BadInput(f"cannot write {out}: {msg}")
    return None


# ----------------------------------------------------------------------------- atomic writers


@contextlib.contextmanager
def atomic_dir(out):
    """Yields a temp folder beside `out`; on success swaps it into place (the previous output
    survives any crash: it is either at `out` or, between the two renames, at `.OUT.old-PID`,
    which the next run's `recover` puts back)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out)
    tmp.mkdir()
    _chmod_default(tmp, True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_symlink():
                continue
            # the umask's permissions for everything (safetensors writes 0600 files)
            _chmod_default(f, f.is_dir())
            if f.is_file():
                _fsync_path(f, False)
        _fsync_path(tmp, True)
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            _remove(old)
            os.replace(out, old)
        os.replace(tmp, out)
        _fsync_path(out.parent, True)
        if old is not None:
            _remove(old)
        completed.append(out)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, Exception):
            err = _disk_error(e, out) if isinstance(e, OSError) else _safetensors_disk_error(e, out)
            if err is not None:
                raise err from None
        raise


@contextlib.contextmanager
def atomic_file(out):
    """Yields a temp file path beside `out` (not yet created), renamed over `out` on success."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out)
    try:
        yield tmp
        _chmod_default(tmp, False)
        _fsync_path(tmp, False)
        os.replace(tmp, out)
        _fsync_path(out.parent, True)
        completed.append(out)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, OSError):
            err = _disk_error(e, out)
            if err is not None:
                raise err from None
        raise


@contextlib.contextmanager
def temp_dir_beside(out):
    """A scratch folder beside `out` (same file system, so its files can be renamed into
    place), removed on exit."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        _remove(tmp)


def write_bytes(out, data: bytes):
    with atomic_file(out) as tmp:
        tmp.write_bytes(data)
    return Path(out)


def write_text(out, text: str):
    with atomic_file(out) as tmp:
        tmp.write_text(text)
    return Path(out)


# Outputs renamed into place by this process (the CLI: a Ctrl-C after them exits 0).
completed: list[Path] = []


# ----------------------------------------------------------------------------- output checks


def kind_of(path: Path) -> str | None:
    """What lathe output `path` holds, or None when it is not one lathe writes."""
    try:
        if path.is_dir():
            if (path / MANIFEST).is_file():
                return "compressed"
            cfg = path / "config.json"
            if cfg.is_file():
                with contextlib.suppress(ValueError, OSError):
                    q = json.loads(cfg.read_text()).get("quantization_config") or {}
                    if isinstance(q, dict) and q.get("quant_method") == "compressed-tensors":
                        return "compressed-tensors"
            if (path / "model.onnx").is_file() and kind_of(path / "model.onnx") == "onnx":
                return "onnx-folder"  # lathe export -o DIR (Optimum layout)
            if (path / "report.json").is_file() and kind_of(path / "report.json") == "json":
                return "report-dir"
            return None
        if path.is_file():
            with open(path, "rb") as f:
                head = f.read(64)
            if b"\x12\x05lathe" in head[:32]:  # ModelProto.producer_name = "lathe" (save_ir)
                return "onnx"
            if head.lstrip()[:1] == b"{":
                with contextlib.suppress(ValueError, OSError):
                    d = json.loads(path.read_text())
                    if isinstance(d, dict) and "schema_version" in d:
                        return "json"
    except OSError:
        return None
    return None


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies under b (resolved paths)."""
    return a == b or b in a.parents


def check_output(out, kind: str, sources=(), force: bool = False, is_dir: bool = True) -> Path:
    """Refuses, before any work, an output that would destroy something lathe did not write.
    Creates nothing. Returns `out` as a Path."""
    assert kind in KINDS, kind
    out = Path(out)
    if str(out) in ("", ".", ".."):
        raise BadInput(f"refusing to write to {str(out)!r}: name a new folder or file for the output")
    r = out.resolve()
    if _inside(Path.cwd().resolve(), r):
        raise BadInput(f"refusing to write to {out}: it is the working folder or one of its parents")
    for s in sources:
        s = Path(s).resolve()
        if _inside(s, r):
            raise BadInput(f"refusing to write to {out}: it contains the source {s}")
        if _inside(r, s):
            # inside a source folder: a new path is fine, a source file (or under one) never
            p = r
            while p != s:
                if p.exists() and not p.is_dir():
                    raise BadInput(f"refusing to write to {out}: it lies inside the source file {p}")
                p = p.parent
            if r.is_dir() and kind_of(r) != kind:
                raise BadInput(f"refusing to write to {out}: it is a folder of the source {s}")
    # an existing parent that is a file: mkdir would fail later
    for p in r.parents:
        if p.exists():
            if not p.is_dir():
                raise BadInput(f"cannot write {out}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise BadInput(f"cannot write {out}: folder {p} is not writable")
            break
    if out.exists() or out.is_symlink():
        if is_dir and out.is_file():
            raise BadInput(f"refusing to write to {out}: it is an existing file (the output is a folder)")
        if not is_dir and out.is_dir():
            raise BadInput(f"refusing to write to {out}: it is an existing folder (the output is a file)")
        have = kind_of(out)
        if have != kind and not force:
            what = "folder" if out.is_dir() else "file"
            hint = " (pass --force to replace it)" if kind not in ("json", "report-dir") else ""
            raise BadInput(f"refusing to overwrite {out}: an existing {what} that is not a lathe "
                           f"{kind} output{hint}")
    return out


def check_report_dir(out: Path) -> Path:
    """bench/demo write report.{json,md,csv,png} (and demo its checkpoint) into a folder: never
    onto a file, never over a report.json lathe did not write. Missing parents are made."""
    if str(out) in ("", ".", "..") or out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise BadInput(f"refusing to write reports into {out}: name a new folder (e.g. lathe-bench-out)")
    check_output(out, "report-dir", force=True, is_dir=True)  # a file there, or unwritable parents
    rj = out / "report.json"
    if rj.exists() and kind_of(rj) != "json":
        raise BadInput(f"refusing to overwrite {rj}: it is not a lathe bench report")
    return out


# ----------------------------------------------------------------------------- recovery and lock


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(out) -> list[str]:
    """Repairs what an interrupted run left beside `out`: puts `.OUT.old-PID` back when OUT is
    missing (a crash between the two renames), removes temp files/folders and stale `.old`
    copies whose process is gone. Call it holding the output's lock. Returns what it did."""
    out = Path(out)
    done = []
    if not out.parent.is_dir():
        return done
    olds, tmps = [], []
    for p in out.parent.iterdir():
        m = _TMP.match(p.name)
        if not m or m["name"] != out.name or _alive(int(m["pid"])):
            continue
        (olds if m["what"] == "old" else tmps).append(p)
    if olds and not (out.exists() or out.is_symlink()):
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(newest, out)
        olds.remove(newest)
        done.append(f"restored {out} from {newest.name}")
    for p in olds + tmps:
        _remove(p)
        done.append(f"removed stale {p.name}")
    return done


def lock_path(out: Path) -> Path:
    return out.parent / f"{out.name}.lock"


@contextlib.contextmanager
def output_lock(out):
    """fcntl lock on OUT.lock for the whole run; the lock file is removed on release."""
    import fcntl

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lp = lock_path(out)
    while True:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise BadInput(f"{out} is being written by pid {pid} (lock {lp})") from None
            raise
        # the holder may have removed the file between our open and our lock: retry then
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lp)
        os.close(fd)


@contextlib.contextmanager
def claim(out, kind: str, sources=(), force: bool = False, is_dir: bool = True, log=None):
    """check_output, then hold the output's lock, recover an interrupted earlier run, and check
    again (the recovered output may be what was there before). Yields `out`."""
    out = check_output(out, kind, sources, force, is_dir)
    created = []
    p = out.parent
    while not p.exists():  # parents made for the lock go again when the run fails
        created.append(p)
        p = p.parent
    try:
        with output_lock(out):
            for line in recover(out):
                if log:
                    log(line)
            check_output(out, kind, sources, force, is_dir)
            yield out
    except BaseException:
        for d in created:  # innermost first; only if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
