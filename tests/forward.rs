//! The fused forward kernel against the f64 reference, on every adapter.

mod common;
use common::*;
use selattn::{DType, Options, Shape};

fn sweep(cases: &[(Shape, Options, Controls)], seed: u64) {
    let mut failures = vec![];
    for ctx in contexts() {
        for (n, (shape, opts, c)) in cases.iter().enumerate() {
            let x = random_inputs(shape, *c, seed + n as u64);
            let gpu = run_gpu(ctx, shape, &x, opts, DType::F32);
            let r = run_ref(shape, &x, opts);
            let name = format!("{shape:?} {opts:?} {}", c.name());
            let co = compare(&gpu.o, &r.o, 0.0, 0.0);
            eprintln!(
                "[{}] {name}: O max {:.2e} rel {:.2e}",
                ctx.describe(),
                co.max_abs,
                co.rel_norm
            );
            if let Some(f) = check_case(&name, ctx, &gpu, &r, 2e-5) {
                failures.push(f);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn plain_small() {
    let s = Shape::new(1, 2, 37, 64);
    sweep(
        &[
            (s, Options::new(), Controls::default()),
            (s, Options::causal(), Controls::default()),
            (s, Options::causal(), Controls::ALL),
            (s, Options::causal().selective(1), Controls::ALL),
            (
                s.with_kv_heads(1),
                Options::causal().selective(0),
                Controls::ALL,
            ),
            (
                Shape::new(2, 4, 70, 16).with_kv_heads(1),
                Options::causal().selective(3),
                Controls::default(),
            ),
        ],
        1,
    );
}

/// Every head dim class of the tile chooser: tiny (8), padded output columns (40, 88, 248),
/// the register-heavy large dims (128, 256), with every option and selective masking.
#[test]
fn head_dims() {
    let mut cases = vec![];
    for d in [8, 40, 88, 128, 248, 256] {
        let s = Shape::new(1, 2, 19, d).with_kv_heads(1);
        cases.push((s, Options::causal(), Controls::ALL));
        cases.push((s, Options::causal().selective(1), Controls::ALL));
    }
    cases.push((Shape::new(1, 1, 1, 8), Options::new(), Controls::default()));
    sweep(&cases, 100);
}
