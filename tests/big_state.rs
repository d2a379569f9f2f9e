//! A saved state over 4 GiB (format 1 stored its length in 32 bits): saved to a file,
//! streaming, loaded into a fresh optimizer, saved again, byte for byte the same.
//!
//! Needs about 6 GiB of memory and 9 GiB of free disk beside the temporary directory, and
//! skips (saying so) where either is missing. Ignored by a plain `cargo test` (it takes a
//! minute or two); `make test` runs it, and so does
//! `cargo test --release --test big_state -- --ignored --nocapture`.

use half::bf16;
use hyzo::{Config, Optimizer, ParamShard};
use std::io::Read;

/// 16 bytes of state per parameter (AdamW + AdaZO): just over 4 GiB.
const N: usize = (1 << 28) + (1 << 20);

fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn free_disk(dir: &std::path::Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["-Pk", dir.to_str().unwrap()])
        .output();
    out.ok()
        .and_then(|o| {
            let text = String::from_utf8(o.stdout).ok()?;
            text.lines()
                .nth(1)?
                .split_whitespace()
                .nth(3)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

fn same_files(a: &std::path::Path, b: &std::path::Path) -> bool {
    let (mut fa, mut fb) = (
        std::io::BufReader::new(std::fs::File::open(a).unwrap()),
        std::io::BufReader::new(std::fs::File::open(b).unwrap()),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            return fb.read(&mut bb).unwrap() == 0;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

#[test]
#[ignore = "writes 9 GiB and needs 7 GiB of memory: `make test` runs it where they exist"]
fn a_state_over_4_gib_saves_and_loads() {
    let dir = std::env::temp_dir().join(format!("hyzo-big-state-{}", std::process::id()));
    let need_memory = 7u64 << 30;
    let need_disk = 10u64 << 30;
    if available_memory() < need_memory || free_disk(&std::env::temp_dir()) < need_disk {
        println!(
            "skipped: needs {} GiB of memory and {} GiB of disk in {}",
            need_memory >> 30,
            need_disk >> 30,
            std::env::temp_dir().display()
        );
        return;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let (first, second) = (dir.join("a.state"), dir.join("b.state"));
    let config = Config {
        lr: 1e-3,
        ..Config::hybrid(0, 0)
    };
    let mut weights = vec![bf16::from_f32(0.25); N];
    {
        let mut shard = ParamShard::new();
        shard.add(&mut weights, 0).unwrap();
        let mut opt = Optimizer::new(config.clone(), shard).unwrap();
        let size = opt.state_size().unwrap();
        assert!(size > 4 << 30, "{size}");
        // One zeroth-order step fills the AdaZO moments with something other than zeros.
        let mut calls = 0;
        opt.zo_step(|_| {
            calls += 1;
            calls as f32 * 1e-3
        })
        .unwrap();
        opt.save_state_file(&first).unwrap();
        assert_eq!(std::fs::metadata(&first).unwrap().len(), size);
    }
    {
        let mut shard = ParamShard::new();
        shard.add(&mut weights, 0).unwrap();
        let mut opt = Optimizer::new(config, shard).unwrap();
        opt.load_state_file(&first).unwrap();
        assert_eq!(opt.steps(), 1);
        assert_eq!(opt.updates().unwrap(), 1);
        opt.save_state_file(&second).unwrap();
    }
    let same = same_files(&first, &second);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(same, "the reloaded state differs from the saved one");
}
