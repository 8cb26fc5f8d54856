//! Shared set-up of backward test cases (tests/backward.rs, tests/reference_backward.rs): the
//! seeded upstream gradients and the row helpers of the chunk-rule tests.

use selattn::reference::HostInputs;
use selattn::Shape;
use selattn::Switches;
use selattn_tools::testing::{random_inputs, Rng};

/// Seeded inputs of `shape` with the inputs `c` names, plus F0 (if `f0`), dO, and dF_out (if
/// `df_out`); `upstream_seed` seeds F0, dO and dF_out, in that order.
pub fn backward_data(
    shape: &Shape,
    c: Switches,
    f0: bool,
    df_out: bool,
    seed: u64,
    upstream_seed: u64,
) -> (HostInputs, Vec<f32>, Option<Vec<f32>>) {
    let mut x = random_inputs(shape, c, seed);
    let mut rng = Rng::new(upstream_seed);
    let nf = (shape.batch * shape.k_len) as usize;
    if f0 {
        x.f0 = Some(rng.range(0.0, 2.0, nf));
    }
    let d_o = rng.normals((shape.batch * shape.q_heads * shape.q_len * shape.head_dim) as usize);
    let df_out = df_out.then(|| rng.normals(nf));
    (x, d_o, df_out)
}

/// Rows `[lo, hi)` of the middle axis of `[outer, n, inner]`.
pub fn rows<T: Copy>(
    x: &[T],
    outer: usize,
    n: usize,
    inner: usize,
    lo: usize,
    hi: usize,
) -> Vec<T> {
    let mut v = Vec::with_capacity(outer * (hi - lo) * inner);
    for o in 0..outer {
        v.extend_from_slice(&x[(o * n + lo) * inner..(o * n + hi) * inner]);
    }
    v
}

/// Adds `[outer, m, inner]` into rows `[lo, lo + m)` of `[outer, n, inner]`.
pub fn add_rows<S: Copy + Into<f64>>(
    dst: &mut [f64],
    src: &[S],
    outer: usize,
    n: usize,
    inner: usize,
    lo: usize,
) {
    let m = src.len() / (outer * inner);
    for o in 0..outer {
        for (d, s) in dst[(o * n + lo) * inner..(o * n + lo + m) * inner]
            .iter_mut()
            .zip(&src[o * m * inner..(o + 1) * m * inner])
        {
            *d += (*s).into();
        }
    }
}
