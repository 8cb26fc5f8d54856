//! The chunk rule in tests: a run cut into chunks of query rows, each a call of its own (rows
//! `[s, e)` against keys `[0, e)`, F0 threaded from the chunk before), for the chunked prefill
//! (tests/selective.rs) and the chunked backward (tests/backward.rs, tests/reference_backward.rs),
//! each checked against the whole run.

use selattn::reference::HostInputs;
use selattn::reference_backward::HostGrads;
use selattn::{Options, Shape};

/// Rows `[lo, hi)` of the middle axis of `[outer, n, inner]`.
pub fn rows<T: Copy>(
    x: &[T],
    outer: usize,
    n: usize,
    inner: usize,
    lo: usize,
    hi: usize,
) -> Vec<T> {
    assert_eq!(x.len(), outer * n * inner);
    let mut v = Vec::with_capacity(outer * (hi - lo) * inner);
    for o in 0..outer {
        v.extend_from_slice(&x[(o * n + lo) * inner..(o * n + hi) * inner]);
    }
    v
}

/// Writes `[outer, hi - lo, inner]` into rows `[lo, hi)` of `[outer, n, inner]`.
pub fn put_rows<T: Copy>(
    dst: &mut [T],
    src: &[T],
    outer: usize,
    n: usize,
    inner: usize,
    lo: usize,
) {
    let m = src.len() / (outer * inner);
    for o in 0..outer {
        dst[(o * n + lo) * inner..(o * n + lo + m) * inner]
            .copy_from_slice(&src[o * m * inner..(o + 1) * m * inner]);
    }
}

/// The inputs of chunk `[s, e)` of a whole sequence: Q, tau rows `[s, e)`; K, V, gate the first
/// `e` keys; kv_len clipped to `e` (rows of the chunk sit before `e`, so the allowed keys are the
/// same); F0 = the previous chunk's F_out for the first `e_prev` keys, the whole run's F0 after.
pub fn chunk_inputs(
    shape: &Shape,
    x: &HostInputs,
    s: usize,
    e: usize,
    prev_f: Option<(&[f32], usize)>,
) -> (Shape, HostInputs) {
    let (b, hq, hkv, nq, nk, d) = (
        shape.batch as usize,
        shape.q_heads as usize,
        shape.kv_heads as usize,
        shape.q_len as usize,
        shape.k_len as usize,
        shape.head_dim as usize,
    );
    let cs = Shape {
        q_len: (e - s) as u32,
        k_len: e as u32,
        ..*shape
    };
    let f0 = x.f0.as_ref().map(|f0| {
        let mut v = rows(f0, b, nk, 1, 0, e);
        if let Some((pf, pe)) = prev_f {
            put_rows(&mut v, pf, b, e, 1, 0);
            assert_eq!(pf.len(), b * pe);
        }
        v
    });
    let cx = HostInputs {
        q: rows(&x.q, b * hq, nq, d, s, e),
        k: rows(&x.k, b * hkv, nk, d, 0, e),
        v: rows(&x.v, b * hkv, nk, d, 0, e),
        tau: x.tau.as_ref().map(|t| rows(t, b * hq, nq, 1, s, e)),
        alpha: x.alpha.clone(),
        gate: x.gate.as_ref().map(|g| rows(g, b * hkv, nk, 1, 0, e)),
        kv_len: x
            .kv_len
            .as_ref()
            .map(|l| l.iter().map(|&l| l.min(e as u32)).collect()),
        f0,
    };
    (cs, cx)
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
    assert!(x.f0.is_some(), "the chunk rule threads F0");
    let mut chunks: Vec<Chunk> = vec![];
    let mut prev_f: Option<Vec<f32>> = None;
    for w in bounds.windows(2) {
        let (s, e) = (w[0], w[1]);
        let (shape, x) = chunk_inputs(shape, x, s, e, prev_f.as_deref().map(|pf| (pf, s)));
        let chunk = Chunk {
            lo: s,
            hi: e,
            shape,
            opts: opts.start(s as u32),
            x,
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
