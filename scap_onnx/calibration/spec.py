"""SPEC: target sparsity for every target (``0.5``) or per role (``up=0.35,gate=0.35,down=0.55``).

A per-role SPEC names the roles to sparsify; targets of other roles stay dense. ``*=0.3`` (or
``all=0.3``) sets every role not named otherwise. A fused projection takes the value of its parts
when the SPEC does not name it: ``gate_up`` (Phi-3) that of gate and up, ``qkv`` that of q, k and v
(their mean if they differ), so a Llama SPEC means the same on a model with fused projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ScapError
from ..graph.targets import ROLES

#: Roles whose inputs are not the output of a normalisation in pre-norm (Llama, GPT-2) and
#: post-norm (BERT) transformers: the attention output (o) and the MLP's hidden activation (down).
#: The roles the ``scap-search`` method scales per token (``--token-scaled o,down`` for any method):
#: thresholds calibrated on one text then hold better on others, at some cost in quality, which is why
#: the default method leaves it out (docs/calibration.md; the rule itself: scap_onnx.op.token_norm).
TOKEN_SCALED_ROLES: tuple[str, ...] = ("o", "down")

#: Fused roles and the roles they fuse.
FUSED_ROLES = {"gate_up": ("gate", "up"), "qkv": ("q", "k", "v")}


def shared_sparsity(values: list) -> float | None:
    """One sparsity for several (None: left dense) values: their mean, exact when they are equal."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return vals[0] if max(vals) == min(vals) else sum(vals) / len(vals)


@dataclass(frozen=True)
class Spec:
    """Parsed SPEC: ``default`` applies to roles absent from ``roles`` (None: those stay dense)."""

    default: float | None = None
    roles: dict[str, float] = field(default_factory=dict)

    def sparsity(self, role: str) -> float | None:
        """Target sparsity of a role, or None when the SPEC leaves it dense."""
        if role in self.roles:
            return self.roles[role]
        parts = FUSED_ROLES.get(role, ())
        if any(r in self.roles for r in parts):
            return shared_sparsity([self.roles.get(r, self.default) for r in parts])
        return self.default

    def __str__(self) -> str:
        if not self.roles and self.default is not None:
            return _fmt(self.default)
        items = [f"{r}={_fmt(v)}" for r, v in self.roles.items()]
        if self.default is not None:
            items.append(f"*={_fmt(self.default)}")
        return ",".join(items)


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _value(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ScapError(f"sparsity {where!r} is not a number") from None
    if not (0.0 <= v < 1.0) or math.isnan(v):
        raise ScapError(f"sparsity {where!r} is outside [0, 1)")
    return v


def parse_spec(text: str | float | Spec) -> Spec:
    """Parse a SPEC string (or a number). Raises ScapError on a malformed SPEC."""
    if isinstance(text, Spec):
        return text
    if isinstance(text, (int, float)):
        return Spec(default=_value(str(text), str(text)))
    text = text.strip()
    if not text:
        raise ScapError("empty sparsity SPEC; give a number like 0.5 or roles like up=0.35,down=0.55")
    if "=" not in text:
        return Spec(default=_value(text, text))
    default: float | None = None
    roles: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ScapError(f"sparsity SPEC item {item!r} is not ROLE=VALUE (roles: {', '.join(ROLES)})")
        role, value = (p.strip() for p in item.split("=", 1))
        v = _value(value, item)
        if role in ("*", "all", "default"):
            default = v
        elif role in ROLES:
            if role in roles:
                raise ScapError(f"sparsity SPEC names role {role!r} twice")
            roles[role] = v
        else:
            raise ScapError(f"unknown role {role!r} in sparsity SPEC (roles: {', '.join(ROLES)})")
    if not roles and default is None:
        raise ScapError(f"sparsity SPEC {text!r} names no role")
    return Spec(default=default, roles=roles)


def parse_roles(value: str | None) -> tuple[str, ...] | None:
    """``"o,down"`` -> ("o", "down"); ``"none"`` or "" -> () (static thresholds); None -> None (the
    calibration method's own roles)."""
    if value is None:
        return None
    roles = tuple(r.strip() for r in value.split(",") if r.strip())
    return () if roles in (("none",), ()) else roles
