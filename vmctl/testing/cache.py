"""Where the test guests are built and kept: one directory per recipe under the cache
(``VMCTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/vmctl``), built once even when several processes
(pytest's workers) ask for it at the same moment."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path


def cached_build(
    cache_dir: str | os.PathLike[str] | None,
    *,
    kind: str,
    recipe: str,
    products: tuple[str, ...],
    build: Callable[[Path, Path], None],
) -> Path:
    """The directory of ``kind`` built by ``recipe`` (a digest of all that goes into it), holding
    ``products``: ``build(cache root, directory)`` makes it unless a build is already there. The
    check and the build hold a lock per kind, so a second process waits and then finds it built."""
    root = cache_root(cache_dir)
    target = root / f"{kind}-{recipe}"
    with _locked(root / f".{kind}.lock"):
        if not all((target / product).exists() for product in products):
            build(root, target)
    return target


def cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache directory a guest is built into (made if missing): ``cache_dir``, or the default."""
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_cache_dir() -> Path:
    configured = os.environ.get("VMCTL_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vmctl"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
