//! Fuzzing `load_state`: random bytes and random damage to valid states never panic, and a
//! refused state changes nothing (property tests, run by `make test`).

use hyzo::{Config, Optimizer, ParamShard, Precision, Rule};
use proptest::prelude::*;

fn optimizer<'a>(x: &'a mut [f32], lo: &'a mut [half::bf16]) -> Optimizer<'a> {
    let mut shard = ParamShard::new();
    shard.add(x, 0).unwrap();
    shard.add(lo, 1000).unwrap();
    let config = Config {
        rule: Rule::AdaZo,
        fo_rule: Some(Rule::Signum),
        precision: Precision::Compensated,
        seed: 3,
        ..Config::default()
    };
    Optimizer::with_threads(config, shard, 1).unwrap()
}

/// A valid state after two steps, and the state after two more.
fn states() -> (Vec<u8>, Vec<u8>) {
    let mut x = vec![0.5f32; 100];
    let mut b = vec![half::bf16::from_f32(0.25); 37];
    let mut opt = optimizer(&mut x, &mut b);
    let mut loss = 0.0;
    let mut step = |opt: &mut Optimizer| {
        opt.zo_step(|_| {
            loss += 0.25;
            loss
        })
        .unwrap();
    };
    step(&mut opt);
    step(&mut opt);
    let good = opt.save_state().unwrap();
    step(&mut opt);
    step(&mut opt);
    (good, opt.save_state().unwrap())
}

#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Overwrite(usize, u64),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, m)| Damage::Flip(i, m)),
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Damage::Insert(i, b)),
        // A header field rewritten: counters, body size, format, fingerprint.
        ((0usize..8), any::<u64>()).prop_map(|(f, v)| Damage::Overwrite(8 + 8 * f, v)),
    ]
}

/// `state` with one damage done (a damage that no longer fits, after an earlier truncation,
/// does nothing).
fn apply(state: &[u8], d: &Damage) -> Vec<u8> {
    let mut s = state.to_vec();
    let len = s.len();
    match *d {
        Damage::Flip(i, m) if len > 0 => s[i % len] ^= m,
        Damage::Truncate(n) if len > 0 => s.truncate(n % len),
        Damage::Insert(i, b) => s.insert(i % (len + 1), b),
        Damage::Overwrite(at, v) if at + 8 <= len => {
            s[at..at + 8].copy_from_slice(&v.to_le_bytes())
        }
        _ => {}
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn damaged_states_are_refused_and_change_nothing(d in proptest::collection::vec(damage(), 1..4)) {
        let (good, current) = states();
        let mut bad = good.clone();
        for one in &d {
            bad = apply(&bad, one);
        }
        prop_assume!(bad != good);
        let mut x = vec![0.5f32; 100];
        let mut b = vec![half::bf16::from_f32(0.25); 37];
        let mut opt = optimizer(&mut x, &mut b);
        opt.load_state(&current).unwrap();
        let e = opt.load_state(&bad).unwrap_err();
        prop_assert!(e.message().starts_with("state:"), "{}", e);
        prop_assert_eq!(opt.save_state().unwrap(), current);
    }

    #[test]
    fn random_bytes_never_load(bytes in proptest::collection::vec(any::<u8>(), 0..300), magic in any::<bool>()) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 12 {
            bytes[..8].copy_from_slice(b"HYZOSTAT");
            bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        }
        let mut x = vec![0.5f32; 100];
        let mut b = vec![half::bf16::from_f32(0.25); 37];
        let mut opt = optimizer(&mut x, &mut b);
        prop_assert!(opt.load_state(&bytes).is_err());
    }
}
