"""The registry of invbench's own defences and attacks as data, so that the command line need not import them.

Listing the defences, the attacks, or the flags of `invbench run` needs no model and no tensor, but
importing the classes imports torch, transformers and opacus: 5 seconds and more per `invbench --help`
on a busy 2-core machine. So the command line reads `listing.json` (package data), written from the live
registries by `build_listing` (`python -m invbench.listing`), and a test fails when the two differ: a
new defence, attack or option is one command away from its flags. Outside defences (entry points of
other packages, plug-in files) are not in it: `invbench defenses` imports those as before.
"""
from __future__ import annotations

import json
import sys
from dataclasses import MISSING
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

LISTING = "listing.json"
ENTRY_POINT_GROUP = "invbench.defenses"  # where other packages register defences (invbench.defenses.registry)
KINDS = {"int": int, "float": float, "str": str, "bool": bool}


def first_line(doc: str | None) -> str:
    """The first non-blank line of a docstring ('' for none or a blank one)."""
    return next((line.strip() for line in (doc or "").splitlines() if line.strip()), "")


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring as one line ('' for none or a blank one): a docstring's
    first line is often half a sentence."""
    paragraph = []
    for line in (doc or "").strip().splitlines():
        if not line.strip():
            break
        paragraph.append(line.strip())
    return " ".join(paragraph)


def build_listing() -> dict[str, Any]:
    """The listing from the live registries (imports every defence and attack)."""
    from invbench.attacks import available_attacks
    from invbench.attacks.base import command_line_options
    from invbench.defenses import available_defenses

    defenses = {name: {"params": {p: t.__name__ for p, t in cls.param_types.items()}, "doc": first_paragraph(cls.__doc__)}
                for name, cls in sorted(available_defenses().items()) if _own(cls)}
    attacks = {}
    for name, cls in available_attacks().items():
        options = {}
        for option, f in command_line_options(cls.config_class).items():
            metadata = {k: (list(v) if isinstance(v, tuple) else v) for k, v in f.metadata.items() if k != "help"}
            default = f.default if f.default is not MISSING else None
            options[option] = {"help": f.metadata["help"], "kind": type(default).__name__, "metadata": metadata,
                               "default": default}
        attacks[name] = {"doc": first_line(sys.modules[cls.__module__].__doc__), "presets": list(cls.presets),
                         "options": options}
    from invbench.attacks.base import OPTION_INT_MAX, PRESET_NAMES
    from invbench.attacks.ranker import Recipe

    recipe = Recipe()
    return {"defenses": defenses, "attacks": attacks, "preset_names": list(PRESET_NAMES), "option_int_max": OPTION_INT_MAX,
            "ranker_recipe": {"documents": recipe.documents, "held_out": recipe.held_out,
                              "tokens_per_document": recipe.tokens_per_document}}


def _own(cls: type) -> bool:
    """A defence of invbench itself (the listing holds no outside code)."""
    return cls.__module__.startswith("invbench.")


@lru_cache(maxsize=None)
def load_listing() -> dict[str, Any]:
    """The listing as shipped (package data)."""
    return json.loads(resources.files("invbench").joinpath(LISTING).read_text(encoding="utf-8"))


def write_listing(path: Path | None = None) -> Path:
    path = path or Path(__file__).with_name(LISTING)
    path.write_text(json.dumps(build_listing(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(f"wrote {write_listing()}")
