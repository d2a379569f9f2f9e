//! A linear least-squares model in bf16, trained three ways through the same optimizer:
//! zeroth-order AdaZO (losses only), first-order AdamW, and the hybrid schedule of the
//! "Downgrade to Upgrade" paper (blocks of FO and ZO steps).

use half::bf16;
use hyzo::{Config, DirectionKind, Optimizer, ParamShard, Phase, Precision, Rule};

struct Problem {
    xs: Vec<Vec<f32>>,
    ys: Vec<f32>,
}

impl Problem {
    fn new(n: usize, d: usize) -> Self {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut r = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let w: Vec<f32> = (0..d).map(|_| r()).collect();
        let xs: Vec<Vec<f32>> = (0..n).map(|_| (0..d).map(|_| r()).collect()).collect();
        let ys = xs
            .iter()
            .map(|x| x.iter().zip(&w).map(|(a, b)| a * b).sum::<f32>() + 0.01 * r())
            .collect();
        Self { xs, ys }
    }

    fn loss(&self, w: &[f32]) -> f32 {
        self.residuals(w).iter().map(|r| r * r).sum::<f32>() / self.ys.len() as f32
    }

    fn residuals(&self, w: &[f32]) -> Vec<f32> {
        self.xs
            .iter()
            .zip(&self.ys)
            .map(|(x, y)| x.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() - y)
            .collect()
    }

    fn grad(&self, w: &[f32]) -> Vec<f32> {
        let r = self.residuals(w);
        let n = self.ys.len() as f32;
        (0..w.len())
            .map(|k| 2.0 * self.xs.iter().zip(&r).map(|(x, ri)| x[k] * ri).sum::<f32>() / n)
            .collect()
    }
}

fn train(name: &str, problem: &Problem, config: Config, steps: usize) -> hyzo::Result<()> {
    let d = problem.xs[0].len();
    let mut w = vec![bf16::ZERO; d];
    let mut g = vec![0f32; d];
    let mut shard = ParamShard::new();
    shard.add_with_grad(&mut w, &mut g, 0)?;
    let mut opt = Optimizer::new(config, shard)?;
    let weights = |opt: &Optimizer| opt.params().values(0).unwrap().to_f32_vec();
    println!("{name}");
    let mut forwards = 0;
    for step in 0..=steps {
        if step % (steps / 5) == 0 {
            println!(
                "  step {step:4}  loss {:.5}  ({forwards} forward passes)",
                problem.loss(&weights(&opt))
            );
        }
        if step == steps {
            break;
        }
        match opt.next_phase() {
            Some(Phase::FirstOrder) => {
                let grad = problem.grad(&weights(&opt));
                forwards += 1;
                opt.grad_mut(0)?.copy_from_f32(&grad)?;
                opt.fo_step()?;
            }
            _ => {
                opt.zo_step(|p| {
                    forwards += 1;
                    problem.loss(&p.values(0).unwrap().to_f32_vec())
                })?;
            }
        }
    }
    Ok(())
}

fn main() -> hyzo::Result<()> {
    let problem = Problem::new(256, 32);
    let zo = Config {
        lr: 2e-2,
        eps: 1e-2,
        num_directions: 4,
        direction: DirectionKind::Gaussian,
        rule: Rule::AdaZo,
        precision: Precision::Compensated,
        seed: 7,
        ..Config::default()
    };
    train(
        "zeroth-order AdaZO, q = 4, bf16 compensated",
        &problem,
        zo.clone(),
        400,
    )?;
    let fo = Config {
        rule: Rule::AdamW,
        fo_steps: 1,
        zo_steps: 0,
        ..zo.clone()
    };
    train("first-order AdamW", &problem, fo, 400)?;
    let hybrid = Config {
        rule: Rule::AdamW,
        fo_steps: 10,
        zo_steps: 10,
        ..zo
    };
    train(
        "hybrid AdamW: 10 FO steps, then 10 ZO steps, alternating",
        &problem,
        hybrid,
        400,
    )?;
    Ok(())
}
