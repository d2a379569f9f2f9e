//! Philox4x32-R, the counter-based generator of Salmon et al. (SC'11), written once.
//!
//! The spec (`docs/spec.md` §1) fixes R = 10. The round count is a const generic so the
//! known-answer tests of Random123 pin the round function itself, not just one composition.

/// First round multiplier.
pub const PHILOX_M0: u32 = 0xD251_1F53;
/// Second round multiplier.
pub const PHILOX_M1: u32 = 0xCD9E_8D57;
/// Key bump applied to `k0` between rounds (golden ratio).
pub const PHILOX_W0: u32 = 0x9E37_79B9;
/// Key bump applied to `k1` between rounds (sqrt(3) - 1).
pub const PHILOX_W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = (a as u64) * (b as u64);
    ((p >> 32) as u32, p as u32)
}

#[inline(always)]
fn round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(PHILOX_M0, c[0]);
    let (hi1, lo1) = mulhilo(PHILOX_M1, c[2]);
    [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
}

/// Philox4x32 with `R` rounds: `R` applications of the round function, the key bumped
/// between consecutive rounds.
#[inline(always)]
pub fn philox4x32<const R: usize>(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for r in 0..R {
        if r > 0 {
            k = [k[0].wrapping_add(PHILOX_W0), k[1].wrapping_add(PHILOX_W1)];
        }
        c = round(c, k);
    }
    c
}

/// Philox4x32-10, the generator of the spec.
#[inline(always)]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    philox4x32::<10>(counter, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers_of_the_spec() {
        let cases: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0; 4],
                [0; 2],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (c, k, want) in cases {
            assert_eq!(philox4x32_10(c, k), want, "counter {c:08x?} key {k:08x?}");
        }
    }

    #[test]
    fn seven_round_known_answer_pins_the_round_function() {
        // Random123 kat_vectors, philox4x32_7.
        assert_eq!(
            philox4x32::<7>([0; 4], [0; 2]),
            [0x5f6fb709, 0x0d893f64, 0x4f121f81, 0x4f730a48]
        );
    }
}
