"""Every constructor parameter of every class a config targets is used, or listed as ignored with a reason.

"Used" is decided on the source (an AST scan of ``__init__``), not by reading docstrings:

* a parameter is *used* when ``__init__`` reads it for anything but storing it on ``self``, handing it to
  ``compat.note_ignored`` or ``del``: a check, a computation, an argument to a sub-module;
* a parameter that is only stored (``self.x = f(param)``) counts only if ``self.x`` is read back: in a method
  of the class, a base or a subclass, or as ``<obj>.x`` anywhere in the code. A stored value that nothing
  reads is the silent kind of "accepted": it looks wired and is not;
* anything else must be listed in ``ldm.compat.IGNORED_PARAMS`` as ``"<Class>.<param>"``, and a listed
  parameter must really be ignored (neither used nor stored); every entry must name a real parameter.
Dataclasses (no ``__init__`` source) count their fields as stored attributes.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ldm.compat import IGNORED_PARAMS
from ldm.util import get_obj_from_str

ROOT = Path(__file__).resolve().parents[1]
CODE = [*ROOT.joinpath("ldm").rglob("*.py"), ROOT / "main.py", *ROOT.joinpath("scripts").glob("*.py")]
#: calls whose arguments do not count as a use of a parameter
NOT_A_USE = {"note_ignored"}


def yaml_targets(node) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("target"), str):
            yield node["target"]
        for value in node.values():
            yield from yaml_targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from yaml_targets(value)


def config_classes() -> dict[str, type]:
    """``{short name: class}`` for every ``target`` in configs/ that is defined in this repository."""
    out = {}
    for path in sorted(ROOT.joinpath("configs").rglob("*.yaml")):
        for target in yaml_targets(yaml.safe_load(path.read_text())):
            if target.split(".")[0] not in ("ldm", "main"):
                continue
            cls = get_obj_from_str(target)
            out[cls.__name__] = cls
    return out


CLASSES = config_classes()


def init_tree(cls: type) -> ast.FunctionDef:
    return ast.parse(textwrap.dedent(inspect.getsource(cls.__init__))).body[0]


def parameters(fn: ast.FunctionDef) -> list[str]:
    args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
    return [a.arg for a in args if a.arg != "self"]


def names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def stores_and_uses(fn: ast.FunctionDef, params: list[str]) -> tuple[dict[str, set[str]], set[str]]:
    """``({param: self attributes it is stored in}, {params used otherwise in __init__})``."""
    stored: dict[str, set[str]] = {p: set() for p in params}
    skip: set[int] = set()  # node ids whose names do not count as a use
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in NOT_A_USE:
            skip |= {id(m) for m in ast.walk(node)}
        elif isinstance(node, ast.Delete):
            skip |= {id(m) for m in ast.walk(node)}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                pairs = [(target, node.value)]
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple) and \
                        len(target.elts) == len(node.value.elts):
                    pairs = list(zip(target.elts, node.value.elts))
                for t, v in pairs:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        for p in names_in(v) & set(params):
                            stored[p].add(t.attr)
                        skip |= {id(m) for m in ast.walk(v)}
    used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
            and id(n) not in skip and n.id in params}
    return stored, used


def scan(cls: type) -> tuple[list[str], dict[str, set[str]], set[str]]:
    """``(parameters, stored, used)`` of a class's constructor."""
    if dataclasses.is_dataclass(cls):
        fields = [f.name for f in dataclasses.fields(cls) if f.init]
        return fields, {f: {f} for f in fields}, set()
    fn = init_tree(cls)
    params = parameters(fn)
    return params, *stores_and_uses(fn, params)


def family_sources(cls: type) -> list[ast.AST]:
    """ASTs of the class, its bases and its subclasses defined in the class's own package."""
    home = cls.__module__.split(".")[0]
    family = {c for c in cls.__mro__ if c.__module__.split(".")[0] in ("ldm", "main", home)}
    todo = [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.split(".")[0] in ("ldm", "main", home) and sub not in family:
                family.add(sub)
                todo.append(sub)
    return [ast.parse(textwrap.dedent(inspect.getsource(c))) for c in family]


@pytest.fixture(scope="module")
def code_reads() -> set[str]:
    """Attribute names read as ``<obj>.name`` (obj not ``self``) or ``getattr(obj, "name")`` anywhere in the code."""
    reads = set()
    for path in CODE:
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and \
                    not (isinstance(n.value, ast.Name) and n.value.id == "self"):
                reads.add(n.attr)
            elif isinstance(n, ast.Call) and getattr(n.func, "id", None) in ("getattr", "hasattr") and \
                    len(n.args) >= 2 and isinstance(n.args[1], ast.Constant):
                reads.add(n.args[1].value)  # getattr(model, "name", default)
    return reads


def self_reads(trees: list[ast.AST]) -> set[str]:
    reads = set()
    for tree in trees:
        for cls_node in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for fn in (n for n in cls_node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
                for n in ast.walk(fn):
                    if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and \
                            isinstance(n.value, ast.Name) and n.value.id == "self":
                        reads.add(n.attr)
    return reads


def test_the_scan_covers_the_shipped_configs():
    assert {"LatentDiffusion", "LatentInpaintDiffusion", "UNetModel", "AutoencoderKL", "FrozenOpenCLIPEmbedder",
            "WebDataModuleFromConfig", "AddMask", "LambdaLinearScheduler", "ImageLogger"} <= set(CLASSES)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_parameter_is_used_or_ignored(name, code_reads):
    cls = CLASSES[name]
    params, stored, used = scan(cls)
    own = self_reads(family_sources(cls))
    problems = []
    for p in params:
        if f"{name}.{p}" in IGNORED_PARAMS:
            if stored[p] or p in used:
                problems.append(f"{p}: listed in IGNORED_PARAMS but stored in {sorted(stored[p])} or used")
        elif p not in used and not any(a in own or a in code_reads for a in stored[p]):
            where = f"stored as self.{'/'.join(sorted(stored[p]))} but never read" if stored[p] else "never read"
            problems.append(f"{p}: {where}; use it, reject it, or list it in ldm.compat.IGNORED_PARAMS")
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


def test_ignored_entries_name_real_parameters():
    for key in IGNORED_PARAMS:
        owner, _, param = key.partition(".")
        if "." in param:  # nested keys such as ImageLogger.log_images_kwargs.inpaint
            continue
        assert owner in CLASSES, f"IGNORED_PARAMS[{key!r}]: no config-targeted class {owner}"
        assert param in scan(CLASSES[owner])[0], f"IGNORED_PARAMS[{key!r}]: no such parameter"


def test_the_scan_can_fail():
    class Wired:
        def __init__(self, a: int, b: int, c: int, d: int) -> None:
            self.a = a  # stored, never read: a silent key
            self.b = b * 2  # stored, read in get()
            if d < 0:  # used: validated
                raise ValueError(d)
            del c  # never used

        def get(self) -> int:
            return self.b

    params, stored, used = scan(Wired)
    assert params == ["a", "b", "c", "d"]
    assert stored == {"a": {"a"}, "b": {"b"}, "c": set(), "d": set()} and used == {"d"}
    own = self_reads(family_sources(Wired))
    assert "b" in own and "a" not in own
