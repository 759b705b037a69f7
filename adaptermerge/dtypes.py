"""Dtypes and devices: the one home for their names and conversions.

Three vocabularies meet here: safetensors' dtype names (``BF16``), torch dtypes (``torch.bfloat16``) and the names
people type and configs store (``bfloat16``). The safetensors names and their sizes live in
:mod:`adaptermerge.io.safetensors_header` (no torch there); this module maps them to torch.
"""

from __future__ import annotations

import torch

from adaptermerge.errors import UsageError

ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
for _st, _name in (
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"),
):  # fmt: skip
    if hasattr(torch, _name):  # newer torch
        ST_TO_TORCH[_st] = getattr(torch, _name)
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtypes a --dtype conversion applies to

# names people and configs use -> torch dtypes (what --dtype / --compute-dtype accept)
NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}  # fmt: skip
STORAGE_NAMES = ("float32", "bfloat16", "float16")  # what outputs may be stored in


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name (``bfloat16``), a torch dtype, or None; a usage error for anything else."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return NAMES[str(name).removeprefix("torch.")]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(NAMES)}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, refusing ``cuda`` where torch has no usable GPU."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("`device` cuda was asked for but torch sees no CUDA GPU; use `device` cpu")
    return dev
