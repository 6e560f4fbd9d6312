"""Versioned run directories: every command writes one, none is ever overwritten.

    runs/<command>/<YYYYmmdd-HHMMSS>-<name>-<6 hex of config hash>/
      run.json  recipe.yaml  resolved.yaml  overrides.txt  metrics.jsonl  log.txt
      checkpoints/last.pt  model/  results.json  report.md  *.png

A run directory holds only what was produced: recipe.yaml where there was a recipe, overrides.txt where
there were --set overrides, checkpoints/ from the first checkpoint, log.txt from the first log line.

``RunDir.create(...)`` makes a new one, ``RunDir.open(path)`` reopens one for ``--resume``;
``with run_dir.active(): ...`` records status running -> completed | failed | interrupted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
from pathlib import Path

from dmclip.errors import DmclipError
from dmclip.io import atomic_torch_save, atomic_write_json, atomic_write_text, jsonable, torch_load

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)


def default_runs_root() -> Path:
    return Path(os.environ.get("DMCLIP_RUNS", "runs"))


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def slug(name: str) -> str:
    """``name`` as a file-name part: letters, digits, ``-_.``; at most 60 characters."""
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.strip())
    return keep.strip("-")[:60] or "run"




# -------------------------------------------------------------------------------------- run dirs


class RunInterrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM so a run records 'interrupted' like on Ctrl-C."""


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._log_handler: logging.Handler | None = None
        self._metrics_checked = False
        self.reporter = None  # dmclip.train.report_to.Reporter: dashboards that also get rows and results

    # ---- creation
    @classmethod
    def create(cls, command: str, name: str, config=None, *, root: Path | None = None,
               recipe_text: str = "", overrides: list[str] | None = None, argv: list[str] | None = None,
               seed: int | None = None, parent: Path | None = None) -> RunDir:
        """Make a new run directory (never an existing one)."""
        from dmclip import __version__
        from dmclip.config import config_hash, to_yaml

        base = Path(parent) if parent is not None else (Path(root) if root else default_runs_root()) / command
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        digest = config_hash(config) if config is not None else "000000"
        path = base / f"{stamp}-{slug(name)}-{digest}"
        suffix = 1
        try:
            base.mkdir(parents=True, exist_ok=True)
            while True:
                try:
                    path.mkdir()
                    break
                except FileExistsError:  # same second, same config: never reuse, add a counter
                    suffix += 1
                    path = base / f"{stamp}-{slug(name)}-{digest}-{suffix}"
        except OSError as exc:  # the runs root is a file, read-only, on a full disk ...
            raise DmclipError(f"cannot create the run directory {path}: {exc.strerror or exc}",
                              "choose another --runs-dir (or $DMCLIP_RUNS), one that is a writable directory"
                              ) from None
        run_dir = cls(path)
        if config is not None:
            atomic_write_text(path / "resolved.yaml", f"command: {command}\n" + to_yaml(config))
        if recipe_text:
            atomic_write_text(path / "recipe.yaml", recipe_text)
        if overrides:
            atomic_write_text(path / "overrides.txt", "\n".join(overrides) + "\n")
        info = {
            "schema_version": SCHEMA_VERSION,
            "command": command,
            "name": name,
            "dmclip_version": __version__,
            "argv": argv if argv is not None else sys.argv,
            "git_sha": _git_sha(),
            "python": platform.python_version(),
            "torch": _torch_version(),
            "device": None,  # set by the training loop to the device it trains on
            "host": socket.gethostname(),
            "seed": seed,
            "status": "created",
            "start_time": _now(),
            "end_time": None,
            "error": None,
        }
        atomic_write_json(path / "run.json", info)
        return run_dir

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Reopen an existing run directory (for --resume, eval, runs show)."""
        path = Path(path)
        if not (path / "run.json").is_file():
            raise DmclipError(f"{path} is not a dmclip run directory (no run.json)",
                              "pass a directory under runs/<command>/ (`dmclip runs list` shows them)")
        return cls(path)

    # ---- metadata
    @property
    def info(self) -> dict:
        try:
            info = json.loads((self.path / "run.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DmclipError(f"{self.path}/run.json cannot be read ({exc})",
                              "the run directory is damaged; start a new run") from None
        if not isinstance(info, dict):
            raise DmclipError(f"{self.path}/run.json is not a JSON object",
                              "the run directory is damaged; start a new run")
        return info

    def update_info(self, **fields) -> None:
        info = self.info
        info.update(fields)
        atomic_write_json(self.path / "run.json", info)

    @property
    def status(self) -> str:
        return self.info.get("status", "unknown")

    @property
    def command(self) -> str:
        return self.info.get("command", "?")

    def resolved_config(self, cls):
        """The resolved config of this run as a ``cls`` dataclass."""
        from dmclip.config import load_config

        cfg, _ = load_config(cls, self.path / "resolved.yaml")
        return cfg

    # ---- outputs
    def log_metrics(self, record: dict) -> None:
        """Append one JSON object to metrics.jsonl (flushed, so a kill loses at most this line)."""
        line = json.dumps(jsonable(record)) + "\n"
        path = self.path / "metrics.jsonl"
        if not self._metrics_checked:  # a kill may have cut the last line: start on a fresh one
            self._metrics_checked = True
            if path.exists() and path.stat().st_size:
                with open(path, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        line = "\n" + line
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
        except OSError as exc:  # a full disk: the rows already written stay, a cut line is skipped on read
            raise DmclipError(f"could not write {path}: {exc.strerror or exc}",
                              "free disk space or choose another --runs-dir; the rows already written are kept, "
                              "and --resume continues the run") from exc
        if self.reporter is not None:
            self.reporter.log(record)

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def truncate_metrics(self, max_step: int) -> None:
        """Drop metric rows after ``max_step`` (on resume, rows past the checkpoint are replayed)."""
        rows = [r for r in self.metrics() if not isinstance(r.get("step"), (int, float)) or r["step"] <= max_step]
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        self._metrics_checked = True

    def write_results(self, results: dict) -> None:
        atomic_write_json(self.path / "results.json", results)
        if self.reporter is not None:
            self.reporter.results(results)

    def close_reporter(self) -> None:
        """Finish the dashboards (flush TensorBoard, finish the W&B run); the run's end does it too."""
        reporter, self.reporter = self.reporter, None
        if reporter is not None:
            reporter.close()

    def results(self) -> dict | None:
        path = self.path / "results.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def write_text(self, name: str, text: str) -> Path:
        atomic_write_text(self.path / name, text)
        return self.path / name

    def begun(self) -> bool:
        """Whether training has begun here (a checkpoint or a metrics row): such a run is kept for --resume."""
        return self.checkpoint_path().exists() or bool(self.metrics())

    def checkpoint_path(self, name: str = "last.pt") -> Path:
        return self.path / "checkpoints" / name

    def save_checkpoint(self, state: dict, name: str = "last.pt") -> Path:
        """Write ``checkpoints/<name>`` atomically; the first one makes checkpoints/."""
        path = self.checkpoint_path(name)
        try:
            path.parent.mkdir(exist_ok=True)
        except OSError as exc:  # a full disk: the run fails with the fix, not a traceback
            raise DmclipError(f"could not write {path}: {exc.strerror or exc}",
                              "free disk space or choose another --runs-dir; --resume continues the run") from exc
        atomic_torch_save(state, path)
        for stale in path.parent.glob(f".{name}.*.tmp"):  # left by a process killed mid-write
            with contextlib.suppress(OSError):
                stale.unlink()
        return path

    def load_checkpoint(self, name: str = "last.pt") -> dict:
        return torch_load(self.checkpoint_path(name))

    # ---- lifecycle
    @contextlib.contextmanager
    def active(self):
        """Mark the run running; record completed / failed (with the error) / interrupted."""
        self.update_info(status="running", pid=os.getpid(), pid_start=_process_start(os.getpid()),
                         host=socket.gethostname(),
                         resumed_at=_now() if self.status != "created" else None, end_time=None, error=None)
        self._attach_log()
        old_term = install_sigterm()
        try:
            yield self
        except KeyboardInterrupt:
            self._record_end(status="interrupted", end_time=_now(), error="interrupted (Ctrl-C or SIGTERM)")
            log.warning("run interrupted: %s", self.path)  # the CLI says how to go on, for its command
            raise
        except DmclipError as exc:
            self._record_end(status="failed", end_time=_now(), error=str(exc))
            raise
        except BaseException as exc:
            self._record_end(status="failed", end_time=_now(), error=f"{type(exc).__name__}: {exc}")
            raise
        else:
            self.update_info(status="completed", end_time=_now())
        finally:
            restore_sigterm(old_term)
            self.close_reporter()
            self._detach_log()

    def _record_end(self, **fields) -> None:
        """Record how the run ended without hiding why: when run.json cannot be written either (a full
        disk), the original error is the one the user sees; `runs list` then shows the run as crashed."""
        try:
            self.update_info(**fields)
        except DmclipError as exc:
            log.error("%s (the run's status could not be recorded)", exc.message)

    def _attach_log(self) -> None:
        handler = logging.FileHandler(self.path / "log.txt", encoding="utf-8", delay=True)  # made by the first line
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        root = logging.getLogger("dmclip")
        root.addHandler(handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        self._log_handler = handler

    def _detach_log(self) -> None:
        if self._log_handler is not None:
            logging.getLogger("dmclip").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    # ---- listing
    def display_status(self) -> str:
        """The status, with a 'running' run whose process is gone shown as 'crashed'."""
        info = self.info
        status = info.get("status", "unknown")
        if (status == "running" and info.get("host") == socket.gethostname()
                and not _pid_alive(info.get("pid"), info.get("pid_start"))):
            return "crashed"
        return status

    def last_step(self) -> int | None:
        rows = self.metrics()
        steps = [r["step"] for r in rows if isinstance(r.get("step"), int)]
        return max(steps) if steps else None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"


def _torch_version() -> str | None:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return None


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and ')'
    try:
        if fields[0] == "Z":  # a zombie has finished
            return -1
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid, start: int | None = None) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _process_start(pid)
    if now == -1:
        return False
    if start is not None and now is not None and now != start:  # the pid now belongs to another process
        return False
    return True


def install_sigterm():
    """Make SIGTERM raise ``RunInterrupted`` (main thread only); returns the handler to give back to
    :func:`restore_sigterm`, or None where nothing was installed."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise RunInterrupted()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def restore_sigterm(old) -> None:
    import threading

    if old is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, old)


def find_runs(root: Path | None = None, command: str | None = None) -> list[RunDir]:
    """Every run directory under ``root`` (sweep members included), newest first."""
    root = Path(root) if root else default_runs_root()
    if not root.exists():
        return []
    found = [RunDir(p.parent) for p in root.rglob("run.json")]
    if command:
        found = [r for r in found if _safe_info(r).get("command") == command]
    return sorted(found, key=lambda r: r.path.name, reverse=True)


def _safe_info(run_dir: RunDir) -> dict:
    try:
        return run_dir.info
    except DmclipError:
        return {}


def latest_run(command: str, root: Path | None = None, status: str = "completed", name: str | None = None) -> RunDir | None:
    for run_dir in find_runs(root, command):
        info = _safe_info(run_dir)
        if info.get("status") == status and (name is None or info.get("name") == name):
            return run_dir
    return None
