//! Element types of parameters and gradients, and the spec's rounding (§6).

use half::{bf16, f16};

/// A stored element type. The values are those of the C ABI's `hyzo_dtype`, tied at compile
/// time in `src/ffi/enums.rs`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32 = 0,
    /// IEEE binary16.
    F16 = 1,
    /// bfloat16.
    BF16 = 2,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// All types, in ABI order.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// From the ABI value.
    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }
}

/// How parameters are rounded when a pass writes them back. The values are those of the C
/// ABI's `hyzo_precision`, tied at compile time in `src/ffi/enums.rs`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Round to nearest even on every pass.
    Nearest = 0,
    /// Stochastic rounding on the update pass, nearest on perturbation passes.
    Stochastic = 1,
    /// `hi + lo` with a bf16 residual `lo`: perturb-then-restore returns to the same value.
    Compensated = 2,
}

impl Precision {
    /// All modes, in ABI order.
    pub const ALL: [Precision; 3] = [
        Precision::Nearest,
        Precision::Stochastic,
        Precision::Compensated,
    ];

    /// Parses `nearest`, `stochastic` or `compensated`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "nearest" => Precision::Nearest,
            "stochastic" => Precision::Stochastic,
            "compensated" => Precision::Compensated,
            _ => return None,
        })
    }
}

/// A type a parameter or gradient can be stored in.
pub trait Element: Copy + Send + Sync + 'static {
    /// Its [`DType`].
    const DTYPE: DType;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Round to nearest even (IEEE conversion; NaN stays NaN, overflow goes to infinity).
    fn from_f32(x: f32) -> Self;
    /// Widens a slice (`dst.len() == src.len()`); the same values as [`Element::to_f32`],
    /// vectorised where the type allows.
    fn load_slice(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    /// Rounds a slice to nearest; the same values as [`Element::from_f32`], vectorised where
    /// the type allows.
    fn store_slice(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(*s);
        }
    }
    /// Rounds stochastically with the random word `r` (see [`stochastic_round_bf16`] and
    /// [`stochastic_round_f16`]).
    fn from_f32_stochastic(x: f32, r: u32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn from_f32_stochastic(x: f32, _r: u32) -> Self {
        x
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn load_slice(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    fn store_slice(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn from_f32_stochastic(x: f32, r: u32) -> Self {
        f16::from_f32(stochastic_round_f16(x, r))
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn load_slice(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    fn store_slice(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(bf16_bits_nearest(*s));
        }
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn from_f32_stochastic(x: f32, r: u32) -> Self {
        bf16::from_f32(stochastic_round_bf16(x, r))
    }
}

/// Round-to-nearest-even of `x` to bf16 bits, branch-free (the same bits as
/// `bf16::from_f32`, NaN kept quiet).
#[inline(always)]
pub fn bf16_bits_nearest(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

/// Stochastic rounding of `x` to bf16 with the random word `r`.
///
/// bf16 values are the f32 values whose low 16 bits are zero, subnormals included, so the
/// magnitude rounds away from zero exactly when `r >> 16` is below the 16 dropped bits: the
/// probability is the distance to the value toward zero over the gap between the two.
/// NaN, infinities and a result past the largest finite bf16 round to nearest.
#[inline(always)]
pub fn stochastic_round_bf16(x: f32, r: u32) -> f32 {
    let bits = x.to_bits();
    let mag = bits & 0x7FFF_FFFF;
    if mag >= 0x7F80_0000 {
        return x;
    }
    let dropped = mag & 0xFFFF;
    let up = if (r >> 16) < dropped { 0x1_0000 } else { 0 };
    let out = (mag - dropped) + up;
    if out >= 0x7F80_0000 {
        return bf16::from_f32(x).to_f32();
    }
    f32::from_bits(out | (bits & 0x8000_0000))
}

/// Stochastic rounding of `x` to f16 with the random word `r`.
///
/// The f16 gap at `|x|` is `2^(e − 10)`, `e` the binade of `|x|` clamped below at −14
/// (subnormals); `|x|` scaled by the inverse gap splits exactly into a whole and a fraction,
/// and the magnitude rounds away from zero when `(r >> 8) 2^-24` is below the fraction.
/// Every operation is exact in f32, so every backend draws the same value from the same `r`.
/// NaN, infinities and magnitudes past 65504 round to nearest.
#[inline(always)]
pub fn stochastic_round_f16(x: f32, r: u32) -> f32 {
    let ax = x.abs();
    if ax.is_nan() || ax > 65504.0 {
        return f16::from_f32(x).to_f32();
    }
    let e = ((ax.to_bits() >> 23) as i32 - 127).max(-14);
    let inv_gap = f32::from_bits(((10 - e + 127) as u32) << 23);
    let gap = f32::from_bits(((e - 10 + 127) as u32) << 23);
    let scaled = ax * inv_gap;
    let whole = scaled.floor();
    let frac = scaled - whole;
    let u = (r >> 8) as f32 * (1.0 / 16_777_216.0);
    let mag = if u < frac { whole + 1.0 } else { whole } * gap;
    f32::from_bits(mag.to_bits() | (x.to_bits() & 0x8000_0000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_unbiased(x: f32, round: fn(f32, u32) -> f32, nearest: fn(f32) -> f32) {
        let n = 1 << 16;
        let mut sum = 0f64;
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..n {
            let r = (i as u32).wrapping_mul(0x9E37_79B9);
            let y = round(x, r);
            assert_eq!(nearest(y), y, "{y} not representable");
            seen.insert(y.to_bits());
            sum += y as f64;
        }
        assert!(seen.len() <= 2, "{x}: {seen:?}");
        let mean = sum / n as f64;
        assert!(
            (mean - x as f64).abs() <= 2e-4 * (x as f64).abs(),
            "{x}: mean {mean}"
        );
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_lands_on_the_grid() {
        for &x in &[
            1.0f32 + 1.0 / 300.0,
            -2.570_31,
            1e-3,
            -7.1e-6,
            6.0e-8,
            1000.3,
            65000.7,
        ] {
            check_unbiased(x, stochastic_round_f16, |v| f16::from_f32(v).to_f32());
        }
        for &x in &[
            1.0f32 + 1.0 / 300.0,
            -2.570_31,
            1e-30,
            3.0e38,
            -1e-39,
            123456.7,
        ] {
            check_unbiased(x, stochastic_round_bf16, |v| bf16::from_f32(v).to_f32());
        }
    }

    #[test]
    fn slice_conversions_equal_the_scalar_ones() {
        let mut r = 0x1234_5678u32;
        let mut xs: Vec<f32> = (0..10_000)
            .map(|_| {
                r ^= r << 13;
                r ^= r >> 17;
                r ^= r << 5;
                f32::from_bits(r)
            })
            .collect();
        xs.extend([
            0.0,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            1e-40,
            65520.0,
        ]);
        let mut b = vec![bf16::ZERO; xs.len()];
        bf16::store_slice(&xs, &mut b);
        let mut h = vec![f16::ZERO; xs.len()];
        f16::store_slice(&xs, &mut h);
        for (i, x) in xs.iter().enumerate() {
            if x.is_nan() {
                assert!(b[i].is_nan() && h[i].is_nan());
                continue;
            }
            assert_eq!(b[i].to_bits(), bf16::from_f32(*x).to_bits(), "{x}");
            assert_eq!(h[i].to_bits(), f16::from_f32(*x).to_bits(), "{x}");
        }
        let mut back = vec![0f32; xs.len()];
        bf16::load_slice(&b, &mut back);
        assert!(b
            .iter()
            .zip(&back)
            .all(|(a, c)| a.to_f32().to_bits() == c.to_bits() || c.is_nan()));
        f16::load_slice(&h, &mut back);
        assert!(h
            .iter()
            .zip(&back)
            .all(|(a, c)| a.to_f32().to_bits() == c.to_bits() || c.is_nan()));
    }

    #[test]
    fn representable_values_stay() {
        for r in [0u32, u32::MAX, 0x8000_0000] {
            for &x in &[0.0f32, -0.0, 1.0, -2.5, 65504.0, 6.0e-8] {
                let x = f16::from_f32(x).to_f32();
                assert_eq!(stochastic_round_f16(x, r).to_bits(), x.to_bits());
            }
            for &x in &[0.0f32, -0.0, 1.0, -2.5, 3.0e38, 1e-40] {
                let x = bf16::from_f32(x).to_f32();
                assert_eq!(stochastic_round_bf16(x, r).to_bits(), x.to_bits());
            }
        }
        assert!(stochastic_round_f16(f32::NAN, 0).is_nan());
        assert_eq!(stochastic_round_f16(1e6, 0), f32::INFINITY);
    }
}
