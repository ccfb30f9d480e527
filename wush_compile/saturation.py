"""NVFP4 activation saturation: how many activation values a static global scale clips.

An NVFP4 layer with a static activation global scale ``g`` (from calibration) quantizes a block of 16 transformed
activations with the e4m3 block scale ``min(amax / (6 g), 448)`` (SPEC section 3). A block whose amax is above
``448 * 6 * g`` gets the largest scale, and every value in it above that limit is clipped to +-6 codes: the
calibration range was too small for this input. :class:`SaturationCounter` counts those values, per layer, on the
device the model runs on (forward pre-hooks computing the transformed input with the same torch code as the
reference quantizer, whichever kernel then runs the layer), without a host sync per call:

    with SaturationCounter(model) as counter:
        model(input_ids)
    print(counter.report())          # saturated values per layer, the worst amax / limit

Layers with ``dynamic_act_scale`` (``WushConfig(act_scale="dynamic")``) take their scale from each call and never
saturate; MXFP4 layers have no global scale to exceed. Neither is counted. The hooks do nothing while
``torch.compile`` traces the model (they would change the graph): count on an eager run.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
from torch import nn

from . import formats, transforms
from .config import Format
from .modules import WushLinear

logger = logging.getLogger(__name__)

__all__ = ["LayerSaturation", "SaturationReport", "SaturationCounter", "saturation_limit", "counted_layers"]


def saturation_limit(layer: WushLinear) -> torch.Tensor:
    """The largest transformed-activation magnitude ``layer`` represents: ``448 * 6 * act_global_scale`` (fp32 0-d)."""
    return layer.act_global_scale.to(torch.float32) * (formats.E4M3_MAX * formats.E2M1_MAX)


def counted_layers(model: nn.Module) -> dict[str, WushLinear]:
    """The layers whose activations can saturate: NVFP4 WushLinears with a static (or fixed) global scale."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, WushLinear) and m.fmt is Format.NVFP4 and not m.dynamic_act_scale
    }


@dataclasses.dataclass(frozen=True)
class LayerSaturation:
    """One layer's count: ``saturated`` of ``values`` transformed activations were above ``limit``; the largest
    was ``max_ratio`` times the limit."""

    name: str
    values: int
    saturated: int
    max_ratio: float
    limit: float

    @property
    def fraction(self) -> float:
        return self.saturated / self.values if self.values else 0.0


@dataclasses.dataclass(frozen=True)
class SaturationReport:
    """Per-layer saturation counts (see the module docstring)."""

    layers: tuple[LayerSaturation, ...]

    @property
    def values(self) -> int:
        return sum(r.values for r in self.layers)

    @property
    def saturated(self) -> int:
        return sum(r.saturated for r in self.layers)

    @property
    def saturated_layers(self) -> tuple[LayerSaturation, ...]:
        return tuple(r for r in self.layers if r.saturated)

    @property
    def fraction(self) -> float:
        return self.saturated / self.values if self.values else 0.0

    @property
    def max_ratio(self) -> float:
        """The largest transformed activation seen, as a multiple of its layer's limit (> 1: something clipped)."""
        return max((r.max_ratio for r in self.layers), default=0.0)

    def summary(self, top: int = 5) -> str:
        """One line, and up to ``top`` lines for the layers that saturated most."""
        if not self.layers:
            return "NVFP4 activation saturation: no layer with a static activation scale was called"
        head = (
            f"NVFP4 activation saturation: {self.saturated} of {self.values} transformed activation values "
            f"({100 * self.fraction:.4g}%) clipped at their static scale's limit in {len(self.saturated_layers)} of "
            f"{len(self.layers)} layers"
        )
        worst = sorted(self.saturated_layers, key=lambda r: (-r.fraction, r.name))[:top]
        lines = [head] + [
            f"  {r.name or '(the module)'}: {r.saturated} of {r.values} ({100 * r.fraction:.3g}%), amax {r.max_ratio:.3g}x the limit "
            f"{r.limit:.4g}" for r in worst
        ]
        if worst:
            lines.append("  inputs exceed the calibration range: calibrate on data like these inputs, raise "
                         "WushConfig.act_headroom, or use act_scale='dynamic'")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "values": self.values, "saturated": self.saturated, "fraction": self.fraction,
            "layers": {r.name: {"values": r.values, "saturated": r.saturated, "max_ratio": r.max_ratio,
                                "limit": r.limit} for r in self.layers},
        }

    def __str__(self) -> str:
        return self.summary()


class _Tally:
    """Running totals of one layer, kept on its device (no host sync per call)."""

    def __init__(self) -> None:
        self.values = 0
        self.saturated: Optional[torch.Tensor] = None
        self.max_ratio: Optional[torch.Tensor] = None
        self.limit = float("nan")

    def add(self, layer: WushLinear, x: torch.Tensor) -> None:
        limit = saturation_limit(layer)  # () fp32
        xt = transforms.transform_activations(x.detach(), layer.transform).abs()  # (..., K) fp32
        finite = torch.isfinite(xt)
        over = ((xt > limit) & finite).sum()
        ratio = torch.where(finite, xt, torch.zeros_like(xt)).amax() / limit if xt.numel() else limit.new_zeros(())
        self.values += xt.numel()
        self.saturated = over if self.saturated is None else self.saturated + over
        self.max_ratio = ratio if self.max_ratio is None else torch.maximum(self.max_ratio, ratio)
        self.limit = limit

    def result(self, name: str) -> LayerSaturation:
        return LayerSaturation(
            name, self.values, int(self.saturated) if self.saturated is not None else 0,
            float(self.max_ratio) if self.max_ratio is not None else 0.0, float(self.limit),
        )


class SaturationCounter:
    """Context manager counting saturated NVFP4 activations of ``model``'s static-scale layers (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SaturationCounter expects an nn.Module, got {type(model).__name__}")
        self.layers = counted_layers(model)
        self._tallies: dict[str, _Tally] = {}
        self._handles: list = []

    def __enter__(self) -> "SaturationCounter":
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: WushLinear, args) -> None:
            if torch.compiler.is_compiling() or not args or not isinstance(args[0], torch.Tensor):
                return
            self._tallies.setdefault(name, _Tally()).add(module, args[0])

        return hook

    def report(self) -> SaturationReport:
        """The counts so far (one host sync per layer)."""
        rep = SaturationReport(tuple(t.result(n) for n, t in self._tallies.items()))
        if rep.saturated:
            logger.warning("%s", rep.summary())
        return rep
