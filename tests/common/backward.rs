//! Shared set-up of backward test cases (tests/backward.rs, tests/reference_backward.rs): the
//! seeded upstream gradients, the row helpers and the chunk rule (forward chunks threading F,
//! backward chunks threading dF) that both files check against a whole run.

use selattn::reference::HostInputs;
use selattn::reference_backward::HostGrads;
use selattn::Switches;
use selattn::{Options, Shape};
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

/// One chunk of a chunked run: query rows `lo..hi` against keys `0..hi`, as a call of its own.
pub struct Chunk {
    /// First query row of the chunk in the whole run.
    pub lo: usize,
    /// One past its last query row (and its key count).
    pub hi: usize,
    /// The chunk's shape: `hi - lo` queries, `hi` keys.
    pub shape: Shape,
    /// The whole run's options, starting at `lo`.
    pub opts: Options,
    /// The chunk's inputs; its F0 is the previous chunk's F_out over the keys that chunk saw.
    pub x: HostInputs,
}

/// The chunk rule, forward: cuts the run `(shape, opts, x)` (`q_len == k_len`, F0 given) at
/// `bounds` and calls `forward` on each chunk, first to last; the F_out `[B, hi]` it returns
/// becomes the first keys of the next chunk's F0.
pub fn chunks_forward(
    shape: &Shape,
    opts: &Options,
    x: &HostInputs,
    bounds: &[usize],
    mut forward: impl FnMut(&Chunk) -> Vec<f32>,
) -> Vec<Chunk> {
    assert_eq!(shape.q_len, shape.k_len, "the chunk rule cuts a square run");
    let (b, hq, hkv, n, d) = dims(shape);
    let mut chunks: Vec<Chunk> = vec![];
    let mut prev_f: Option<Vec<f32>> = None;
    for w in bounds.windows(2) {
        let (s, e) = (w[0], w[1]);
        let mut f0 = rows(
            x.f0.as_ref().expect("the chunk rule needs F0"),
            b,
            n,
            1,
            0,
            e,
        );
        if let Some(pf) = &prev_f {
            let pe = pf.len() / b;
            for bb in 0..b {
                f0[bb * e..bb * e + pe].copy_from_slice(&pf[bb * pe..(bb + 1) * pe]);
            }
        }
        let chunk = Chunk {
            lo: s,
            hi: e,
            shape: Shape {
                q_len: (e - s) as u32,
                k_len: e as u32,
                ..*shape
            },
            opts: opts.start(s as u32),
            x: HostInputs {
                q: rows(&x.q, b * hq, n, d, s, e),
                k: rows(&x.k, b * hkv, n, d, 0, e),
                v: rows(&x.v, b * hkv, n, d, 0, e),
                tau: x.tau.as_ref().map(|t| rows(t, b * hq, n, 1, s, e)),
                alpha: x.alpha.clone(),
                gate: x.gate.as_ref().map(|g| rows(g, b * hkv, n, 1, 0, e)),
                kv_len: x
                    .kv_len
                    .as_ref()
                    .map(|l| l.iter().map(|&l| l.min(e as u32)).collect()),
                f0: Some(f0),
            },
        };
        prev_f = Some(forward(&chunk));
        chunks.push(chunk);
    }
    chunks
}

/// The chunk rule, backward: calls `backward(chunk, dO rows, dF_out)` last chunk first; the dF0
/// it returns for the keys the chunk before saw becomes that chunk's dF_out, the rest belongs to
/// the whole run's dF0. dK, dV, dgate and dalpha add up over chunks, dQ and dtau are per chunk.
/// Returns the whole run's gradients.
pub fn chunks_backward(
    shape: &Shape,
    chunks: &[Chunk],
    d_o: &[f32],
    df_out: &[f32],
    mut backward: impl FnMut(&Chunk, Vec<f32>, Vec<f32>) -> HostGrads,
) -> HostGrads {
    let (b, hq, hkv, n, d) = dims(shape);
    let mut acc = HostGrads {
        dq: vec![0.0; b * hq * n * d],
        dk: vec![0.0; b * hkv * n * d],
        dv: vec![0.0; b * hkv * n * d],
        dtau: vec![0.0; b * hq * n],
        dalpha: vec![0.0; hq],
        dgate: vec![0.0; b * hkv * n],
        df0: vec![0.0; b * n],
    };
    let mut df_out = df_out.to_vec();
    for (ci, c) in chunks.iter().enumerate().rev() {
        let (s, e) = (c.lo, c.hi);
        let g = backward(c, rows(d_o, b * hq, n, d, s, e), df_out);
        add_rows(&mut acc.dq, &g.dq, b * hq, n, d, s);
        add_rows(&mut acc.dtau, &g.dtau, b * hq, n, 1, s);
        add_rows(&mut acc.dk, &g.dk, b * hkv, n, d, 0);
        add_rows(&mut acc.dv, &g.dv, b * hkv, n, d, 0);
        add_rows(&mut acc.dgate, &g.dgate, b * hkv, n, 1, 0);
        for (a, x) in acc.dalpha.iter_mut().zip(&g.dalpha) {
            *a += x;
        }
        // Keys the previous chunk saw get their gradient through its F_out; the rest belong to
        // the whole run's F0.
        let pe = if ci == 0 { 0 } else { chunks[ci - 1].hi };
        add_rows(&mut acc.df0, &rows(&g.df0, b, e, 1, pe, e), b, n, 1, pe);
        df_out = rows(&g.df0, b, e, 1, 0, pe)
            .iter()
            .map(|&v| v as f32)
            .collect();
    }
    acc
}

/// `(B, Hq, Hkv, N, D)` of a square run.
fn dims(s: &Shape) -> (usize, usize, usize, usize, usize) {
    let u = |v: u32| v as usize;
    (
        u(s.batch),
        u(s.q_heads),
        u(s.kv_heads),
        u(s.k_len),
        u(s.head_dim),
    )
}
