//! Directions over ranges of elements, as the CPU backend, `hyzo_directions` and the tools
//! generate them: the f32 algorithm of [`crate::direction`] on batches of Philox blocks, written over
//! fixed-size arrays so the compiler turns every loop into SIMD code. No fused multiply-add
//! and no approximation beyond the scalar path: every entry equals
//! [`crate::direction::direction_at`] bit for bit, wherever a range starts or ends. The
//! wider instruction sets are picked at run time; they change the speed, not the bits.
//!
//! Layering: this module builds on the reference's primitives (the Box-Muller pieces, the
//! turn's sine and cosine, the Philox block of a direction); the reference knows nothing
//! of this one, so that it stays the plain statement every fast path is checked against.

use crate::direction::{
    gaussian_block, minus_two_ln_u, sin_cos_turn, DirectionId, DirectionKind, LowRankShape,
    LOWRANK_A_STREAM, LOWRANK_B_STREAM,
};
use crate::philox::{PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1};

/// Philox blocks per batch.
const LANES: usize = 16;

#[inline(always)]
fn philox_batch(id: DirectionId, b0: u64) -> [[u32; LANES]; 4] {
    let key = id.key();
    let (mut k0, mut k1) = (key[0], key[1]);
    let mut c0 = [0u32; LANES];
    let mut c1 = [0u32; LANES];
    let mut c2 = [id.step; LANES];
    let mut c3 = [id.direction; LANES];
    for i in 0..LANES {
        let b = b0.wrapping_add(i as u64);
        c0[i] = b as u32;
        c1[i] = (b >> 32) as u32;
    }
    for r in 0..10 {
        if r > 0 {
            k0 = k0.wrapping_add(PHILOX_W0);
            k1 = k1.wrapping_add(PHILOX_W1);
        }
        for i in 0..LANES {
            let p0 = PHILOX_M0 as u64 * c0[i] as u64;
            let p1 = PHILOX_M1 as u64 * c2[i] as u64;
            let n0 = (p1 >> 32) as u32 ^ c1[i] ^ k0;
            let n2 = (p0 >> 32) as u32 ^ c3[i] ^ k1;
            c0[i] = n0;
            c1[i] = p1 as u32;
            c2[i] = n2;
            c3[i] = p0 as u32;
        }
    }
    [c0, c1, c2, c3]
}

#[inline(always)]
fn gaussian_batch(id: DirectionId, b0: u64, out: &mut [f32]) {
    let [x0, x1, x2, x3] = philox_batch(id, b0);
    // Pairs (x0, x1) and (x2, x3) of every block, as two flat lanes of 2 LANES each.
    let mut us = [0u32; 2 * LANES];
    let mut vs = [0u32; 2 * LANES];
    us[..LANES].copy_from_slice(&x0);
    us[LANES..].copy_from_slice(&x2);
    vs[..LANES].copy_from_slice(&x1);
    vs[LANES..].copy_from_slice(&x3);
    let mut first = [0f32; 2 * LANES];
    let mut second = [0f32; 2 * LANES];
    for i in 0..2 * LANES {
        let rho = minus_two_ln_u(us[i]).sqrt();
        let (s, c) = sin_cos_turn(vs[i]);
        first[i] = rho * s;
        second[i] = rho * c;
    }
    let out = &mut out[..4 * LANES];
    for i in 0..LANES {
        out[4 * i] = first[i];
        out[4 * i + 1] = second[i];
        out[4 * i + 2] = first[LANES + i];
        out[4 * i + 3] = second[LANES + i];
    }
}

#[inline(always)]
fn fill_gaussian_body(id: DirectionId, start: u64, out: &mut [f32]) {
    let n = out.len();
    let mut i = 0usize;
    // Head: up to the first block boundary.
    let head = ((4 - start % 4) % 4) as usize;
    if head > 0 {
        let blk = gaussian_block(id, start / 4);
        let lane = (start % 4) as usize;
        let take = head.min(n);
        out[..take].copy_from_slice(&blk[lane..lane + take]);
        i = take;
    }
    while n - i >= 4 * LANES {
        let j = start + i as u64;
        gaussian_batch(id, j / 4, &mut out[i..]);
        i += 4 * LANES;
    }
    while i < n {
        let j = start + i as u64;
        let blk = gaussian_block(id, j / 4);
        let take = (n - i).min(4);
        out[i..i + take].copy_from_slice(&blk[..take]);
        i += take;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2")]
unsafe fn fill_gaussian_avx512(id: DirectionId, start: u64, out: &mut [f32]) {
    fill_gaussian_body(id, start, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_gaussian_avx2(id: DirectionId, start: u64, out: &mut [f32]) {
    fill_gaussian_body(id, start, out)
}

/// Gaussian entries `start .. start + out.len()`.
fn fill_gaussian(id: DirectionId, start: u64, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the features were detected on this CPU.
            return unsafe { fill_gaussian_avx512(id, start, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was detected on this CPU.
            return unsafe { fill_gaussian_avx2(id, start, out) };
        }
    }
    fill_gaussian_body(id, start, out)
}

/// Rademacher entries `start .. start + out.len()`: one Philox call per 128 entries.
fn fill_rademacher(id: DirectionId, start: u64, out: &mut [f32]) {
    let mut i = 0usize;
    while i < out.len() {
        let j = start + i as u64;
        let x = id.block(j / 128);
        let first = (j % 128) as usize;
        let take = (128 - first).min(out.len() - i);
        if first == 0 && take == 128 {
            // A whole block: 1.0 with the entry's bit as the sign bit (vectorises).
            let o = &mut out[i..i + 128];
            for w in 0..4 {
                for t in 0..32 {
                    o[32 * w + t] = f32::from_bits(0x3F80_0000 | ((x[w] >> t) & 1) << 31);
                }
            }
        } else {
            for (t, o) in out[i..i + take].iter_mut().enumerate() {
                let bit = first + t;
                *o = 1.0 - 2.0 * ((x[bit / 32] >> (bit % 32)) & 1) as f32;
            }
        }
        i += take;
    }
}

/// Writes entries `start .. start + out.len()` of a direction into `out`; exactly the values
/// of [`crate::direction::direction_at`], whatever the range's alignment. Sphere directions are written
/// unscaled (their Gaussian).
pub fn fill(kind: DirectionKind, id: DirectionId, start: u64, out: &mut [f32]) {
    match kind.generated() {
        DirectionKind::Rademacher => fill_rademacher(id, start, out),
        _ => fill_gaussian(id, start, out),
    }
}

/// [`fill`] on every core (rayon's pool), for large ranges; the same values.
pub fn fill_parallel(kind: DirectionKind, id: DirectionId, start: u64, out: &mut [f32]) {
    use rayon::prelude::*;
    const PIECE: usize = 1 << 16;
    out.par_chunks_mut(PIECE)
        .enumerate()
        .for_each(|(i, c)| fill(kind, id, start + (i * PIECE) as u64, c));
}

/// Writes the factors of direction `id` (its `direction` is the user-visible `d`) for a
/// tensor at global offset `offset` into `out` ([`LowRankShape::factors_len`] floats): `A`
/// (rows × rank) then `B` (cols × rank), row-major, as every backend computes them.
pub fn lowrank_factors(id: DirectionId, offset: u64, shape: LowRankShape, out: &mut [f32]) {
    assert_eq!(
        out.len() as u64,
        shape.factors_len(),
        "low-rank factors' length"
    );
    let (a, b) = out.split_at_mut(shape.a_len() as usize);
    fill(
        DirectionKind::Gaussian,
        id.lowrank_stream(LOWRANK_A_STREAM),
        offset,
        a,
    );
    fill(
        DirectionKind::Gaussian,
        id.lowrank_stream(LOWRANK_B_STREAM),
        offset,
        b,
    );
}

#[inline(always)]
fn fill_bits_body(id: DirectionId, start: u64, out: &mut [u32]) {
    let mut i = 0usize;
    while i < out.len() {
        let j = start + i as u64;
        let lane = (j % 4) as usize;
        if lane == 0 && out.len() - i >= 4 * LANES {
            let [x0, x1, x2, x3] = philox_batch(id, j / 4);
            for l in 0..LANES {
                out[i + 4 * l] = x0[l];
                out[i + 4 * l + 1] = x1[l];
                out[i + 4 * l + 2] = x2[l];
                out[i + 4 * l + 3] = x3[l];
            }
            i += 4 * LANES;
        } else {
            let x = id.block(j / 4);
            let take = (4 - lane).min(out.len() - i);
            out[i..i + take].copy_from_slice(&x[lane..lane + take]);
            i += take;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_bits_avx2(id: DirectionId, start: u64, out: &mut [u32]) {
    fill_bits_body(id, start, out)
}

/// Raw Philox words of a stream, one per element: element `j` gets word `j % 4` of block
/// `j / 4` (the layout of the Gaussian kind). Drives stochastic rounding.
pub(crate) fn fill_bits(id: DirectionId, start: u64, out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was detected on this CPU.
            return unsafe { fill_bits_avx2(id, start, out) };
        }
    }
    fill_bits_body(id, start, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direction::fill_scalar;

    #[test]
    fn bits_follow_the_gaussian_layout() {
        let id = DirectionId::new(9, 2, crate::direction::STOCHASTIC_ROUNDING_DIRECTION);
        for &(start, n) in &[(0u64, 300usize), (3, 129), ((1 << 33) + 2, 77)] {
            let mut out = vec![0u32; n];
            fill_bits(id, start, &mut out);
            for (i, w) in out.iter().enumerate() {
                let j = start + i as u64;
                assert_eq!(*w, id.block(j / 4)[(j % 4) as usize]);
            }
        }
    }

    #[test]
    fn vector_fill_equals_scalar_on_odd_ranges() {
        let id = DirectionId::new(0xdead_beef_0bad_f00d, 3, 1);
        for &(start, n) in &[
            (0u64, 1000usize),
            (1, 999),
            (3, 70),
            (5, 64),
            (127, 300),
            ((1u64 << 32) - 7, 500),
            ((1u64 << 34) + 1, 257),
        ] {
            for kind in [DirectionKind::Gaussian, DirectionKind::Rademacher] {
                let mut a = vec![0f32; n];
                let mut b = vec![0f32; n];
                fill(kind, id, start, &mut a);
                fill_scalar(kind, id, start, &mut b);
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{kind:?} start {start} n {n}"
                );
            }
        }
    }
}
