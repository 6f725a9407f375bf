"""Recipes: an ordered list of step configs, from a named preset (recipes/*.yaml shipped with
lathe) or a user's YAML file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from lathe.compress.config import config_from_dict, config_to_dict
from lathe.errors import BadInput

PRESET_DIR = Path(__file__).parent / "recipes"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@dataclass
class Recipe:
    name: str
    steps: list

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": [config_to_dict(s) for s in self.steps]}


def load_recipe(name_or_path) -> Recipe:
    p = Path(str(name_or_path))
    if p.suffix in (".yaml", ".yml", ".json") or p.exists():
        if not p.exists():
            raise BadInput(f"recipe file not found: {p}")
        if not p.is_file():
            raise BadInput(f"recipe {p} is not a regular file")
        try:
            text, where = p.read_text(encoding="utf-8"), str(p)
        except UnicodeDecodeError:
            raise BadInput(f"recipe {p} is not UTF-8 text") from None
        except OSError as e:
            raise BadInput(f"cannot read recipe {p}: {e.strerror}") from None
    else:
        preset = PRESET_DIR / f"{name_or_path}.yaml"
        if not preset.is_file():
            raise BadInput(f"unknown recipe {str(name_or_path)!r}; presets: {', '.join(presets())}")
        text, where = preset.read_text(), f"preset {name_or_path}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BadInput(f"{where} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{where}: a recipe is a mapping with 'name' and 'steps'")
    unknown = sorted(set(data) - {"name", "steps", "description"})
    if unknown:
        raise BadInput(f"{where}: unknown field {unknown[0]!r}; expected name, description, steps")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise BadInput(f"{where}: 'steps' must be a non-empty list")
    cfgs = [config_from_dict(s, f"{where} step {i + 1}") for i, s in enumerate(steps)]
    check_order(cfgs, where)
    return Recipe(name=str(data.get("name", p.stem)), steps=cfgs)


# Steps that replace Linear layers by quantized modules: nothing can run after one (a second
# quantization, pruning or distillation would need the fp weights it replaced).
QUANT_METHODS = ("int8", "int4", "int8-weight-only", "fp8")


def check_order(cfgs: list, where: str):
    """Refuses, at recipe validation (before any model is loaded), step orders that cannot work."""
    for i, c in enumerate(cfgs[:-1]):
        if c.method in QUANT_METHODS:
            nxt = cfgs[i + 1]
            raise BadInput(f"{where}: step {i + 2} ({nxt.method}) follows the quantization step {i + 1} "
                           f"({c.method}); quantization must be the last step")
