//! The main job: causal attention with per-query temperature, positional temperature and value
//! gating at B=1, H=8, N=1024, D=64 on the default adapter, checked against the f64 reference.
//!
//! `cargo run --release --example quickstart`

use std::time::Instant;

use selattn::reference::{self, HostInputs};
use selattn::{Context, Inputs, Options, Outputs, Shape, Spec};
use selattn_tools::testing::{compare, Rng};

fn main() {
    if let Err(e) = run() {
        eprintln!("quickstart failed: {e}");
        std::process::exit(1);
    }
}

/// Seeded normal numbers, so every run sees the same inputs.
fn normals(seed: u64, n: usize) -> Vec<f32> {
    Rng::from_state(seed).normals(n)
}

fn run() -> selattn::Result<()> {
    let ctx = Context::new()?;
    println!("adapter: {}", ctx.describe());

    let shape = Shape::new(1, 8, 1024, 64);
    let n = |d: Vec<u64>| d.iter().product::<u64>() as usize;
    // Temperatures around 1, a small positional term per head, gates in (0, 1).
    let host = HostInputs {
        q: normals(1, n(shape.q_dims())),
        k: normals(2, n(shape.kv_dims())),
        v: normals(3, n(shape.kv_dims())),
        tau: Some(
            normals(4, n(shape.row_dims()))
                .iter()
                .map(|x| 1.0 + 0.2 * x)
                .collect(),
        ),
        alpha: Some((0..shape.q_heads).map(|h| 0.02 * h as f32).collect()),
        gate: Some(
            normals(5, n(shape.gate_dims()))
                .iter()
                .map(|x| 1.0 / (1.0 + (-x).exp()))
                .collect(),
        ),
        kv_len: None,
        f0: None,
    };
    let opts = Options::causal();

    let q = ctx.upload(&shape.q_dims(), &host.q)?;
    let k = ctx.upload(&shape.kv_dims(), &host.k)?;
    let v = ctx.upload(&shape.kv_dims(), &host.v)?;
    let tau = ctx.upload(&shape.row_dims(), host.tau.as_deref().unwrap_or_default())?;
    let alpha = ctx.upload(
        &shape.alpha_dims(),
        host.alpha.as_deref().unwrap_or_default(),
    )?;
    let gate = ctx.upload(&shape.gate_dims(), host.gate.as_deref().unwrap_or_default())?;
    let o = ctx.empty(&shape.q_dims(), selattn::DType::F32)?;
    let inputs = Inputs::new(&q, &k, &v).tau(&tau).alpha(&alpha).gate(&gate);
    let outputs = Outputs::new(&o);

    // First call builds the pipeline; time the second.
    ctx.attention(&inputs, &opts, &outputs)?;
    ctx.sync()?;
    let t0 = Instant::now();
    ctx.attention(&inputs, &opts, &outputs)?;
    ctx.sync()?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let got = ctx.download(&o)?;

    let spec = Spec {
        shape,
        options: opts,
        present: host.present(false),
    };
    let want = reference::attention(&spec, &host)?;
    let cmp = compare(&got, &want.o, 0.0, 0.0);
    let (max_err, rel) = (cmp.max_abs, cmp.rel_norm);
    let flops = 4.0 * 8.0 * 1024.0 * 1024.0 * 64.0 / 2.0;
    println!(
        "causal attention B=1 H=8 N=1024 D=64 with tau, alpha, gate: {ms:.2} ms ({:.1} GFLOP/s, wall clock)",
        flops / ms / 1e6
    );
    println!(
        "against the f64 reference: max abs error {max_err:.2e}, norm-wise relative {rel:.2e}"
    );
    // NaN or a mismatched infinity anywhere fails too (compare leaves them out of the norm).
    if cmp.nan > 0 || max_err.is_infinite() || rel.is_nan() || rel >= 1e-5 {
        println!("FAILED: error above 1e-5");
        std::process::exit(1);
    }
    println!("ok");
    Ok(())
}
