"""`name=value,name2=value2` knobs (target_weights, entropy_weights, channel weights)."""
from __future__ import annotations

import math
from collections.abc import Iterable

from pipeline.engine.errors import ConfigError


def parse_weights(spec: str | dict | None, known: Iterable[str], key: str) -> dict[str, float]:
    """Parse ``"o_proj=1.15,v_proj"`` (a bare name means 1.0) or a mapping; unknown names and values that are
    not finite numbers (``q_proj=nan``, ``inf``) are an error."""
    known = list(known)
    if not spec:
        return {}
    items = spec.items() if isinstance(spec, dict) else (
        (part.split("=", 1) + ["1.0"])[:2] for part in str(spec).split(",") if part.strip())
    out = {}
    for name, value in items:
        name = str(name).strip()
        if name not in known:
            raise ConfigError(f"{key}: unknown name '{name}'; known: {', '.join(known)}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: value of '{name}' must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: value of '{name}' must be a finite number, got {value!r}")
        out[name] = number
    return out
