//! The main job: causal attention with per-query temperature, positional temperature and value
//! gating at B=1, H=8, N=1024, D=64 on the default adapter, checked against the f64 reference.
//!
//! `cargo run --release --example quickstart`

use std::time::Instant;

use selattn::reference::{self, HostInputs};
use selattn::{Context, Inputs, Options, Outputs, Shape, Spec};

fn main() {
    if let Err(e) = run() {
        eprintln!("quickstart failed: {e}");
        std::process::exit(1);
    }
}

/// Seeded normal numbers (splitmix64 + Box-Muller), so every run sees the same inputs.
fn normals(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    let mut next = move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (next().max(1e-300), next());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
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
    let (mut max_err, mut num, mut den) = (0.0f64, 0.0, 0.0);
    for (&g, &r) in got.iter().zip(&want.o) {
        let e = (g as f64 - r).abs();
        max_err = if e.is_nan() {
            f64::INFINITY
        } else {
            max_err.max(e)
        };
        num += e * e;
        den += r * r;
    }
    let rel = (num / den).sqrt();
    let flops = 4.0 * 8.0 * 1024.0 * 1024.0 * 64.0 / 2.0;
    println!(
        "causal attention B=1 H=8 N=1024 D=64 with tau, alpha, gate: {ms:.2} ms ({:.1} GFLOP/s, wall clock)",
        flops / ms / 1e6
    );
    println!(
        "against the f64 reference: max abs error {max_err:.2e}, norm-wise relative {rel:.2e}"
    );
    if !(rel < 1e-5) {
        println!("FAILED: error above 1e-5");
        std::process::exit(1);
    }
    println!("ok");
    Ok(())
}
