"""Config plumbing shared by every entry point: ``target``/``params`` instantiation and yaml merging.

Nothing model- or math-specific lives here. ``instantiate_from_config`` keeps ldm's semantics
(``{"target": "pkg.mod.Class", "params": {...}}``) and adds one thing ldm lacked: a ``params`` key that the
target does not accept is a :class:`ConfigError` naming the key and the target, not a silent swallow or a
``TypeError`` deep inside a constructor.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A user-facing configuration mistake. Entry points print its message without a traceback."""


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    if exists(val):
        return val
    return d() if callable(d) else d


def get_obj_from_str(string: str) -> Any:
    """Import ``"pkg.module.Name"`` and return ``Name``."""
    module, _, name = string.rpartition(".")
    if not module:
        raise ConfigError(f"target '{string}' is not a dotted path like 'pkg.module.Class'")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ConfigError(f"target '{string}': cannot import module '{module}' ({e})") from e
    try:
        return getattr(mod, name)
    except AttributeError as e:
        raise ConfigError(f"target '{string}': module '{module}' has no attribute '{name}'") from e


def _to_container(x: Any) -> Any:
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


def check_params(obj: Any, params: Mapping[str, Any], where: str) -> None:
    """Raise :class:`ConfigError` for keys of ``params`` that ``obj``'s signature does not accept."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    accepted = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    unknown = [k for k in params if k not in accepted]
    if unknown:
        valid = ", ".join(k for k, p in accepted.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
        raise ConfigError(
            f"{where}: unknown key(s) {unknown} for target '{getattr(obj, '__qualname__', obj)}'. "
            f"Valid keys: {valid}. Fix the spelling or remove the key."
        )


def instantiate_from_config(config: Mapping[str, Any] | DictConfig, **extra: Any) -> Any:
    """Build ``config["target"](**config["params"], **extra)``.

    ldm COMPAT: the placeholder strings ``__is_first_stage__`` and ``__is_unconditional__`` return None.
    ``params`` may be absent. Nested OmegaConf nodes are passed to the target as plain dicts/lists, so
    constructors never see OmegaConf types.
    """
    if isinstance(config, str) and config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if not isinstance(config, (Mapping, DictConfig)) or "target" not in config:
        raise ConfigError(f"expected a mapping with a 'target' key, got: {config!r}")
    target = config["target"]
    obj = get_obj_from_str(target)
    params = _to_container(config.get("params", None)) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"'params' of target '{target}' must be a mapping, got {type(params).__name__}")
    params = {**params, **extra}
    check_params(obj, params, where=f"params of '{target}'")
    return obj(**params)


def load_config(paths: Sequence[str | Path], dotlist: Iterable[str] = ()) -> DictConfig:
    """Merge yaml files left to right, then apply ``a.b.c=value`` overrides (OmegaConf dotlist syntax).

    Missing files and malformed overrides raise :class:`ConfigError` naming the file or token.
    """
    configs = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            configs.append(OmegaConf.load(path))
        except Exception as e:  # yaml syntax errors carry line numbers; keep them
            raise ConfigError(f"cannot parse config {path}: {e}") from e
    dotlist = list(dotlist)
    for token in dotlist:
        if "=" not in token or token.startswith("="):
            raise ConfigError(f"override '{token}' is not of the form key.path=value")
    overrides = []
    for token in dotlist:  # one at a time, so a malformed value is reported with its token
        try:
            overrides.append(OmegaConf.from_dotlist([token]))
        except Exception as e:
            raise ConfigError(f"cannot parse override '{token}': {str(e).splitlines()[0]}") from e
    return OmegaConf.merge(*configs, *overrides) if configs or overrides else OmegaConf.create()


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
