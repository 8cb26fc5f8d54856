//! Shared set-up of backward test cases (tests/backward.rs, tests/reference_backward.rs): the
//! seeded upstream gradients.

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
