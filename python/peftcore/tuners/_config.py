"""What every tuner config shares: PEFT's module-name matching, dtype names, and (de)serialisation."""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from typing import Union

import torch


def match_module_name(patterns: Union[list[str], str], name: str) -> bool:
    """PEFT's rules: a regex string must ``fullmatch`` the name; a list matches an exact name or a ``.suffix``."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def dtype_name(owner: str, dtype: Union[str, torch.dtype], floating: bool = False) -> str:
    """``torch.float32`` / ``"float32"`` -> ``"float32"``; raises naming ``owner`` for anything else."""
    name = str(dtype).removeprefix("torch.")
    t = getattr(torch, name, None)
    if not isinstance(t, torch.dtype) or (floating and not t.is_floating_point):
        raise ValueError(f"{owner}: unknown {'floating ' if floating else ''}dtype {dtype!r}")
    return name


class TunerConfigMixin:
    """For dataclass configs with ``target_modules`` / ``exclude_modules`` fields."""

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` is targeted (PEFT's rules: exact name, ``.suffix``, or regex)."""
        if self.exclude_modules and match_module_name(self.exclude_modules, name):
            return False
        if self.target_modules is None:
            raise ValueError(f"{type(self).__name__}: target_modules must be set")
        return match_module_name(self.target_modules, name)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{k: v for k, v in d.items() if k != "peft_type"})

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))
