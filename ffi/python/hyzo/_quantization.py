"""Weight quantization as bitsandbytes applies it to a model loaded in 4 or 8 bits
(``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4" | "fp4")``, block size
64, no double quantization; ``load_in_8bit=True``), as pure quantize-dequantize functions
of torch tensors: the weights a quantized model computes with, without bitsandbytes (the
quantization attacks of the unlearning papers).

- 4-bit: the tensor, flattened in row-major order, is cut into blocks of 64 elements (the
  last one may be shorter); each block is divided by its absmax (kept in float32) and every
  element rounded to the nearest of 16 levels in ``[-1, 1]`` (a value exactly between two
  levels takes the lower one); dequantized, level × absmax. NF4's levels are the quantiles
  of N(0, 1) of QLoRA (Dettmers et al. 2023, appendix E), normalized to ``[-1, 1]``; FP4's
  are bitsandbytes' 1-sign, 2-exponent, 1-mantissa values ``{0, 0.0625, 2, 3, 4, 6, 8,
  12} / 12`` and their negatives.
- 8-bit (LLM.int8, Dettmers et al. 2022): row-wise absmax over the last dimension,
  ``q = round(w · 127 / absmax)`` (half to even), dequantized ``q · absmax / 127`` (the
  weights; the outlier decomposition of LLM.int8 splits activations, not weights).

Computed in float32 and returned in the input's dtype (a model loaded without
``torch_dtype`` is float16 before bitsandbytes quantizes it: cast first to mimic that).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch

__all__ = ["NF4_LEVELS", "FP4_LEVELS", "BLOCK_SIZE", "dequantized_4bit", "dequantized_int8",
           "SCHEMES"]

BLOCK_SIZE = 64

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_FP4_MAGNITUDES = (0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
# Sorted; +0 and -0 are one level.
FP4_LEVELS = tuple(sorted({s * m / 12.0 for m in _FP4_MAGNITUDES for s in (1.0, -1.0)}))

_TINY = torch.finfo(torch.float32).tiny  # an all-zero block or row stays zero


def _nearest(x: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """Each element of ``x`` (in ``[-1, 1]``) as its nearest level; a tie takes the lower."""
    grid = torch.tensor(levels, dtype=torch.float32, device=x.device)
    midpoints = (grid[1:] + grid[:-1]) / 2
    return grid[torch.bucketize(x, midpoints)]


def dequantized_4bit(w: torch.Tensor, quant_type: str = "nf4",
                     block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """``w`` quantized to 4 bits (``"nf4"`` or ``"fp4"``, absmax blocks of ``block_size``
    elements) and dequantized, in ``w``'s dtype and shape."""
    levels = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS}.get(quant_type)
    if levels is None:
        raise ValueError(f"quant_type: expected 'nf4' or 'fp4', got {quant_type!r}")
    if block_size < 1:
        raise ValueError(f"block_size: expected a positive size, got {block_size}")
    flat = w.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    # Zeros pad the last block without changing its absmax, and dequantize to zeros.
    blocks = torch.nn.functional.pad(flat, (0, -n % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY))).clamp(-1.0, 1.0)
    out = _nearest(scaled, levels) * absmax
    return out.reshape(-1)[:n].view(w.shape).to(w.dtype)


def dequantized_int8(w: torch.Tensor) -> torch.Tensor:
    """``w`` quantized to int8 with one absmax per row (the last dimension) and
    dequantized, in ``w``'s dtype and shape."""
    if w.dim() == 0:
        raise ValueError("dequantized_int8: expected a tensor with rows, got a scalar")
    rows = w.detach().reshape(-1, w.shape[-1]).to(torch.float32)
    absmax = rows.abs().amax(dim=1, keepdim=True)
    q = torch.round(rows * (127.0 / absmax.clamp(min=_TINY)))
    return (q * absmax * (1.0 / 127.0)).view(w.shape).to(w.dtype)


# name -> quantize-dequantize of a weight, as bitsandbytes loads it.
SCHEMES: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "bnb nf4": lambda w: dequantized_4bit(w, "nf4"),
    "bnb fp4": lambda w: dequantized_4bit(w, "fp4"),
    "bnb int8": dequantized_int8,
}
