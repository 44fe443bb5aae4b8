"""Named defences: built-ins register with `@register_defense`; outside ones come from the
entry-point group `invbench.defenses` or from `path/to/file.py:ClassName`.

An outside defence may not take a registered defence's name (its records would read as that
defence's, with its citation and recomputed guarantee), and its code is part of what identifies a
run (`code_identity`: the configuration hash covers it, so a plug-in edited after a run began is a
different run, not a resumed one). Its import and constructor run under `refuse_exits`: a plug-in
that calls sys.exit or os._exit gets one error line, never a silent exit 0."""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from invbench.errors import one_line, refuse_exits
from invbench.registry import Registry, is_file_spec

from .base import Defense, DefenseError

ENTRY_POINT_GROUP = "invbench.defenses"  # bench/listing.py names it too, for the command line
DEFENSES: Registry[type[Defense]] = Registry("defence", base=Defense, error=DefenseError)


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: make a defence available by its `name`. A name already taken by another
    class raises DefenseError: a plug-in cannot replace a built-in (or another plug-in)."""
    return DEFENSES.register(cls)


def available_defenses() -> dict[str, type[Defense]]:
    """Registered defences plus every entry point of the group `invbench.defenses`; where an entry
    point's name is taken, the registered defence wins and the entry point is not loaded."""
    found = DEFENSES.items()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            try:
                loaded = ep.load()
            except Exception as exc:  # an installed plug-in's own code: name it, in one line
                raise DefenseError(f"could not load the defence entry point {ep.name!r} ({ep.value}): "
                                   f"{type(exc).__name__}: {one_line(exc, limit=300) or '(no message)'}") from exc
            cls = _checked(loaded, f"entry point {ep.name!r}")
            if cls.name != ep.name:
                raise DefenseError(f"the defence entry point {ep.name!r} ({ep.value}) loads a class named {cls.name!r}: "
                                   "an entry point's class must carry the entry point's name")
            found[ep.name] = cls
    return found



def _checked(obj: Any, where: str) -> type[Defense]:
    if not (isinstance(obj, type) and issubclass(obj, Defense)):
        raise DefenseError(f"{where} is not a subclass of invbench.defenses.Defense")
    return obj


def load_defense_class(spec: str) -> type[Defense]:
    """A registered name, or `path/to/file.py:ClassName`."""
    if is_file_spec(spec):
        path_str, cls_name = spec.rsplit(":", 1)
        path = Path(path_str)
        if not path.is_file():
            raise DefenseError(f"defence file not found: {path_str}")
        module_spec = importlib.util.spec_from_file_location(f"invbench_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the plug-in is user code: report, don't trace
            message = one_line(exc, limit=300) or "(no message)"
            raise DefenseError(f"could not import defence file {path_str}: {type(exc).__name__}: {message}") from exc
        if not hasattr(module, cls_name):
            raise DefenseError(f"{path_str} has no class {cls_name!r}")
        cls = _checked(getattr(module, cls_name), f"{spec}")
        if cls.name in available_defenses():
            raise DefenseError(f"{spec} names itself {cls.name!r}, a registered defence's name; a plug-in must take a "
                               "name of its own (set the class's `name`)")
        return cls
    known = available_defenses()
    if spec not in known:
        raise DefenseError(f"unknown defence {spec!r}; choose one of {', '.join(sorted(known))} or give FILE.py:Class")
    return known[spec]


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True,
               "false": False, "0": False, "no": False, "off": False}


def _convert(kind: type, text: str) -> Any:
    """A command-line string as `kind`; bool("false") would be True, so bools go by word."""
    if kind is bool:
        if text.strip().lower() not in _BOOL_WORDS:
            raise ValueError(text)
        return _BOOL_WORDS[text.strip().lower()]
    return kind(text)


def code_identity(spec: str) -> dict[str, Any] | None:
    """What identifies an outside defence's code, for a run's configuration hash: a plug-in file's
    name and the SHA-256 of its source, or an entry point's distribution, version and the SHA-256 of
    its module's source. None for invbench's own defences (their code is pinned by invbench's
    version and git commit, which every result records)."""
    if is_file_spec(spec):
        path = Path(spec.rsplit(":", 1)[0])
        return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if spec in DEFENSES:
        return None
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            dist = ep.dist.name if ep.dist is not None else None
            if dist == "invbench":
                return None
            source = inspect.getsourcefile(load_defense_class(spec))
            digest = hashlib.sha256(Path(source).read_bytes()).hexdigest() if source else None
            return {"package": dist, "version": ep.dist.version if ep.dist is not None else None, "sha256": digest}
    return None


def make_defense(spec: str, params: dict[str, Any] | None = None) -> Defense:
    """Instantiate a defence, converting string parameters with the class's `param_types`. Outside
    code (import and constructor) may not end the process (`refuse_exits`)."""
    with refuse_exits(f"the defence {spec}"):
        return _make_defense(spec, params)


def _make_defense(spec: str, params: dict[str, Any] | None) -> Defense:
    cls = load_defense_class(spec)
    converted = {}
    for key, value in (params or {}).items():
        key = key.replace("-", "_")  # --noise-multiplier and noise_multiplier name the same parameter
        if key not in cls.param_types:
            allowed = ", ".join(sorted(cls.param_types)) or "none"
            raise DefenseError(f"defence {cls.name!r} has no parameter {key!r}; allowed: {allowed}")
        kind = cls.param_types[key]
        try:
            converted[key] = _convert(kind, value) if isinstance(value, str) else value
        except ValueError:
            raise DefenseError(f"defence {cls.name!r}: parameter {key}={value!r} is not a valid {kind.__name__}") from None
    try:
        return cls(**converted)
    except DefenseError:
        raise
    except TypeError as exc:
        raise DefenseError(f"defence {cls.name!r}: {one_line(exc, limit=300)}") from None
    except Exception as exc:  # a plug-in's own code: name it, in one line
        raise DefenseError(f"defence {cls.name!r} ({cls.__module__}.{cls.__qualname__}): __init__ raised "
                           f"{type(exc).__name__}: {one_line(exc, limit=300) or '(no message)'}") from exc
