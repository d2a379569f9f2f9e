//! Directions of the spec (§2, §3): named by `(seed, step, direction)`, indexed by the global
//! element index `j`, generated from Philox4x32-10 without ever being stored.
//!
//! Three layers, each checkable against the one above it:
//! - `*_exact`: the spec's formulas in f64, the "exact value" the tolerances refer to;
//! - [`gaussian_pair`] / [`rademacher_at`]: the f32 algorithm every backend runs (the CUDA
//!   kernels mirror it operation for operation, see `kernels/hyzo_device.cuh`), entry by
//!   entry ([`direction_at`], [`fill_scalar`]);
//! - the same algorithm over a range, vectorised: `crate::fill`, which builds on this
//!   module's primitives ([`gaussian_block`], [`minus_two_ln_u`], [`sin_cos_turn`]) and is
//!   tested bit for bit against [`direction_at`]. This module, the reference, depends on
//!   nothing of it.

use crate::philox::philox4x32_10;

/// How a direction's entries are distributed. The values are those of the C ABI's
/// `hyzo_direction`, tied at compile time in `src/ffi/enums.rs`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DirectionKind {
    /// Standard normal entries (Box-Muller on Philox output).
    Gaussian = 0,
    /// ±1 entries, one Philox bit each.
    Rademacher = 1,
    /// A Gaussian direction scaled to unit L2 norm over every element the optimizer holds.
    Sphere = 2,
    /// Spec §7: `Z = A Bᵀ / sqrt(r)` on tensors registered with a 2-D shape (applied by the
    /// forward pass, never written during a step); the Gaussian on every other tensor.
    LowRank = 3,
}

impl DirectionKind {
    /// All kinds, in ABI order.
    pub const ALL: [DirectionKind; 4] = [
        DirectionKind::Gaussian,
        DirectionKind::Rademacher,
        DirectionKind::Sphere,
        DirectionKind::LowRank,
    ];

    /// The largest `|z|` an entry of the generated kind can take: Box-Muller's radius at the
    /// smallest `u = 2^-33` is `sqrt(66 ln 2) = 6.7637` (fast GPU arithmetic adds at most the
    /// spec's tolerance); Rademacher entries are ±1.
    pub fn max_abs(self) -> f32 {
        match self.generated() {
            DirectionKind::Rademacher => 1.0,
            _ => 6.77,
        }
    }

    /// The largest `|z|` of a direction of this kind with rank `rank` (only low-rank
    /// directions depend on it): a low-rank entry is a sum of `r` products of two Gaussian
    /// entries, divided by `sqrt(r)`.
    pub fn max_abs_with_rank(self, rank: u32) -> f32 {
        match self {
            DirectionKind::LowRank => {
                let g = DirectionKind::Gaussian.max_abs();
                g * g * (rank.max(1) as f32).sqrt()
            }
            k => k.max_abs(),
        }
    }

    /// The kind whose raw entries are generated element by element: the sphere is a scaled
    /// Gaussian; a low-rank direction's factors, and its other tensors, are Gaussian.
    pub fn generated(self) -> DirectionKind {
        match self {
            DirectionKind::Sphere | DirectionKind::LowRank => DirectionKind::Gaussian,
            k => k,
        }
    }

    /// Parses `gaussian`, `rademacher`, `sphere` or `lowrank`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "gaussian" => Some(Self::Gaussian),
            "rademacher" => Some(Self::Rademacher),
            "sphere" => Some(Self::Sphere),
            "lowrank" => Some(Self::LowRank),
            _ => None,
        }
    }
}

/// Direction reserved for the random bits of stochastic rounding (spec §2).
pub const STOCHASTIC_ROUNDING_DIRECTION: u32 = 0xFFFF_FFFF;
/// First direction reserved for internal streams; user-visible directions are below it.
pub const FIRST_RESERVED_DIRECTION: u32 = 0xFFFF_FF00;

/// The name of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirectionId {
    /// The run's seed; it is the Philox key.
    pub seed: u64,
    /// The optimizer step the direction belongs to.
    pub step: u32,
    /// The direction's index within the step (`0..q`, or a reserved stream).
    pub direction: u32,
}

impl DirectionId {
    /// Creates a direction name.
    pub fn new(seed: u64, step: u32, direction: u32) -> Self {
        Self {
            seed,
            step,
            direction,
        }
    }

    /// Philox key: `(lo32(seed), hi32(seed))`.
    #[inline(always)]
    pub fn key(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }

    /// The stream of one factor of this low-rank direction (spec §7): direction `base + d`
    /// ([`LOWRANK_A_STREAM`] for `A`, [`LOWRANK_B_STREAM`] for `B`) of the same seed and step.
    pub fn lowrank_stream(&self, base: u32) -> DirectionId {
        DirectionId::new(self.seed, self.step, base.wrapping_add(self.direction))
    }

    /// Philox output of block `b`: counter `(lo32(b), hi32(b), step, direction)`.
    #[inline(always)]
    pub fn block(&self, b: u64) -> [u32; 4] {
        philox4x32_10(
            [b as u32, (b >> 32) as u32, self.step, self.direction],
            self.key(),
        )
    }
}

// ---------------------------------------------------------------------------------------
// The exact values (f64), for tests and the CLI's cross-checks.

/// The spec's Box-Muller pair for Philox words `(x, y)`, in f64: `(ρ sin v, ρ cos v)`.
pub fn gaussian_pair_exact(x: u32, y: u32) -> (f64, f64) {
    let u = (2.0 * x as f64 + 1.0) * 2f64.powi(-33);
    let v = std::f64::consts::TAU * (2.0 * y as f64 + 1.0) * 2f64.powi(-33);
    let rho = (-2.0 * u.ln()).sqrt();
    (rho * v.sin(), rho * v.cos())
}

/// Entry `j` of a Gaussian direction, in f64.
pub fn gaussian_exact(id: DirectionId, j: u64) -> f64 {
    let x = id.block(j / 4);
    let lane = (j % 4) as usize;
    let (first, second) = gaussian_pair_exact(x[lane & 2], x[(lane & 2) + 1]);
    if lane & 1 == 0 {
        first
    } else {
        second
    }
}

// ---------------------------------------------------------------------------------------
// The f32 algorithm. Every operation is a single IEEE-754 f32 operation (no fused
// multiply-add), so that the CUDA kernels, written with `__fmul_rn`/`__fadd_rn`, produce the
// same bits. Error against the exact value: under 2e-6 * (1 + |z|) (tested), well inside the
// spec's 1e-4 * (1 + |z|).

#[allow(clippy::excessive_precision)] // Cephes' split of ln 2, as published
const LN2_HI: f32 = 0.693_359_375;
const LN2_LO: f32 = -2.121_944_4e-4;
const TWO_PI_OVER_2_32: f32 = 1.462_918_1e-9; // 2π / 2^32
const SQRT_HALF: u32 = 0x3F35_04F3; // bits of sqrt(0.5)

/// `-2 ln u` with `u = (2x + 1) 2^-33`, accurate in relative terms for every `x`, also where
/// `u` rounds to 1 in f32 (there the series of `ln(1 - t)` in `t = 1 - u` is used).
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' coefficients, as published
pub fn minus_two_ln_u(x: u32) -> f32 {
    // Near u = 1: t = 1 - u = (2 !x + 1) 2^-33 is exact to f32 rounding; ln(1 - t) by its series.
    let nx = !x;
    let t = ((nx << 1) | 1) as f32 * (1.0 / 8_589_934_592.0);
    let series = t * (1.0 + t * (0.5 + t * (1.0 / 3.0 + t * (0.25 + t * 0.2))));
    // Elsewhere: u = m 2^e with m in [sqrt(1/2), sqrt(2)), ln u = e ln2 + ln(1 + f) (Cephes).
    let u = x as f32 * (1.0 / 4_294_967_296.0) + (1.0 / 8_589_934_592.0);
    let bits = u.to_bits();
    let mantissa = bits & 0x007F_FFFF;
    let above = (mantissa | 0x3F00_0000) > SQRT_HALF;
    // Selects, not branches: the vectorised fill runs this on many lanes at once.
    let m_bits = if above {
        mantissa | 0x3F00_0000
    } else {
        mantissa | 0x3F80_0000
    };
    let e = (bits >> 23) as i32 - 126 - (!above) as i32;
    let f = f32::from_bits(m_bits) - 1.0;
    let ef = e as f32;
    let z = f * f;
    let mut p = 7.037_683_6e-2 * f - 1.151_461_0e-1;
    p = p * f + 1.167_699_9e-1;
    p = p * f - 1.242_014_1e-1;
    p = p * f + 1.424_932_3e-1;
    p = p * f - 1.666_805_8e-1;
    p = p * f + 2.000_071_5e-1;
    p = p * f - 2.499_999_4e-1;
    p = p * f + 3.333_333_1e-1;
    let mut y = f * z * p;
    y += LN2_LO * ef;
    y -= 0.5 * z;
    let ln_u = (f + y) + LN2_HI * ef;
    // nx < 2^27 means t < 2^-5, where the series' truncation error is below f32 rounding.
    let minus_ln_u = if nx < (1 << 27) { series } else { -ln_u };
    2.0 * minus_ln_u
}

/// `(sin v, cos v)` with `v = 2π (y + 1/2) 2^-32`, reduced exactly in integers to an angle in
/// `[-π/4, π/4]` and a quadrant, then Cephes' minimax polynomials.
#[inline(always)]
pub fn sin_cos_turn(y: u32) -> (f32, f32) {
    let k = (y >> 30) + ((y >> 29) & 1); // nearest quarter turn, 0..=4
    let n = y.wrapping_sub(k << 30) as i32; // y - k 2^30, in [-2^29, 2^29)
    let a = (n as f32 + 0.5) * TWO_PI_OVER_2_32;
    let z = a * a;
    let s = a + a * z * ((-1.951_529_6e-4 * z + 8.332_161e-3) * z - 1.666_665_5e-1);
    let c = 1.0 - 0.5 * z + z * z * ((2.443_315_7e-5 * z - 1.388_731_6e-3) * z + 4.166_664_6e-2);
    // Quadrant k: odd swaps sin and cos; the signs follow bits of k (as selects and sign-bit
    // flips, so the vectorised fill stays branch-free).
    let swap = k & 1 == 1;
    let (bs, bc) = (if swap { c } else { s }, if swap { s } else { c });
    let sin_sign = ((k >> 1) & 1) << 31;
    let cos_sign = ((k ^ (k >> 1)) & 1) << 31;
    (
        f32::from_bits(bs.to_bits() ^ sin_sign),
        f32::from_bits(bc.to_bits() ^ cos_sign),
    )
}

/// The Box-Muller pair of the spec for Philox words `(x, y)`, in f32: `(ρ sin v, ρ cos v)`.
#[inline(always)]
pub fn gaussian_pair(x: u32, y: u32) -> (f32, f32) {
    let rho = minus_two_ln_u(x).sqrt();
    let (s, c) = sin_cos_turn(y);
    (rho * s, rho * c)
}

/// The four Gaussian entries `4b .. 4b + 4` of a direction.
#[inline(always)]
pub fn gaussian_block(id: DirectionId, b: u64) -> [f32; 4] {
    let x = id.block(b);
    let (a0, a1) = gaussian_pair(x[0], x[1]);
    let (a2, a3) = gaussian_pair(x[2], x[3]);
    [a0, a1, a2, a3]
}

/// Entry `j` of a Gaussian direction, as every backend computes it.
pub fn gaussian_at(id: DirectionId, j: u64) -> f32 {
    gaussian_block(id, j / 4)[(j % 4) as usize]
}

/// Entry `j` of a Rademacher direction: bit `j % 32` of word `(j % 128) / 32` of block `j / 128`.
pub fn rademacher_at(id: DirectionId, j: u64) -> f32 {
    let x = id.block(j / 128);
    let i = (j % 128) as u32;
    let bit = (x[(i / 32) as usize] >> (i % 32)) & 1;
    1.0 - 2.0 * bit as f32
}

/// Entry `j` of a direction of the generated kinds (a sphere direction is its Gaussian;
/// its scale is applied by the caller).
pub fn direction_at(kind: DirectionKind, id: DirectionId, j: u64) -> f32 {
    match kind.generated() {
        DirectionKind::Rademacher => rademacher_at(id, j),
        _ => gaussian_at(id, j),
    }
}

/// Fills with the scalar reference path: one Philox call per entry. Slow; for tests.
pub fn fill_scalar(kind: DirectionKind, id: DirectionId, start: u64, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = direction_at(kind, id, start + i as u64);
    }
}

// ---------------------------------------------------------------------------------------
// Low-rank directions (spec §7).

/// The Philox direction of the `A` factor of direction `d` (spec §7).
pub const LOWRANK_A_STREAM: u32 = 0x8000_0000;
/// The Philox direction of the `B` factor of direction `d` (spec §7).
pub const LOWRANK_B_STREAM: u32 = 0xC000_0000;
/// User-visible directions stay below this when low-rank directions are used, so that the
/// factor streams `0x80000000 + d`, `0xC0000000 + d` never meet each other or the reserved
/// directions.
pub const LOWRANK_MAX_DIRECTIONS: u32 = 1 << 24;
/// The largest rank a configuration may ask for.
pub const MAX_RANK: u32 = 1024;

/// The shape of a low-rank direction on one tensor: `Z = A Bᵀ · scale`, `A` rows × rank,
/// `B` cols × rank (row-major), `rank = min(r, rows, cols)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LowRankShape {
    /// Rows of the tensor (row-major).
    pub rows: u64,
    /// Columns of the tensor.
    pub cols: u64,
    /// The tensor's rank `r_t = min(r, rows, cols)`.
    pub rank: u64,
}

impl LowRankShape {
    /// The shape of a `rows × cols` tensor under rank `r`.
    pub fn new(rows: u64, cols: u64, r: u32) -> Self {
        Self {
            rows,
            cols,
            rank: (r as u64).min(rows).min(cols).max(1),
        }
    }

    /// Floats of `A` (`rows · rank`).
    pub fn a_len(&self) -> u64 {
        self.rows * self.rank
    }

    /// Floats of `A` and `B` together.
    pub fn factors_len(&self) -> u64 {
        (self.rows + self.cols) * self.rank
    }

    /// `c_r = f32(1 / sqrt(rank))`, rounded from f64.
    pub fn scale(&self) -> f32 {
        (1.0 / (self.rank as f64).sqrt()) as f32
    }

    /// Entry `(i, k)` from row `a` of `A` and row `b` of `B` (`rank` entries each): the
    /// spec's f32 sum in order, each operation rounded, times [`LowRankShape::scale`].
    #[inline(always)]
    pub fn entry(a: &[f32], b: &[f32], scale: f32) -> f32 {
        let mut acc = 0f32;
        for (x, y) in a.iter().zip(b) {
            acc += x * y;
        }
        acc * scale
    }
}

/// Entry `(i, k)` of a low-rank direction in f64 from the exact factors, for tests.
pub fn lowrank_exact(id: DirectionId, offset: u64, shape: LowRankShape, i: u64, k: u64) -> f64 {
    let (a, b) = (
        id.lowrank_stream(LOWRANK_A_STREAM),
        id.lowrank_stream(LOWRANK_B_STREAM),
    );
    let sum: f64 = (0..shape.rank)
        .map(|p| {
            gaussian_exact(a, offset + i * shape.rank + p)
                * gaussian_exact(b, offset + k * shape.rank + p)
        })
        .sum();
    sum / (shape.rank as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tol(z: f64) -> f64 {
        2e-6 * (1.0 + z.abs())
    }

    #[test]
    fn f32_pair_is_close_to_exact_at_the_extremes() {
        let words = [
            0u32,
            1,
            2,
            3,
            0x7FFF_FFFF,
            0x8000_0000,
            u32::MAX,
            u32::MAX - 1,
            u32::MAX - 1000,
            u32::MAX - (1 << 27),
            u32::MAX - (1 << 27) + 1,
            1 << 29,
            (1 << 29) - 1,
            (1 << 30) - 1,
            1 << 30,
            3 << 29,
            0xC000_0000,
            0xE000_0000,
            0xDFFF_FFFF,
        ];
        for &x in &words {
            for &y in &words {
                let (a, b) = gaussian_pair(x, y);
                let (ea, eb) = gaussian_pair_exact(x, y);
                assert!(
                    (a as f64 - ea).abs() <= tol(ea),
                    "x={x:#x} y={y:#x}: {a} vs {ea}"
                );
                assert!(
                    (b as f64 - eb).abs() <= tol(eb),
                    "x={x:#x} y={y:#x}: {b} vs {eb}"
                );
            }
        }
    }

    #[test]
    fn f32_pair_is_close_to_exact_on_random_words() {
        let id = DirectionId::new(0x1234_5678_9abc_def0, 7, 3);
        let mut worst = 0f64;
        for b in 0..200_000u64 {
            let x = id.block(b);
            for (p, q) in [(x[0], x[1]), (x[2], x[3])] {
                let (a, c) = gaussian_pair(p, q);
                let (ea, ec) = gaussian_pair_exact(p, q);
                worst = worst.max((a as f64 - ea).abs() / (1.0 + ea.abs()));
                worst = worst.max((c as f64 - ec).abs() / (1.0 + ec.abs()));
            }
        }
        assert!(worst < 2e-6, "worst scaled error {worst}");
    }

    #[test]
    fn rademacher_uses_one_bit_per_entry() {
        let id = DirectionId::new(42, 1, 0);
        let x = id.block(0);
        for j in 0..128u64 {
            let bit = (x[(j / 32) as usize] >> (j % 32)) & 1;
            assert_eq!(rademacher_at(id, j), if bit == 0 { 1.0 } else { -1.0 });
        }
    }
}
