"""The model repository: `<root>/<model>/config.{yaml,pbtxt}` plus numeric version folders.

Loading a model that is already loaded reloads it: the new versions are loaded and warmed up
while the old ones keep serving, then requests switch over and the old versions drain. A failed
reload leaves the old versions serving. Unloading drains before it releases anything.
"""
from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ModelConfig, load_model_config
from .errors import BadRequestError, ModelNotFoundError, ModelNotReadyError, RepositoryError
from .engine import find_model_file
from .llm_model import served_model  # an LLM engine (manifest kind "llm") is served by LLMServedModel
from .model import ModelSettings, ServedModel
from .safe_files import resolve_inside

if TYPE_CHECKING:
    from .metrics import ServerMetrics

log = logging.getLogger("ember.serve")

_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
# ASCII digits only: str.isdigit() also accepts "١" (Arabic-Indic one) and "²", which int() reads as
# 1 and 2. As in Triton, a folder whose name starts with 0 is not a version.
_VERSION_DIR = re.compile(r"[1-9][0-9]{0,17}", re.ASCII)
_VERSION_REQUEST = re.compile(r"[0-9]{1,18}", re.ASCII)


@dataclass
class _Entry:
    name: str
    versions: dict[int, ServedModel] = field(default_factory=dict)
    state: str = "UNAVAILABLE"  # of the model as a whole, when no version serves
    reason: str = "unloaded"
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    signature: tuple = ()


def model_file_inside(model_dir: Path, version_dir: Path, preferred: str | None, label: str) -> Path:
    """The engine (or ONNX) file a version serves, which must lie inside the model's folder once
    symlinks are resolved: a config (or a load request's override) cannot point it elsewhere."""
    path = find_model_file(version_dir, preferred)
    return resolve_inside(model_dir, path.relative_to(model_dir), f"{label}: the model file")


class ModelRepository:
    def __init__(self, root: Path, settings: ModelSettings, metrics: "ServerMetrics | None" = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {self.root} is not a directory; pass the folder that holds "
                                  "one folder per model")
        self.settings = settings
        self.metrics = metrics
        self._entries: dict[str, _Entry] = {}
        self._draining: set[ServedModel] = set()
        self._background: set[asyncio.Task] = set()

    # ---- discovery -----------------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """Every model folder in the repository (loaded or not)."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _MODEL_NAME.match(p.name))

    def _model_dir(self, name: str) -> Path:
        if not isinstance(name, str) or not _MODEL_NAME.match(name) or name in (".", ".."):
            raise BadRequestError(f"'{name}' is not a valid model name (letters, digits, '_', '.', '-')")
        path = self.root / name
        if not path.is_dir():
            raise ModelNotFoundError(f"no model '{name}' in repository {self.root}; it has {self.model_names()}")
        return path

    @staticmethod
    def version_dirs(model_dir: Path) -> dict[int, Path]:
        return {int(p.name): p for p in model_dir.iterdir() if p.is_dir() and _VERSION_DIR.fullmatch(p.name)}

    @staticmethod
    def signature(model_dir: Path) -> tuple:
        """What poll mode compares: names, sizes and mtimes of the config and version files."""
        sig = []
        for p in sorted(model_dir.rglob("*")):
            try:
                if p.is_file():
                    st = p.stat()
                    sig.append((str(p.relative_to(model_dir)), st.st_size, st.st_mtime_ns))
            except OSError:
                continue
        return tuple(sig)

    # ---- load / unload --------------------------------------------------------------------------------------

    async def load(self, name: str, config: ModelConfig | None = None) -> None:
        model_dir = self._model_dir(name)
        entry = self._entries.setdefault(name, _Entry(name))
        async with entry.lock:
            signature = self.signature(model_dir)
            try:
                if config is None:
                    config = await asyncio.to_thread(load_model_config, model_dir)
                available = self.version_dirs(model_dir)
                wanted = config.version_policy.select(list(available))
                if not wanted:
                    raise RepositoryError(f"model '{name}': no version to serve; version folders {sorted(available)}, "
                                          f"policy {config.version_policy.kind}")
                for v in wanted:
                    model_file_inside(model_dir, available[v], config.default_model_filename, f"model '{name}'")
            except (RepositoryError, OSError) as e:
                if not entry.versions:
                    entry.state, entry.reason = "UNAVAILABLE", str(e)
                if isinstance(e, OSError):
                    raise RepositoryError(f"model '{name}': cannot read {model_dir}: {e}") from e
                raise
            new = {v: served_model(config, v, available[v], self.settings, self.metrics) for v in wanted}
            if not entry.versions:
                entry.state, entry.reason = "LOADING", ""
            results = await asyncio.gather(*(m.load() for m in new.values()), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                await asyncio.gather(*(m.unload() for m in new.values() if m.state == "READY"))
                msg = "; ".join(str(e) for e in errors)
                if entry.versions:
                    msg += f" (versions {sorted(entry.versions)} keep serving)"
                else:
                    entry.state, entry.reason = "UNAVAILABLE", msg
                for e in errors:
                    if not isinstance(e, Exception):
                        raise e
                raise RepositoryError(msg)
            old, entry.versions = entry.versions, new
            entry.state, entry.reason, entry.signature = "READY", "", signature
            for m in old.values():
                self._drain_later(m)
            log.info("model '%s' serves version(s) %s", name, sorted(new))

    async def unload(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is None:
            self._model_dir(name)  # 404 for a model that does not exist; unloading an unloaded one is fine
            return
        async with entry.lock:
            old, entry.versions = entry.versions, {}
            entry.state, entry.reason = "UNAVAILABLE", "unloaded"
            for m in old.values():
                m.state = "UNLOADING"
            await asyncio.gather(*(self._drain(m) for m in old.values()))

    def _drain_later(self, m: ServedModel) -> None:
        task = asyncio.get_running_loop().create_task(self._drain(m))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain(self, m: ServedModel) -> None:
        self._draining.add(m)
        try:
            await m.unload()
        finally:
            self._draining.discard(m)
        entry = self._entries.get(m.name)
        if self.metrics is not None and not (entry and int(m.version) in entry.versions):
            self.metrics.forget_model(m.name, m.version)

    async def load_all(self, names: list[str] | None = None) -> dict[str, str]:
        """Load models (all by default). Returns {model: error message} for those that failed."""
        names = self.model_names() if names is None else names
        results = await asyncio.gather(*(self.load(n) for n in names), return_exceptions=True)
        failed = {}
        for n, r in zip(names, results):
            if isinstance(r, BaseException):
                if not isinstance(r, Exception):
                    raise r
                failed[n] = str(r)
                log.error("failed to load model '%s': %s", n, r)
        return failed

    async def poll(self) -> None:
        """One poll pass: load new or changed models, unload removed ones."""
        on_disk = set(self.model_names())
        for name in sorted(on_disk):
            entry = self._entries.get(name)
            if entry is not None and entry.lock.locked():
                continue
            sig = self.signature(self.root / name)
            if entry is None or sig != entry.signature:
                try:
                    await self.load(name)
                except Exception as e:  # reported in the index; poll keeps going
                    log.error("poll: model '%s' failed to load: %s", name, e)
                    self._entries[name].signature = sig
        for name in sorted(set(self._entries) - on_disk):
            if self._entries[name].versions:
                await self.unload(name)

    async def close(self) -> None:
        """Drain and unload everything (shutdown)."""
        for name in list(self._entries):
            await self.unload(name)
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # ---- lookup ----------------------------------------------------------------------------------------------

    def get(self, name: str, version: str | None) -> ServedModel:
        entry = self._entries.get(name)
        if entry is None or not entry.versions:
            if entry is not None and entry.state == "LOADING":
                raise ModelNotReadyError(f"model '{name}' is loading; retry shortly")
            known = sorted(n for n, e in self._entries.items() if e.versions)
            raise ModelNotFoundError(f"model '{name}' is not loaded; loaded models: {known}")
        if version:
            if not _VERSION_REQUEST.fullmatch(version):
                raise ModelNotFoundError(f"model '{name}' has no version '{version}'; versions are integers: "
                                         f"{sorted(entry.versions)}")
            m = entry.versions.get(int(version))
            if m is None:
                raise ModelNotFoundError(f"model '{name}' has no loaded version {version}; loaded versions: "
                                         f"{sorted(entry.versions)}")
            if m.state != "READY":
                raise ModelNotReadyError(f"model {m.label} is {m.state.lower()}; retry shortly")
            return m
        for v in sorted(entry.versions, reverse=True):
            if entry.versions[v].state == "READY":
                return entry.versions[v]
        raise ModelNotReadyError(f"model '{name}' has no ready version; retry shortly")

    def ready_versions(self, name: str) -> list[str]:
        entry = self._entries.get(name)
        return [str(v) for v, m in sorted(entry.versions.items()) if m.state == "READY"] if entry else []

    def served(self) -> list[ServedModel]:
        """Every version that holds an engine: serving ones and draining ones."""
        return [m for e in self._entries.values() for m in e.versions.values()] + list(self._draining)

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        out = []
        for name in sorted(set(self.model_names()) | set(self._entries)):
            entry = self._entries.get(name)
            if entry is not None and entry.versions:
                for v, m in sorted(entry.versions.items()):
                    if not ready_only or m.state == "READY":
                        out.append({"name": name, "version": str(v), "state": m.state, "reason": m.reason})
            elif not ready_only:
                state, reason = (entry.state, entry.reason) if entry else ("UNAVAILABLE", "unloaded")
                out.append({"name": name, "version": "", "state": state, "reason": reason})
        return out
