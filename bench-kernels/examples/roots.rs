//! Prints the proof root of one challenge on each backend this build has,
//! so the same seed can be compared across CPU, wgpu (lavapipe or a GPU)
//! and CUDA: `cargo run --release -p troop-bench-kernels --features wgpu
//! --example roots -- [n] [rounds] [seed-hex]`. Exits 1 when roots differ.

use std::time::Instant;

use troop_bench_kernels::matmul::prove_with;
use troop_bench_kernels::{Backend, Challenge};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(1024);
    let rounds: u32 = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(2);
    let seed = args.get(3).cloned().unwrap_or_else(|| {
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff".into()
    });
    let ch = Challenge { seed, n, rounds };
    let mut roots = Vec::new();
    for backend in [Backend::Cpu, Backend::Wgpu, Backend::Cuda] {
        let t = Instant::now();
        match prove_with(&ch, backend, backend.fold(), None, |_, _| {}) {
            Ok(p) => {
                let secs = p.matmul_seconds;
                println!(
                    "{{\"backend\":\"{}\",\"target\":\"{}\",\"n\":{n},\"rounds\":{rounds},\"root\":\"{}\",\"matmul_seconds\":{secs:.4},\"gflops\":{:.1},\"total_seconds\":{:.3}}}",
                    backend.name(),
                    p.target,
                    p.root_hex(),
                    ch.flops() / secs.max(1e-9) / 1e9,
                    t.elapsed().as_secs_f64()
                );
                roots.push(p.root_hex());
            }
            Err(e) => eprintln!("{}: {e}", backend.name()),
        }
    }
    roots.dedup();
    if roots.len() > 1 {
        eprintln!("roots differ across backends");
        std::process::exit(1);
    }
}
