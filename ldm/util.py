"""Config plumbing shared by every entry point: ``target``/``params`` instantiation and yaml merging.

Nothing model- or math-specific lives here. ``instantiate_from_config`` keeps ldm's semantics
(``{"target": "pkg.mod.Class", "params": {...}}``) and adds what ldm lacked: ``params`` are checked against the
target's typed signature first (:mod:`ldm.config_schema`: unknown keys with a "did you mean", wrong types,
missing required keys), and a mistake a constructor reports (a ``ConfigError`` or ``ValueError``) comes back as
one :class:`ConfigError` line naming its place in the config, e.g. ``model.params.cond_stage_config: ...``.

:func:`load_config` merges yamls and command-line overrides. Two rules on top of OmegaConf's:

* **paths**: a relative path string in a config *file* that names an existing file or folder next to that file
  is made absolute when the file is loaded, so a config runs from any working directory. Failing that, a path
  that exists neither there nor in the working directory but does in the repository root (where shipped
  configs name files such as ``configs/tiny/open_clip_tiny_text.json``) is made absolute against the root.
  Other relative strings (shard patterns, output folders, command-line values) are left as they are, relative
  to the working directory. (A folder created on first use cannot be found by looking: the held-out
  evaluation set anchors its relative ``set_dir`` at the repository root itself, ``ldm.eval.callback``.)
* **deleting**: an override ``~KEY`` (e.g. ``~data`` or ``~lightning.callbacks.image_logger``) removes the key
  and everything under it before the other overrides apply, so ``~data data.target=... data.params...``
  replaces a whole section.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.config_schema import ConfigError, check_params, check_tree, get_obj_from_str, suggest

log = logging.getLogger(__name__)

__all__ = ["ConfigError", "check_params", "check_tree", "count_params", "default", "exists", "get_obj_from_str",
           "instantiate_from_config", "load_config", "suggest"]

REPO_ROOT = Path(__file__).resolve().parents[1]
# id(nested config mapping) -> its key path, for the constructors now running: a constructor that instantiates
# a nested config (LatentDiffusion -> unet_config) gets errors located at "model.params.unet_config".
_CHILD_PATHS: contextvars.ContextVar[dict[int, str] | None] = contextvars.ContextVar("_CHILD_PATHS", default=None)


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    if exists(val):
        return val
    return d() if callable(d) else d


def _to_container(x: Any) -> Any:
    """Plain dicts and lists all the way down (OmegaConf nodes may also sit inside plain containers)."""
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    if isinstance(x, dict):
        return {k: _to_container(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_container(v) for v in x]
    return x


def _child_paths(node: Any, path: str, out: dict[int, str]) -> dict[int, str]:
    if isinstance(node, Mapping):
        out[id(node)] = path
        for k, v in node.items():
            _child_paths(v, f"{path}.{k}", out)
    elif isinstance(node, list):
        out[id(node)] = path
        for i, v in enumerate(node):
            _child_paths(v, f"{path}[{i}]", out)
    return out


def _located(e: ValueError, where: str) -> ConfigError:
    if isinstance(e, ConfigError) and e.located:
        return e
    key = getattr(e, "key", None)
    err = ConfigError(f"{where}.params.{key}: {e.detail}" if key else f"{where}: {e}")
    err.located = True
    return err


def instantiate_from_config(config: Mapping[str, Any] | DictConfig, *, where: str | None = None,
                            **extra: Any) -> Any:
    """Build ``config["target"](**config["params"], **extra)`` after checking the params against its signature.

    ``where`` is the config's key path for messages (``"model"``); nested configs instantiated by a constructor
    find their own path. ldm COMPAT: the placeholder strings ``__is_first_stage__`` and
    ``__is_unconditional__`` return None. ``params`` may be absent. Nested OmegaConf nodes are passed to the
    target as plain dicts/lists, so constructors never see OmegaConf types.
    """
    if isinstance(config, str) and config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    where = where or (_CHILD_PATHS.get() or {}).get(id(config))
    if not isinstance(config, (Mapping, DictConfig)) or "target" not in config:
        raise ConfigError(f"{where or 'config'}: expected a mapping with a 'target' key, got: {config!r}")
    target = config["target"]
    where = where or f"<{target}>"
    try:
        obj = get_obj_from_str(target)
    except ConfigError as e:
        raise _located(e, f"{where}.target") from e
    params = _to_container(config.get("params", None)) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.params: expected a mapping, got {type(params).__name__}")
    params = {**params, **extra}
    check_params(obj, params, where=f"{where}.params", complete=True)
    token = _CHILD_PATHS.set({**(_CHILD_PATHS.get() or {}), **_child_paths(params, f"{where}.params", {})})
    try:
        return obj(**params)
    except ValueError as e:
        if type(e) not in (ValueError, ConfigError):  # CheckpointError & co. carry their own message and type
            raise
        raise _located(e, where) from e  # a constructor rejected a value: say where it came from
    finally:
        _CHILD_PATHS.reset(token)


def _absolute_paths(node: Any, folder: Path) -> Any:
    """Turn relative path strings that exist next to the config (or in the repo root) into absolute paths."""
    if isinstance(node, dict):
        return {k: _absolute_paths(v, folder) for k, v in node.items()}
    if isinstance(node, list):
        return [_absolute_paths(v, folder) for v in node]
    if (not isinstance(node, str) or not node or "${" in node or "://" in node or node.startswith("pipe:")
            or "\n" in node or len(node) > 1024 or Path(node).is_absolute()
            or not ("/" in node or Path(node).suffix)):
        return node
    try:
        if (folder / node).exists():
            return str((folder / node).resolve())
        if not Path(node).exists() and (REPO_ROOT / node).exists():  # the working directory's own file wins
            return str((REPO_ROOT / node).resolve())
    except (OSError, ValueError):  # not a possible path (too long, NUL byte): a plain string
        pass
    return node


def _load_file(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # yaml syntax errors carry line numbers; keep them
        raise ConfigError(f"cannot parse config {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections (model, data, lightning)")
    return OmegaConf.create(_absolute_paths(raw, path.resolve().parent))


def _delete(cfg: DictConfig, token: str) -> None:
    key = token[1:]
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        keys = list(parent.keys()) if isinstance(parent, DictConfig) else []
        raise ConfigError(f"override '{token}': there is no '{key}' to delete{suggest(leaf, keys)}")
    del parent[leaf]


def load_config(paths: Sequence[str | Path], dotlist: Iterable[str] = ()) -> DictConfig:
    """Merge yaml files left to right, then apply overrides: ``~a.b`` deletions, then ``a.b.c=value`` values.

    Relative paths inside each file are resolved as the module docstring says. Missing files, malformed
    overrides and deletions of keys that do not exist raise :class:`ConfigError` naming the file or token.
    """
    configs = [_load_file(Path(p)) for p in paths]
    dotlist = list(dotlist)
    deletions = [t for t in dotlist if t.startswith("~")]
    values = [t for t in dotlist if not t.startswith("~")]
    for token in deletions:
        if "=" in token or len(token) < 2:
            raise ConfigError(f"override '{token}': a deletion is written ~key.path (no value)")
    for token in values:
        if "=" not in token or token.startswith("="):
            raise ConfigError(f"override '{token}' is not of the form key.path=value (or ~key.path to delete)")
    overrides = []
    for token in values:  # one at a time, so a malformed value is reported with its token
        try:
            overrides.append(OmegaConf.from_dotlist([token]))
        except Exception as e:
            raise ConfigError(f"cannot parse override '{token}': {str(e).splitlines()[0]}") from e
    cfg = OmegaConf.merge(*configs) if configs else OmegaConf.create()
    for token in deletions:
        _delete(cfg, token)
    try:
        return OmegaConf.merge(cfg, *overrides) if overrides else cfg
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot apply the overrides: {str(e).splitlines()[0]}") from e


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
