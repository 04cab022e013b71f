"""Resource quantities as the API server stores them: parsed and written back in canonical form, so
`1024Mi` reads back as `1Gi`, `0.5` CPU as `500m` and `2000m` as `2` (resource.Quantity's canonical String())."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

_BINARY = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_DECIMAL = {-9: "n", -6: "u", -3: "m", 0: "", 3: "k", 6: "M", 9: "G", 12: "T", 15: "P", 18: "E"}


def canonical(value: Any) -> Any:
    """The canonical string of a quantity (a value that is not one is returned as it is, for validation to
    report)."""
    text = str(value)
    try:
        amount = parse_quantity(text)
    except ValueError:
        return value
    if text.endswith(_BINARY[1:]) and amount == amount.to_integral_value() and amount >= 1024:
        for power in range(len(_BINARY) - 1, 0, -1):
            scaled = amount / Decimal(1024) ** power
            if scaled == scaled.to_integral_value():
                return f"{int(scaled)}{_BINARY[power]}"
    # Decimal SI: the largest exponent (a multiple of 3) that leaves an integer; sub-nano rounds up.
    for exponent in sorted(_DECIMAL, reverse=True):
        scaled = amount / Decimal(10) ** exponent
        if scaled == scaled.to_integral_value() and (scaled != 0 or exponent == 0):
            return f"{int(scaled)}{_DECIMAL[exponent]}"
    return f"{int((amount * Decimal(10) ** 9).to_integral_value(rounding='ROUND_CEILING'))}n"


def canonical_pod_spec(pod: dict[str, Any]) -> None:
    """Container resources and emptyDir size limits of a pod spec, in place."""
    for container in [*(pod.get("containers") or []), *(pod.get("initContainers") or [])]:
        for section in ("requests", "limits"):
            values = (container.get("resources") or {}).get(section)
            if isinstance(values, dict):
                for key in values:
                    values[key] = canonical(values[key])
    for volume in pod.get("volumes") or []:
        empty_dir = volume.get("emptyDir")
        if isinstance(empty_dir, dict) and "sizeLimit" in empty_dir:
            empty_dir["sizeLimit"] = canonical(empty_dir["sizeLimit"])
