"""Checks of a command's environment, shared by ``study.run``, ``study.evaluate`` and ``analysis``.

Each raises :class:`~study.config.ConfigError` with one line naming the flag (or the file and field) at fault,
before anything is written or started; :class:`Parser` turns argparse's own errors into the same one line.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from .config import ConfigError


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`ConfigError` (``--trials: invalid int value: 'abc'``)
    instead of printing the usage block and exiting, so every command reports bad input in one line."""

    def error(self, message):
        raise ConfigError(message.removeprefix("argument "))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def count_or_auto(text: str):
    """argparse type: an integer >= 1, or ``auto``."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}") from None


def model_name(text: str) -> str:
    """argparse type: a name for the MLflow Model Registry (not empty, no ``/`` or ``:``, as MLflow requires)."""
    if not text.strip() or any(c in text for c in "/:"):
        raise argparse.ArgumentTypeError(f"expected a registered model name without '/' or ':', got {text!r}")
    return text


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc",
                    "file")
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
ANSWER_S = 3.0  # how long an MLflow server may take to answer /health


def check_folder(path: Path | str, flag: str) -> Path:
    """``path`` as an absolute folder that exists or can be created, and that this process can write in.
    Creates nothing that stays: the test writes a temporary file in the nearest existing folder."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag}: {p} is a file, not a folder")
    ancestor = p
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag}: {p} lies below {ancestor}, which is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot write in {ancestor} ({exc.strerror or exc})") from None
    return p


def existing_store(flag_value: Optional[str], flag: str = "--tracking-uri") -> str:
    """The MLflow store a reading command (analysis, export, evaluate --run-id) opens: ``--tracking-uri`` (or the
    argument ``flag`` names), else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` here, checked by
    :func:`tracking_uri`. A SQLite store must exist already (reading never creates one); :class:`ConfigError` names
    the flag or variable."""
    given = flag_value or os.environ.get("MLFLOW_TRACKING_URI")
    where = flag if flag_value or not given else "MLFLOW_TRACKING_URI"
    uri = tracking_uri(given, where)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"{flag}: no MLflow store at {uri}")
    return uri


def tracking_uri(uri: Optional[str], flag: str = "--tracking-uri") -> str:
    """The tracking URI the study will use, checked and made absolute.

    None means MLflow's embedded store ``sqlite:///mlflow.db`` in the current folder. A relative SQLite path
    is made absolute (MLflow cannot derive an artifact location from it); an http(s) server must answer
    ``/health`` within a few seconds; a ``./mlruns`` file store needs ``MLFLOW_ALLOW_FILE_STORE=true``
    (MLflow >= 3.13)."""
    if not uri:
        return f"sqlite:///{check_folder(Path.cwd(), flag) / 'mlflow.db'}"
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ("file" if "/" in uri or
                                                                                  uri.startswith(".") else uri)
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"{flag}: unknown tracking URI scheme {scheme + '://' if '://' in uri else uri!r} in "
                          f"{uri!r}; use sqlite:///path/mlflow.db, http(s)://host:port (an MLflow server), a "
                          f"database URL ({', '.join(DATABASE_SCHEMES)}) or databricks")
    if scheme == "sqlite":
        return _sqlite(uri, flag, "an MLflow store")
    if scheme in ("http", "https"):
        _answers(uri, flag)
    elif scheme in DATABASE_SCHEMES:
        _dialect(uri, flag)
    elif scheme == "file":
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
            raise ConfigError(f"{flag}: {uri!r} is an MLflow file store, which MLflow >= 3.13 opens only with "
                              f"MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///mlflow.db instead")
        path = check_folder(uri.removeprefix("file://"), flag)
        return path.as_uri()
    return uri


def _sqlite(url: str, flag: str, what: str) -> str:
    """A SQLite URL with an absolute path in a writable folder."""
    rest = url.split("://", 1)[1]
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        raise ConfigError(f"{flag}: {url!r} names no file; {what} must outlive this process: "
                          f"sqlite:///relative/path.db or sqlite:////absolute/path.db")
    path = Path(rest[1:])
    if path.exists() and path.is_dir():
        raise ConfigError(f"{flag}: {path.absolute()} is a folder, not a SQLite file")
    folder = check_folder(path.absolute().parent, flag)
    return f"{url.split('://', 1)[0]}:///{folder / path.name}"


def _answers(uri: str, flag: str) -> None:
    """An MLflow server at ``uri`` answers its ``/health`` endpoint within :data:`ANSWER_S` seconds."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=ANSWER_S) as r:
            if r.status == 200:
                return
            problem = f"HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise ConfigError(f"{flag}: no MLflow server answers at {uri} within {ANSWER_S:g} s ({problem}); start one "
                      f"with: mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db")


def _dialect(url: str, flag: str) -> None:
    """A SQLAlchemy database URL whose dialect and driver are installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ConfigError(f"{flag}: {url.split('@')[-1]!r} is not a usable database URL ({exc})") from None
    except ImportError as exc:
        raise ConfigError(f"{flag}: the database driver for {url.split('://')[0]!r} is not installed "
                          f"({exc.name or exc}); pip install it") from None


def optuna_storage(url: Optional[str], flag: str) -> Optional[str]:
    """The Optuna storage URL, checked: a SQLAlchemy URL (what ``optuna.storages.RDBStorage`` opens) whose
    driver is installed; for SQLite, a file in a writable folder (made absolute). Nothing is created."""
    if not url:
        return None
    if url.split("://", 1)[0].split("+", 1)[0] == "sqlite":
        return _sqlite(url, flag, "the Optuna study")
    _dialect(url, flag)
    return url
