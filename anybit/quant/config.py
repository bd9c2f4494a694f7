"""Quantization config of a checkpoint: which Linear modules are quantized, and how.

In: the ``quantization_config`` dict of a Hugging Face config.json. Out: a ``QuantConfig`` whose
``get_quant_method(shard_names)`` gives the QuantMethod of one (possibly fused) Linear layer.
Called by the model builder (anybit/models) for every Linear, and written by ``anybit quantize``.

Our own format (``quant_method: "anybit"``)::

    {"quant_method": "anybit", "format_version": 1, "bits": 3, "group_size": 128,
     "format": "uniform", "modules": {"model.layers.0.self_attn.q_proj":
                                      {"bits": 3, "group_size": 128, "format": "uniform"}, ...}}

``modules`` lists every quantized module (a module not listed stays unquantized). Without
``modules`` the default spec applies to every Linear except ``lm_head`` and the names in
``modules_to_not_convert``.

Imported GPTQ checkpoints (``quant_method: "gptq"``): ``bits`` in 2/3/4/8, ``group_size``
(-1 = per channel), ``desc_act``, ``sym``, ``checkpoint_format`` ("gptq" stores zeros - 1,
"gptq_v2" stores zeros), ``lm_head`` (bool). Tensors ``qweight``, ``qzeros``, ``scales``,
``g_idx``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from anybit.quant.rtn import QuantSpec

QUANT_METHODS = ("anybit", "gptq")
GPTQ_BITS = (2, 3, 4, 8)


def _spec_from(d: dict, where: str) -> QuantSpec:
    try:
        return QuantSpec(bits=d.get("bits", 4), group_size=d.get("group_size", 128),
                         fmt=d.get("format", "uniform"), act_order=bool(d.get("act_order", False)))
    except (ValueError, TypeError) as e:
        raise ValueError(f"quantization_config.{where}: {e}") from None


@dataclass(frozen=True)
class QuantConfig:
    """quant_method: "anybit" | "gptq"; default: spec for modules without their own entry."""

    quant_method: str = "anybit"
    default: QuantSpec = field(default_factory=QuantSpec)
    modules: dict[str, QuantSpec] | None = None  # explicit per-module specs (anybit)
    modules_to_not_convert: tuple[str, ...] = ()
    quantize_lm_head: bool = False
    desc_act: bool = False  # gptq only
    gptq_zero_offset: int = 1  # gptq v1 stores zero - 1

    def __post_init__(self):
        if self.quant_method not in QUANT_METHODS:
            raise ValueError(f"quantization_config.quant_method: got {self.quant_method!r}, "
                             f"allowed: {', '.join(QUANT_METHODS)}")
        if self.quant_method == "gptq" and self.default.bits not in GPTQ_BITS:
            raise ValueError(f"quantization_config.bits: GPTQ checkpoints with {self.default.bits} "
                             f"bits are not supported, allowed: {', '.join(map(str, GPTQ_BITS))}")

    def spec_for(self, name: str) -> QuantSpec | None:
        """The spec of one Hugging Face module name, or None if it stays unquantized."""
        if self.modules is not None:
            return self.modules.get(name)
        if any(fnmatch.fnmatchcase(name, p) or name.endswith("." + p) or name == p
               for p in self.modules_to_not_convert):
            return None
        if name.split(".")[-1] == "lm_head" and not self.quantize_lm_head:
            return None
        return self.default

    def get_quant_method(self, shard_names: list[str]):
        """shard_names: HF names of the parts of one Linear -> QuantMethod, or None (unquantized)."""
        from anybit.layers.quant_linear import AnyBitLinearMethod, GPTQLinearMethod

        specs = [self.spec_for(n) for n in shard_names]
        if all(s is None for s in specs):
            return None
        if any(s is None for s in specs):
            missing = [n for n, s in zip(shard_names, specs) if s is None]
            raise ValueError(f"quantization_config: fused layer {shard_names} mixes quantized and "
                             f"unquantized parts ({missing} unquantized); quantize all or none")
        if self.quant_method == "gptq":
            return GPTQLinearMethod(specs[0], desc_act=self.desc_act, zero_offset=self.gptq_zero_offset)
        return AnyBitLinearMethod(specs)

    def to_dict(self) -> dict:
        d = {"quant_method": self.quant_method, "format_version": 1, **self.default.to_dict()}
        if self.modules is not None:
            d["modules"] = {n: s.to_dict() for n, s in self.modules.items()}
        if self.modules_to_not_convert:
            d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return d


def quant_config_from_hf(hf_config: dict) -> QuantConfig | None:
    """config.json dict -> QuantConfig, or None when it has no ``quantization_config``."""
    qc = hf_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError("quantization_config: must be a JSON object")
    method = str(qc.get("quant_method", "")).lower()
    if method not in QUANT_METHODS:
        raise ValueError(f"quantization_config.quant_method: got {qc.get('quant_method')!r}, "
                         f"allowed: {', '.join(QUANT_METHODS)}")
    skip = tuple(qc.get("modules_to_not_convert") or ())
    if method == "anybit":
        default = _spec_from({k: v for k, v in qc.items() if k != "act_order"}, "bits/group_size/format")
        modules = None
        if "modules" in qc:
            if not isinstance(qc["modules"], dict):
                raise ValueError("quantization_config.modules: must map module names to specs")
            modules = {n: _spec_from(d, f"modules[{n!r}]") for n, d in qc["modules"].items()}
        return QuantConfig("anybit", default, modules, skip)
    # GPTQ import
    bits = qc.get("bits")
    if bits not in GPTQ_BITS:
        raise ValueError(f"quantization_config.bits: got {bits!r}, allowed for GPTQ: "
                         f"{', '.join(map(str, GPTQ_BITS))}")
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"quantization_config.checkpoint_format: got {fmt!r}, allowed: gptq, gptq_v2")
    gs = qc.get("group_size", 128)
    spec = _spec_from({"bits": bits, "group_size": gs}, "group_size")
    return QuantConfig("gptq", spec, None, skip, quantize_lm_head=bool(qc.get("lm_head", False)),
                       desc_act=bool(qc.get("desc_act", False)),
                       gptq_zero_offset=1 if fmt == "gptq" else 0)
