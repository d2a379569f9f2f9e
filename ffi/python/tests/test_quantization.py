"""hyzo._quantization: bitsandbytes' 4-bit (NF4, FP4, blocks of 64) and 8-bit (LLM.int8
row-wise) weight quantization, against the formats' definitions, hand-computed values and,
where it is installed, bitsandbytes itself."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hyzo._quantization import (  # noqa: E402
    BLOCK_SIZE,
    FP4_LEVELS,
    NF4_LEVELS,
    SCHEMES,
    dequantized_4bit,
    dequantized_int8,
)


def test_nf4_levels_are_qloras_normal_quantiles():
    # QLoRA: 8 positive and 7 negative quantiles of N(0, 1) between the offset and 1/2, and
    # an exact zero, normalized by the largest; offset = mean of 1 - 1/(2·15), 1 - 1/(2·16).
    offset = ((1 - 1 / 30) + (1 - 1 / 32)) / 2
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    levels /= levels.abs().max()
    assert torch.allclose(levels, torch.tensor(NF4_LEVELS, dtype=torch.float64), atol=1e-7)


def test_fp4_levels_are_one_sign_two_exponent_one_mantissa_bits():
    # Exponent e = 1..3: 2^e (1 + m/2); e = 0 is bitsandbytes' subnormal 0.0625 (m = 1) or 0.
    magnitudes = sorted({0.0, 0.0625} | {2.0 ** e * (1 + m / 2) for e in (1, 2, 3) for m in (0, 1)})
    assert magnitudes == [0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
    expected = sorted({s * m / 12 for m in magnitudes for s in (1, -1)})
    assert list(FP4_LEVELS) == expected and len(FP4_LEVELS) == 15  # ±0 is one level


def block(*values: float) -> torch.Tensor:
    """A block of 64: the values, then zeros."""
    return torch.tensor(list(values) + [0.0] * (BLOCK_SIZE - len(values)))


def test_4bit_values_computed_by_hand():
    w = block(2.0, 1.0, -0.5, 0.6, -2.0, 0.001)  # absmax 2: x/2 = 1, .5, -.25, .3, -1, .0005
    nf4 = dequantized_4bit(w, "nf4")[:6] / 2
    # 0.5 is nearer 0.4407 than 0.5626; -0.25 nearer -0.2844 than -0.1848; 0.3 nearer
    # 0.3379 than 0.2461; 0.0005 nearer 0 than 0.0796.
    assert nf4.tolist() == pytest.approx([1.0, 0.44070982933044434, -0.28444138169288635,
                                          0.33791524171829224, -1.0, 0.0])
    fp4 = dequantized_4bit(w, "fp4")[:6] / 2
    # 0.5 and -0.25 are levels; 0.3 is nearer 1/3 than 1/4; 0.0005 nearer 0 than 1/192.
    assert fp4.tolist() == pytest.approx([1.0, 0.5, -0.25, 1 / 3, -1.0, 0.0])


def test_4bit_ties_take_the_lower_level():
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    above_zero, below_zero = (levels[12] + levels[13]) / 2, (levels[1] + levels[2]) / 2
    out = dequantized_4bit(block(1.0, float(above_zero), float(below_zero)), "nf4")
    assert out[1:3].tolist() == [levels[12].item(), levels[1].item()]


def test_4bit_blocks_of_64_have_their_own_absmax_and_the_last_may_be_short():
    w = torch.cat([block(1.0, 0.5), block(100.0, 50.0), torch.tensor([4.0, 2.0])])
    out = dequantized_4bit(w, "fp4")
    assert out[[0, 1, 64, 65, 128, 129]].tolist() == pytest.approx(
        [1.0, 0.5, 100.0, 50.0, 4.0, 2.0])
    # One shared absmax of 100 would zero the first block's 0.5 (0.005 → 1/192·100 ≈ 0.52:
    # not 0.5): the blocks are independent.
    assert out.shape == w.shape


def test_int8_values_computed_by_hand_row_by_row():
    w = torch.tensor([[2.0, 0.3, -1.1, 0.0], [0.02, -0.01, 0.004, 0.0]])
    out = dequantized_int8(w)
    # Row 0, absmax 2: 0.3·63.5 = 19.05 → 19, -1.1·63.5 = -69.85 → -70.
    assert out[0].tolist() == pytest.approx([2.0, 19 * 2 / 127, -70 * 2 / 127, 0.0])
    # Row 1, absmax 0.02: -0.01·6350 = -63.5 → -64 (half to even), 0.004·6350 = 25.4 → 25.
    assert out[1].tolist() == pytest.approx([0.02, -64 * 0.02 / 127, 25 * 0.02 / 127, 0.0])


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantizing_twice_changes_nothing_and_keeps_dtype_and_shape(scheme, dtype):
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    once = SCHEMES[scheme](w)
    assert once.dtype == dtype and once.shape == w.shape
    assert not torch.equal(once, w)
    if dtype == torch.float32:  # the grid is stable where the dtype keeps its values
        twice = SCHEMES[scheme](once)
        if scheme == "bnb int8":  # absmax · 127 · (1/127) may move the row's scale an ulp
            assert torch.allclose(twice, once, rtol=1e-6, atol=0)
        else:
            assert torch.equal(twice, once)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="quant_type"):
        dequantized_4bit(torch.ones(4), "int4")
    with pytest.raises(ValueError, match="block_size"):
        dequantized_4bit(torch.ones(4), "nf4", block_size=0)
    with pytest.raises(ValueError, match="scalar"):
        dequantized_int8(torch.tensor(1.0))


# ----------------------------------------------------------------------------------------
# bitsandbytes itself, where it is installed (it runs on the CPU from 0.45 on). Not
# (64, 96): bitsandbytes 0.50.2's CPU dequantize_4bit kernel disagrees with its own
# reference dequantization (and with its quantized blocks) when a row of an even length
# is not a multiple of the block size; its CUDA kernel and reference agree with these.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (3, 100), (6161,)],
                         ids=["blocks", "rows-across-blocks", "short-block"])
def test_same_weights_as_bitsandbytes(dtype, shape):
    bnb = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(shape[0] if len(shape) > 1 else 1, 1, generator=g) * 3
    w = (torch.randn(*shape, generator=g) * scale.reshape(-1, *[1] * (len(shape) - 1))).to(dtype)
    for quant_type in ("nf4", "fp4"):
        q, state = bnb.quantize_4bit(w, blocksize=BLOCK_SIZE, quant_type=quant_type)
        theirs = bnb.dequantize_4bit(q, state)
        assert torch.equal(dequantized_4bit(w, quant_type), theirs), quant_type
    rows = w.reshape(-1, w.shape[-1])  # bitsandbytes' int8 takes matrices
    q8, stats, _ = bnb.int8_vectorwise_quant(rows.clone())
    theirs = bnb.int8_vectorwise_dequant(q8, stats).to(dtype)
    assert torch.equal(dequantized_int8(rows), theirs)
