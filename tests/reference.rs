//! Tests of the f64 CPU reference (`selattn::reference::attention`), the oracle every kernel is
//! checked against. An oracle cannot be checked against itself, so each test here checks it a
//! second, independent way:
//!
//! * against [`Plain`], a brute-force attention written in this file that materialises the full
//!   score matrix (and, for selective masking, the full S and F matrices) straight from DESIGN.md §1;
//! * through metamorphic relations: an option must equal a transformed call without it
//!   (tau is a logit scale, the gate is a pre-scaled V, kv_len is a truncation, chunks thread F);
//! * through its error paths: every invalid call returns its typed [`Error`] variant.
//!
//! Inputs are seeded random normals. Where a relation holds exactly only if an f32 input carries an
//! f64 quantity without rounding, the inputs are chosen so that it does (dyadic values), and the
//! test says so; otherwise the tolerance is derived from f32 rounding and stated beside it.

use selattn::reference::{attention, HostInputs, HostOutputs};
use selattn::{Error, Options, Shape, Spec};

// ---------------------------------------------------------------------------------------------
// Seeded random inputs
// ---------------------------------------------------------------------------------------------

/// Box-Muller normals in f64 from the shared seeded generator (state = seed, uniforms in (0, 1]).
struct Rng(selattn_tools::testing::Rng);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(selattn_tools::testing::Rng::from_state(seed))
    }

    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in (0, 1]: never 0, so `ln` in Box-Muller stays finite.
    fn uniform(&mut self) -> f64 {
        self.0.uniform_open()
    }

    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }

    /// Normals rounded to multiples of 1/8 in [-3, 3]. Dot products of these over D <= 256 and
    /// their sums over a few dozen rows are exact in f64 *and* in f32, so state carried between
    /// calls through f32 (F0) loses nothing.
    fn dyadic_normals(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.normal().clamp(-3.0, 3.0) * 8.0).round() / 8.0) as f32)
            .collect()
    }

    /// Temperatures around 1, kept positive: `0.75 + 0.25 * N(0, 1)` clamped to [0.25, 2].
    fn temperatures(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (0.75 + 0.25 * self.normal()).clamp(0.25, 2.0) as f32)
            .collect()
    }
}

/// Q, K, V of `shape` as seeded normals, every option absent.
fn qkv(rng: &mut Rng, s: Shape) -> HostInputs {
    let q = (s.batch * s.q_heads * s.q_len * s.head_dim) as usize;
    let kv = (s.batch * s.kv_heads * s.k_len * s.head_dim) as usize;
    HostInputs {
        q: rng.normals(q),
        k: rng.normals(kv),
        v: rng.normals(kv),
        ..HostInputs::default()
    }
}

/// Shape with every size spelled out: (B, Hq, Hkv, Nq, Nk, D).
fn shape(b: u32, hq: u32, hkv: u32, nq: u32, nk: u32, d: u32) -> Shape {
    Shape::new(b, hq, nk, d).with_kv_heads(hkv).with_q_len(nq)
}

// ---------------------------------------------------------------------------------------------
// Running the reference and comparing
// ---------------------------------------------------------------------------------------------

/// The spec the reference sees for these inputs and options.
fn spec(s: Shape, o: Options, x: &HostInputs) -> Spec {
    Spec {
        shape: s,
        options: o,
        present: x.present(o.selective.is_some()),
    }
}

/// Runs the reference on a call the test knows to be valid.
fn run(s: Shape, o: Options, x: &HostInputs) -> HostOutputs {
    attention(&spec(s, o, x), x)
        .unwrap_or_else(|e| panic!("reference rejected a valid call {s:?} {o:?}: {e}"))
}

/// Compares every element, `|got - want| <= atol + rtol * |want|`; equal infinities match, NaN
/// never does. On failure reports the max abs error, where, and the norm-wise relative error.
#[track_caller]
fn assert_close(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut worst, mut worst_at, mut bad) = (0.0f64, 0usize, None);
    let (mut diff2, mut ref2) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let same_inf = g.is_infinite() && g == w;
        let err = if same_inf { 0.0 } else { (g - w).abs() };
        // Written so that a NaN error fails: it is neither within tolerance nor below the worst.
        let within = err <= atol + rtol * w.abs();
        if !within && bad.is_none() {
            bad = Some((i, g, w));
        }
        if err > worst || err.is_nan() {
            (worst, worst_at) = (err, i);
        }
        if !same_inf {
            diff2 += err * err;
            ref2 += w * w;
        }
    }
    let normwise = diff2.sqrt() / ref2.sqrt().max(f64::MIN_POSITIVE);
    if let Some((i, g, w)) = bad {
        panic!(
            "{what}: element {i}: got {g}, want {w}; max abs error {worst:e} at {worst_at}, \
             norm-wise relative error {normwise:e} (atol {atol:e}, rtol {rtol:e})"
        );
    }
}

/// Tolerance of two f64 computations of the same formula in a different order.
const F64: (f64, f64) = (1e-12, 1e-10);

#[track_caller]
fn assert_outputs(what: &str, got: &HostOutputs, want: &HostOutputs, (atol, rtol): (f64, f64)) {
    assert_close(&format!("{what}: O"), &got.o, &want.o, atol, rtol);
    assert_close(&format!("{what}: LSE"), &got.lse, &want.lse, atol, rtol);
    assert_close(
        &format!("{what}: F_out"),
        &got.f_out,
        &want.f_out,
        atol,
        rtol,
    );
}

#[track_caller]
fn assert_no_nan(what: &str, out: &HostOutputs) {
    for (name, t) in [("O", &out.o), ("LSE", &out.lse), ("F_out", &out.f_out)] {
        if let Some(i) = t.iter().position(|x| x.is_nan()) {
            panic!("{what}: {name}[{i}] is NaN");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The independent oracle
// ---------------------------------------------------------------------------------------------

/// Plain softmax attention written the other way round from the reference: per (batch, head) it
/// materialises the whole Nq × Nk score matrix (masked entries `-inf`), subtracts the row max,
/// exponentiates, normalises, and multiplies by V. LSE is `ln Σ exp(s)` summed directly, without
/// the max shift, so it does not share the reference's route (inputs here keep logits small).
struct Plain<'a> {
    shape: Shape,
    scale: f64,
    start: usize,
    causal: bool,
    x: &'a HostInputs,
    /// Per-row temperature `[B, Hq, Nq]` in f64; 1 when absent. Gate and tau in `x` are ignored.
    temp: Option<&'a [f64]>,
    /// Per-batch bias `[B, Nq, Nk]` subtracted from every head's logits (the selective F).
    bias: Option<&'a [f64]>,
}

impl<'a> Plain<'a> {
    /// Causal or not, default scale and start, every control off.
    fn new(shape: Shape, causal: bool, x: &'a HostInputs) -> Self {
        Plain {
            shape,
            scale: default_scale(shape.head_dim),
            start: shape.k_len.saturating_sub(shape.q_len) as usize,
            causal,
            x,
            temp: None,
            bias: None,
        }
    }

    /// `(O, LSE)` of the call.
    fn run(&self) -> (Vec<f64>, Vec<f64>) {
        let s = self.shape;
        let (bn, hq, hkv) = (s.batch as usize, s.q_heads as usize, s.kv_heads as usize);
        let (nq, nk, d) = (s.q_len as usize, s.k_len as usize, s.head_dim as usize);
        let mut o = vec![0.0; bn * hq * nq * d];
        let mut lse = vec![0.0; bn * hq * nq];
        for b in 0..bn {
            let valid = self.x.kv_len.as_ref().map_or(nk, |l| l[b] as usize);
            for h in 0..hq {
                let hk = h * hkv / hq;
                let q = &self.x.q[(b * hq + h) * nq * d..][..nq * d];
                let k = &self.x.k[(b * hkv + hk) * nk * d..][..nk * d];
                let v = &self.x.v[(b * hkv + hk) * nk * d..][..nk * d];
                // Scores: one full matrix, masked entries -inf.
                let mut sc = vec![vec![f64::NEG_INFINITY; nk]; nq];
                for (i, row) in sc.iter_mut().enumerate() {
                    let t = self.temp.map_or(1.0, |t| t[(b * hq + h) * nq + i]);
                    for (j, sij) in row.iter_mut().enumerate() {
                        let masked = j >= valid || (self.causal && j > self.start + i);
                        if masked {
                            continue;
                        }
                        let dot: f64 = (0..d)
                            .map(|c| q[i * d + c] as f64 * k[j * d + c] as f64)
                            .sum();
                        let f = self.bias.map_or(0.0, |f| f[(b * nq + i) * nk + j]);
                        *sij = t * self.scale * dot - f;
                    }
                }
                for (i, row) in sc.iter().enumerate() {
                    let at = (b * hq + h) * nq + i;
                    lse[at] = row.iter().map(|s| s.exp()).sum::<f64>().ln();
                    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    if max == f64::NEG_INFINITY {
                        continue; // empty row: O stays 0, LSE is ln 0 = -inf
                    }
                    let e: Vec<f64> = row.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for c in 0..d {
                        o[at * d + c] = (0..nk).map(|j| e[j] / total * v[j * d + c] as f64).sum();
                    }
                }
            }
        }
        (o, lse)
    }
}

/// The default logit scale: `1/sqrt(D)` as the kernels receive it, an f32 (so rounded once;
/// for D = 8 that is 3e-8 away from the f64 value, more than the f64 comparisons here allow).
fn default_scale(d: u32) -> f64 {
    (1.0 / (d as f32).sqrt()) as f64
}

/// Row temperatures `t_i = tau (or 1) + alpha[h] ln(p_i + 1)` in f64, `[B, Hq, Nq]`.
fn temperatures(s: Shape, start: usize, x: &HostInputs) -> Vec<f64> {
    let (hq, nq) = (s.q_heads as usize, s.q_len as usize);
    (0..(s.batch as usize) * hq * nq)
        .map(|r| {
            let (h, i) = ((r / nq) % hq, r % nq);
            let tau = x.tau.as_ref().map_or(1.0, |t| t[r] as f64);
            let pos = x
                .alpha
                .as_ref()
                .map_or(0.0, |a| a[h] as f64 * ((start + i + 1) as f64).ln());
            tau + pos
        })
        .collect()
}

/// Selective state by brute force: `(F [B, Nq, Nk], F_out [B, Nk])`. S is materialised as a full
/// Nq × Nk matrix and every rule of DESIGN.md §1 is an explicit test on (k, j).
fn brute_force_f(
    s: Shape,
    scale: f64,
    start: usize,
    sel: usize,
    x: &HostInputs,
) -> (Vec<f64>, Vec<f64>) {
    let (hq, hkv) = (s.q_heads as usize, s.kv_heads as usize);
    let (nq, nk, d) = (s.q_len as usize, s.k_len as usize, s.head_dim as usize);
    let sel_kv = sel * hkv / hq;
    let mut f = Vec::new();
    let mut f_out = Vec::new();
    for b in 0..s.batch as usize {
        let valid = x.kv_len.as_ref().map_or(nk, |l| l[b] as usize);
        let f0 = |j: usize| x.f0.as_ref().map_or(0.0, |f0| f0[b * nk + j] as f64);
        let mut s_mat = vec![vec![0.0f64; nk]; nq];
        for (kr, row) in s_mat.iter_mut().enumerate() {
            let p_k = start + kr;
            for (j, skj) in row.iter_mut().enumerate() {
                let acts = j != 0 && j < p_k && p_k < valid;
                if !acts {
                    continue;
                }
                let q = &x.q[((b * hq + sel) * nq + kr) * d..][..d];
                let k = &x.k[((b * hkv + sel_kv) * nk + j) * d..][..d];
                let dot: f64 = q.iter().zip(k).map(|(&a, &c)| a as f64 * c as f64).sum();
                *skj = (scale * dot).max(0.0);
            }
        }
        for i in 0..nq {
            for j in 0..nk {
                let earlier: f64 = s_mat
                    .iter()
                    .enumerate()
                    .filter(|&(kr, _)| start + kr < start + i)
                    .map(|(_, row)| row[j])
                    .sum();
                f.push(f0(j) + earlier);
            }
        }
        for j in 0..nk {
            f_out.push(f0(j) + s_mat.iter().map(|row| row[j]).sum::<f64>());
        }
    }
    (f, f_out)
}

// ---------------------------------------------------------------------------------------------
// Slicing whole-sequence tensors into chunks and sub-problems
// ---------------------------------------------------------------------------------------------

/// Rows `range` of a tensor viewed as `[outer, n, inner]`.
fn rows<T: Copy>(
    t: &[T],
    outer: usize,
    n: usize,
    inner: usize,
    range: std::ops::Range<usize>,
) -> Vec<T> {
    (0..outer)
        .flat_map(|o| {
            t[(o * n + range.start) * inner..(o * n + range.end) * inner]
                .iter()
                .copied()
        })
        .collect()
}

/// `[outer, n]` widened to `[outer, m]` with zeros (m >= n).
fn pad(t: &[f64], outer: usize, n: usize, m: usize) -> Vec<f32> {
    (0..outer)
        .flat_map(|o| (0..m).map(move |j| if j < n { t[o * n + j] as f32 } else { 0.0 }))
        .collect()
}

/// One batch element `b` of the inputs, with the keys cut to the first `keys`.
fn batch_prefix(s: Shape, x: &HostInputs, b: usize, keys: usize) -> HostInputs {
    let (hq, hkv) = (s.q_heads as usize, s.kv_heads as usize);
    let (nq, nk, d) = (s.q_len as usize, s.k_len as usize, s.head_dim as usize);
    let one = |t: &[f32], per: usize| t[b * per..(b + 1) * per].to_vec();
    HostInputs {
        q: one(&x.q, hq * nq * d),
        k: rows(&one(&x.k, hkv * nk * d), hkv, nk, d, 0..keys),
        v: rows(&one(&x.v, hkv * nk * d), hkv, nk, d, 0..keys),
        tau: x.tau.as_ref().map(|t| one(t, hq * nq)),
        alpha: x.alpha.clone(),
        gate: x
            .gate
            .as_ref()
            .map(|g| rows(&one(g, hkv * nk), hkv, nk, 1, 0..keys)),
        kv_len: None,
        f0: x.f0.as_ref().map(|f| one(f, nk)[..keys].to_vec()),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Every control off: plain softmax attention
// ---------------------------------------------------------------------------------------------

#[test]
fn plain_attention_matches_full_score_matrix() {
    // (B, Hq, Hkv, Nq, Nk, D, explicit start) — Hq = Hkv, GQA (Hq = 4 Hkv) and MQA, Nq = Nk,
    // Nq < Nk (default start Nk - Nq, and an explicit one), Nq = 1, Nq > Nk (non-causal only).
    let cases = [
        (2, 2, 2, 7, 7, 8, None),
        (1, 4, 1, 9, 13, 16, None),
        (2, 8, 2, 11, 11, 24, None),
        (1, 4, 1, 5, 13, 16, Some(3)),
        (2, 4, 2, 1, 19, 32, None),
        (1, 2, 2, 1, 1, 8, None),
        (1, 4, 4, 6, 17, 8, Some(0)),
        (2, 2, 1, 11, 5, 16, None),
    ];
    let mut rng = Rng::new(1);
    for (b, hq, hkv, nq, nk, d, start) in cases {
        let s = shape(b, hq, hkv, nq, nk, d);
        let x = qkv(&mut rng, s);
        for causal in [false, true] {
            if causal && start.unwrap_or(nk.saturating_sub(nq)) + nq > nk {
                continue; // causal needs every query inside the keys
            }
            let mut opts = if causal {
                Options::causal()
            } else {
                Options::new()
            };
            let mut plain = Plain::new(s, causal, &x);
            if let Some(st) = start {
                opts = opts.start(st);
                plain.start = st as usize;
            }
            let got = run(s, opts, &x);
            let (o, lse) = plain.run();
            let what = format!("{s:?} causal {causal} start {start:?}");
            assert_close(&format!("{what}: O"), &got.o, &o, F64.0, F64.1);
            assert_close(&format!("{what}: LSE"), &got.lse, &lse, F64.0, F64.1);
            assert!(got.f_out.is_empty(), "{what}: F_out without selective");
        }
    }
}

#[test]
fn explicit_scale_is_used() {
    let s = shape(1, 4, 2, 6, 10, 16);
    let x = qkv(&mut Rng::new(2), s);
    for causal in [false, true] {
        let opts = if causal {
            Options::causal()
        } else {
            Options::new()
        };
        let got = run(s, opts.scale(0.6), &x);
        let mut plain = Plain::new(s, causal, &x);
        plain.scale = 0.6f32 as f64;
        let (o, lse) = plain.run();
        assert_close("O", &got.o, &o, F64.0, F64.1);
        assert_close("LSE", &got.lse, &lse, F64.0, F64.1);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Temperature: tau scales the logits; alpha adds alpha ln(p + 1)
// ---------------------------------------------------------------------------------------------

#[test]
fn constant_tau_equals_scaled_logits() {
    // scale 0.25 and these c are dyadic, so scale * c is exact in f32 and the relation is exact.
    let s = shape(2, 4, 2, 7, 12, 16);
    let x = qkv(&mut Rng::new(3), s);
    for c in [0.375f32, 1.75, 3.0] {
        for causal in [false, true] {
            let opts = if causal {
                Options::causal()
            } else {
                Options::new()
            };
            let with_tau = HostInputs {
                tau: Some(vec![c; (2 * 4 * 7) as usize]),
                ..x.clone()
            };
            let got = run(s, opts.scale(0.25), &with_tau);
            let want = run(s, opts.scale(0.25 * c), &x);
            assert_outputs(&format!("tau {c} causal {causal}"), &got, &want, F64);
        }
    }
}

#[test]
fn alpha_equals_precomputed_tau() {
    let s = shape(2, 4, 1, 6, 15, 16);
    let mut rng = Rng::new(4);
    let n_rows = (2 * 4 * 6) as usize;
    let x = HostInputs {
        tau: Some(rng.temperatures(n_rows)),
        alpha: Some(vec![0.1, 0.35, 0.0, 0.6]),
        ..qkv(&mut rng, s)
    };
    for (causal, start) in [
        (false, None),
        (true, None),
        (true, Some(4)),
        (false, Some(30)),
    ] {
        let mut opts = if causal {
            Options::causal()
        } else {
            Options::new()
        };
        let p0 = start.unwrap_or(15 - 6) as usize;
        if let Some(st) = start {
            opts = opts.start(st);
        }
        let got = run(s, opts, &x);
        let what = format!("causal {causal} start {start:?}");

        // Exactly, against the oracle given t_i = tau + alpha ln(p_i + 1) in f64.
        let t = temperatures(s, p0, &x);
        let mut plain = Plain::new(s, causal, &x);
        plain.start = p0;
        plain.temp = Some(&t);
        let (o, lse) = plain.run();
        assert_close(&format!("{what}: O vs oracle"), &got.o, &o, F64.0, F64.1);
        assert_close(
            &format!("{what}: LSE vs oracle"),
            &got.lse,
            &lse,
            F64.0,
            F64.1,
        );

        // Through the reference itself with tau' = t rounded to f32 and alpha removed. The f32
        // rounding of t (relative 6e-8, |logits| < 10) bounds the difference near 1e-6; a wrong
        // position (p instead of p + 1, or i instead of start + i) moves t by >= 1e-3.
        let folded = HostInputs {
            tau: Some(t.iter().map(|&v| v as f32).collect()),
            alpha: None,
            ..x.clone()
        };
        let want = run(s, opts, &folded);
        assert_outputs(&format!("{what}: vs folded tau"), &got, &want, (1e-5, 1e-5));
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Gate: a per-key factor on V
// ---------------------------------------------------------------------------------------------

#[test]
fn gate_equals_prescaled_values() {
    let s = shape(2, 4, 2, 6, 9, 16);
    let mut rng = Rng::new(5);
    let x = qkv(&mut rng, s);
    let (hkv, nk, d) = (2usize, 9usize, 16usize);
    let n_gate = 2 * hkv * nk;
    // Signed powers of two make g * v exact in f32, so the relation is exact; normal gates are
    // rounded once in g * v (relative 6e-8), hence the looser tolerance for them.
    let pow2: Vec<f32> = (0..n_gate)
        .map(|_| {
            let e = (rng.next_u64() % 6) as i32 - 3;
            let sign = if rng.next_u64().is_multiple_of(2) {
                1.0
            } else {
                -1.0
            };
            sign * 2f32.powi(e)
        })
        .collect();
    let normal = rng.normals(n_gate);
    for (gate, tol) in [(pow2, F64), (normal, (1e-6, 1e-6))] {
        let prescaled: Vec<f32> =
            x.v.iter()
                .enumerate()
                .map(|(e, &v)| v * gate[e / d])
                .collect();
        let gated = HostInputs {
            gate: Some(gate),
            ..x.clone()
        };
        let plain_v = HostInputs {
            v: prescaled,
            ..x.clone()
        };
        for opts in [
            Options::new(),
            Options::causal(),
            Options::causal().start(2),
        ] {
            let got = run(s, opts, &gated);
            let want = run(s, opts, &plain_v);
            assert_outputs(&format!("{opts:?}"), &got, &want, tol);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. kv_len: keys past kv_len[b] do not exist
// ---------------------------------------------------------------------------------------------

#[test]
fn kv_len_equals_truncated_keys() {
    let s = shape(3, 4, 2, 5, 14, 16);
    let mut rng = Rng::new(6);
    let x = HostInputs {
        tau: Some(rng.temperatures(3 * 4 * 5)),
        gate: Some(rng.normals(3 * 2 * 14)),
        kv_len: Some(vec![9, 14, 1]),
        ..qkv(&mut rng, s)
    };
    let got = run(s, Options::new(), &x);
    assert_no_nan("kv_len", &got);
    let per_batch = (4 * 5) as usize;
    for (b, &len) in [9usize, 14, 1].iter().enumerate() {
        let sub = batch_prefix(s, &x, b, len);
        let want = run(shape(1, 4, 2, 5, len as u32, 16), Options::new(), &sub);
        let what = format!("batch {b} kv_len {len}");
        let o = &got.o[b * per_batch * 16..][..per_batch * 16];
        let lse = &got.lse[b * per_batch..][..per_batch];
        assert_close(&format!("{what}: O"), o, &want.o, F64.0, F64.1);
        assert_close(&format!("{what}: LSE"), lse, &want.lse, F64.0, F64.1);
    }
}

#[test]
fn kv_len_zero_gives_zeros_and_neg_inf() {
    let s = shape(2, 4, 2, 6, 10, 8);
    let mut rng = Rng::new(7);
    let x = HostInputs {
        tau: Some(rng.temperatures(2 * 4 * 6)),
        alpha: Some(vec![0.2, 0.4, 0.1, 0.3]),
        gate: Some(rng.normals(2 * 2 * 10)),
        kv_len: Some(vec![0, 7]),
        f0: Some(rng.normals(2 * 10).iter().map(|f| f.abs()).collect()),
        ..qkv(&mut rng, s)
    };
    let per_batch = (4 * 6) as usize;
    for opts in [
        Options::new(),
        Options::causal(),
        Options::causal().selective(1),
    ] {
        let mut xo = x.clone();
        if opts.selective.is_none() {
            xo.f0 = None;
        }
        let got = run(s, opts, &xo);
        assert_no_nan(&format!("{opts:?}"), &got);
        assert!(
            got.o[..per_batch * 8].iter().all(|&o| o == 0.0),
            "{opts:?}: O of batch 0"
        );
        assert!(
            got.lse[..per_batch].iter().all(|&l| l == f64::NEG_INFINITY),
            "{opts:?}: LSE of batch 0"
        );
        assert!(
            got.lse[per_batch..].iter().all(|l| l.is_finite()),
            "{opts:?}: LSE of batch 1"
        );
        if opts.selective.is_some() {
            // No valid key means no query row contributes: F passes through unchanged.
            let f0: Vec<f64> = xo.f0.as_ref().unwrap()[..10]
                .iter()
                .map(|&f| f as f64)
                .collect();
            assert_close("F_out of batch 0", &got.f_out[..10], &f0, 0.0, 0.0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Rows with no allowed key
// ---------------------------------------------------------------------------------------------

#[test]
fn rows_without_allowed_key_are_zero_with_neg_inf_lse() {
    // Causal attention always allows key 0 to every row, so a row is empty exactly when its batch
    // has kv_len = 0; rows past kv_len still see every valid key and must be finite.
    let s = shape(3, 2, 2, 8, 8, 16);
    let mut rng = Rng::new(8);
    let x = HostInputs {
        kv_len: Some(vec![3, 0, 1]),
        ..qkv(&mut rng, s)
    };
    let got = run(s, Options::causal(), &x);
    assert_no_nan("causal kv_len", &got);
    let (o, lse) = Plain::new(s, true, &x).run();
    assert_close("O", &got.o, &o, F64.0, F64.1);
    assert_close("LSE", &got.lse, &lse, F64.0, F64.1);
    for (r, &l) in got.lse.iter().enumerate() {
        let empty = r / 16 == 1;
        assert_eq!(l == f64::NEG_INFINITY, empty, "LSE row {r} = {l}");
    }
    assert!(got.o[2 * 8 * 16..][..2 * 8 * 16].iter().all(|&o| o == 0.0));

    // A row at or past kv_len - 1 sees exactly the valid keys: it equals non-causal attention
    // over the first kv_len keys.
    let sub = batch_prefix(s, &x, 0, 3);
    let want = run(shape(1, 2, 2, 8, 3, 16), Options::new(), &sub);
    for h in 0..2 {
        for i in 2..8 {
            let r = h * 8 + i;
            let what = format!("batch 0 head {h} row {i}");
            assert_close(
                &what,
                &got.o[r * 16..][..16],
                &want.o[r * 16..][..16],
                F64.0,
                F64.1,
            );
            assert_close(&what, &got.lse[r..][..1], &want.lse[r..][..1], F64.0, F64.1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Selective masking against a brute-force S and F
// ---------------------------------------------------------------------------------------------

#[test]
fn selective_matches_brute_force_f() {
    // (B, Hq, Hkv, Nq, Nk, D, sel, start): self-attention, GQA with the selection head in the
    // second KV group, Nq < Nk with default and explicit start, Nq = 1 (decode).
    let cases = [
        (2, 2, 2, 13, 13, 8, 0, None),
        (2, 4, 1, 11, 11, 16, 3, None),
        (1, 8, 2, 7, 16, 16, 5, None),
        (2, 4, 2, 6, 19, 8, 1, Some(5)),
        (2, 4, 2, 1, 12, 16, 2, None),
    ];
    let mut rng = Rng::new(9);
    for (b, hq, hkv, nq, nk, d, sel, start) in cases {
        let s = shape(b, hq, hkv, nq, nk, d);
        let p0 = start.unwrap_or(nk - nq) as usize;
        let mut opts = Options::causal().selective(sel);
        if let Some(st) = start {
            opts = opts.start(st);
        }
        let base = qkv(&mut rng, s);
        let n_rows = (b * hq * nq) as usize;
        let with_all = HostInputs {
            tau: Some(rng.temperatures(n_rows)),
            alpha: Some((0..hq).map(|h| 0.1 * h as f32).collect()),
            f0: Some(
                rng.normals((b * nk) as usize)
                    .iter()
                    .map(|f| f.abs())
                    .collect(),
            ),
            kv_len: Some((0..b).map(|i| nk - 2 * i).collect()),
            ..base.clone()
        };
        for x in [base, with_all] {
            let what = format!("{s:?} sel {sel} start {start:?} tau {}", x.tau.is_some());
            let got = run(s, opts, &x);
            assert_no_nan(&what, &got);
            let scale = default_scale(d);
            let (f, f_out) = brute_force_f(s, scale, p0, sel as usize, &x);
            assert_close(&format!("{what}: F_out"), &got.f_out, &f_out, F64.0, F64.1);

            // z = t l - F on every head, then plain causal softmax.
            let t = temperatures(s, p0, &x);
            let mut plain = Plain::new(s, true, &x);
            plain.start = p0;
            plain.temp = Some(&t);
            plain.bias = Some(&f);
            let (o, lse) = plain.run();
            assert_close(&format!("{what}: O"), &got.o, &o, F64.0, F64.1);
            assert_close(&format!("{what}: LSE"), &got.lse, &lse, F64.0, F64.1);
        }
    }
}

#[test]
fn selective_never_penalises_first_token_and_f_out_is_column_sums() {
    // Selection head with q and k all positive, so every S_kj the rules allow is strictly positive:
    // exactly the allowed columns grow and the first and last keys do not.
    let s = shape(2, 4, 2, 10, 10, 8);
    let mut rng = Rng::new(10);
    let mut x = qkv(&mut rng, s);
    let (hq, hkv, n, d) = (4usize, 2usize, 10usize, 8usize);
    let sel = 2usize;
    for b in 0..2 {
        for e in &mut x.q[(b * hq + sel) * n * d..][..n * d] {
            *e = e.abs() + 0.1;
        }
        for e in &mut x.k[(b * hkv + sel / 2) * n * d..][..n * d] {
            *e = e.abs() + 0.1;
        }
    }
    let f0: Vec<f32> = rng.normals(2 * n).iter().map(|f| f.abs()).collect();
    let with_f0 = HostInputs {
        f0: Some(f0.clone()),
        ..x.clone()
    };
    let plain = run(s, Options::causal().selective(sel as u32), &x);
    let carried = run(s, Options::causal().selective(sel as u32), &with_f0);
    for b in 0..2 {
        let row = &plain.f_out[b * n..][..n];
        assert_eq!(row[0], 0.0, "batch {b}: key 0 penalised");
        assert_eq!(
            row[n - 1],
            0.0,
            "batch {b}: newest key penalised (no later row)"
        );
        assert!(row[1..n - 1].iter().all(|&f| f > 0.0), "batch {b}: {row:?}");
        // F_out with F0 is F0 plus the same column sums.
        for j in 0..n {
            let want = f0[b * n + j] as f64 + row[j];
            assert!(
                (carried.f_out[b * n + j] - want).abs() <= 1e-12 * want.abs(),
                "batch {b} key {j}: F_out {} vs F0 + sums {want}",
                carried.f_out[b * n + j]
            );
        }
    }
    // The penalties are large here, so they must reach the output.
    let no_sel = run(s, Options::causal(), &x);
    assert_ne!(plain.o, no_sel.o, "selective masking changed nothing");
}

// ---------------------------------------------------------------------------------------------
// 7. Chunked prefill threads F and equals the whole sequence
// ---------------------------------------------------------------------------------------------

/// Runs a causal selective sequence whole and in chunks `bounds` (query rows [s, e) against the
/// first e keys, F0 = previous F_out widened with zeros), and returns (whole, chunks glued).
fn whole_and_chunked(
    s: Shape,
    sel: u32,
    x: &HostInputs,
    bounds: &[usize],
) -> (HostOutputs, HostOutputs) {
    let whole = run(s, Options::causal().selective(sel), x);
    let (bn, hq, hkv) = (s.batch as usize, s.q_heads as usize, s.kv_heads as usize);
    let (n, d) = (s.k_len as usize, s.head_dim as usize);
    let mut glued = HostOutputs {
        o: vec![0.0; whole.o.len()],
        lse: vec![0.0; whole.lse.len()],
        f_out: Vec::new(),
    };
    let mut f_prev: Option<(Vec<f64>, usize)> = None;
    for w in bounds.windows(2) {
        let (st, en) = (w[0], w[1]);
        let cs = shape(
            s.batch,
            s.q_heads,
            s.kv_heads,
            (en - st) as u32,
            en as u32,
            s.head_dim,
        );
        let chunk = HostInputs {
            q: rows(&x.q, bn * hq, n, d, st..en),
            k: rows(&x.k, bn * hkv, n, d, 0..en),
            v: rows(&x.v, bn * hkv, n, d, 0..en),
            tau: x.tau.as_ref().map(|t| rows(t, bn * hq, n, 1, st..en)),
            alpha: x.alpha.clone(),
            gate: x.gate.as_ref().map(|g| rows(g, bn * hkv, n, 1, 0..en)),
            kv_len: None,
            f0: f_prev.as_ref().map(|(f, len)| pad(f, bn, *len, en)),
        };
        let out = run(
            cs,
            Options::causal().selective(sel).start(st as u32),
            &chunk,
        );
        // Scatter this chunk's rows into the whole-sequence layout.
        for r in 0..bn * hq {
            for i in 0..en - st {
                glued.lse[r * n + st + i] = out.lse[r * (en - st) + i];
                glued.o[(r * n + st + i) * d..][..d]
                    .copy_from_slice(&out.o[(r * (en - st) + i) * d..][..d]);
            }
        }
        f_prev = Some((out.f_out, en));
    }
    glued.f_out = f_prev.map(|(f, _)| f).unwrap_or_default();
    (whole, glued)
}

#[test]
fn chunked_selective_equals_whole_sequence() {
    let s = shape(2, 4, 2, 37, 37, 16);
    let n_rows = 2 * 4 * 37;
    for (seed, sel, bounds) in [
        (11, 1u32, vec![0usize, 37]),
        (12, 1, vec![0, 13, 37]),
        (13, 3, vec![0, 5, 22, 37]),
        (14, 3, vec![0, 1, 36, 37]),
    ] {
        let mut rng = Rng::new(seed);
        // Dyadic Q and K make every S, and every partial sum of S, exact in f32, so carrying F
        // between chunks in f32 (F0's storage type) is lossless and the invariant holds to f64
        // rounding. The tolerance asked for is 1e-9 relative; this checks it.
        let x = HostInputs {
            q: rng.dyadic_normals(2 * 4 * 37 * 16),
            k: rng.dyadic_normals(2 * 2 * 37 * 16),
            v: rng.normals(2 * 2 * 37 * 16),
            tau: Some(rng.temperatures(n_rows)),
            alpha: Some(vec![0.3, 0.05, 0.2, 0.5]),
            gate: Some(rng.normals(2 * 2 * 37)),
            ..HostInputs::default()
        };
        let (whole, chunked) = whole_and_chunked(s, sel, &x, &bounds);
        assert_no_nan("whole", &whole);
        assert!(whole.f_out.iter().any(|&f| f > 1.0), "F stayed near zero");
        assert_outputs(
            &format!("sel {sel} chunks {bounds:?}"),
            &chunked,
            &whole,
            (1e-12, 1e-9),
        );
    }
}

#[test]
fn chunked_selective_with_normal_inputs_agrees_to_f32_state_rounding() {
    // With general normals F is rounded to f32 when carried between chunks (relative 6e-8 of F,
    // F < 100 here), which moves logits by < 1e-5; 1e-4 leaves room, and a chunk that dropped or
    // double-counted its F0 would be off by O(1).
    let s = shape(2, 4, 2, 37, 37, 16);
    let mut rng = Rng::new(15);
    let x = HostInputs {
        tau: Some(rng.temperatures(2 * 4 * 37)),
        alpha: Some(vec![0.3, 0.05, 0.2, 0.5]),
        gate: Some(rng.normals(2 * 2 * 37)),
        ..qkv(&mut rng, s)
    };
    let (whole, chunked) = whole_and_chunked(s, 3, &x, &[0, 9, 25, 37]);
    assert_outputs("normal inputs", &chunked, &whole, (1e-4, 1e-4));
}

// ---------------------------------------------------------------------------------------------
// 8. Invalid calls return typed errors
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_calls_return_typed_errors() {
    let s = shape(2, 4, 2, 5, 8, 16);
    let x = qkv(&mut Rng::new(16), s);
    let call = |s: Shape, o: Options, x: &HostInputs| attention(&spec(s, o, x), x).err();
    let mismatch = |what: &'static str, expected: u64, got: u64| {
        Some(Error::LengthMismatch {
            what,
            expected,
            got,
        })
    };
    let with = |f: &dyn Fn(&mut HostInputs)| {
        let mut y = x.clone();
        f(&mut y);
        y
    };

    // Sizes.
    assert_eq!(call(s, Options::new(), &x), None, "the valid call itself");
    for (what, bad) in [
        ("batch", Shape { batch: 0, ..s }),
        ("q_heads", Shape { q_heads: 0, ..s }),
        ("kv_heads", Shape { kv_heads: 0, ..s }),
        ("q_len", Shape { q_len: 0, ..s }),
        ("k_len", Shape { k_len: 0, ..s }),
        ("head_dim", Shape { head_dim: 0, ..s }),
    ] {
        assert_eq!(
            call(bad, Options::new(), &x),
            Some(Error::ZeroSize { what })
        );
    }
    for d in [12, 264] {
        let got = call(Shape { head_dim: d, ..s }, Options::new(), &x);
        assert!(
            matches!(got, Some(Error::HeadDimUnsupported { got: g, .. }) if g == d),
            "{got:?}"
        );
    }
    assert_eq!(
        call(Shape { kv_heads: 3, ..s }, Options::new(), &x),
        Some(Error::HeadsNotMultiple {
            q_heads: 4,
            kv_heads: 3
        })
    );

    // Options.
    for bad in [0.0f32, -1.0, f32::INFINITY, f32::NAN] {
        let got = call(s, Options::new().scale(bad), &x);
        assert!(
            matches!(got, Some(Error::BadScale { scale }) if scale.to_bits() == bad.to_bits()),
            "scale {bad}: {got:?}"
        );
    }
    assert_eq!(
        call(s, Options::causal().start(4), &x),
        Some(Error::StartOutOfRange {
            start: 4,
            queries: 5,
            keys: 8
        })
    );
    assert_eq!(
        call(s, Options::causal().start(3), &x),
        None,
        "start + Nq = Nk is fine"
    );
    assert_eq!(
        call(s, Options::new().start(100), &x),
        None,
        "non-causal may start anywhere"
    );
    assert_eq!(
        call(s.with_q_len(9), Options::causal(), &x),
        Some(Error::StartOutOfRange {
            start: 0,
            queries: 9,
            keys: 8
        }),
        "causal with Nq > Nk"
    );
    assert!(matches!(
        call(s, Options::new().start(u32::MAX / 2), &x),
        Some(Error::CountTooLarge {
            what: "query positions (start + Nq)",
            ..
        })
    ));
    assert_eq!(
        call(s, Options::new().selective(0), &x),
        Some(Error::SelectiveNeedsCausal)
    );
    assert_eq!(
        call(s, Options::causal().selective(4), &x),
        Some(Error::SelectionHeadOutOfRange {
            head: 4,
            q_heads: 4
        })
    );
    let f0 = with(&|y| y.f0 = Some(vec![0.0; 16]));
    assert!(matches!(
        call(s, Options::causal(), &f0),
        Some(Error::InputWithoutUse { what: "F0", .. })
    ));
    let f_out = Spec {
        present: selattn::Switches {
            f_out: true,
            ..x.present(false)
        },
        ..spec(s, Options::causal(), &x)
    };
    assert!(matches!(
        attention(&f_out, &x).err(),
        Some(Error::InputWithoutUse { what: "F_out", .. })
    ));

    // Input lengths: q [2,4,5,16] = 640, k and v [2,2,8,16] = 512, rows [2,4,5] = 40, alpha [4],
    // gate [2,2,8] = 32, F0 [2,8] = 16, kv_len [2].
    let sel = Options::causal().selective(0);
    let cases: [(&str, Options, HostInputs, Option<Error>); 8] = [
        (
            "q",
            Options::new(),
            with(&|y| {
                y.q.pop();
            }),
            mismatch("q", 640, 639),
        ),
        (
            "k",
            Options::new(),
            with(&|y| y.k.push(0.0)),
            mismatch("k", 512, 513),
        ),
        (
            "v",
            Options::new(),
            with(&|y| y.v.clear()),
            mismatch("v", 512, 0),
        ),
        (
            "tau",
            Options::new(),
            with(&|y| y.tau = Some(vec![1.0; 20])),
            mismatch("tau", 40, 20),
        ),
        (
            "alpha",
            Options::new(),
            with(&|y| y.alpha = Some(vec![0.1; 2])),
            mismatch("alpha", 4, 2),
        ),
        (
            "gate",
            Options::new(),
            with(&|y| y.gate = Some(vec![1.0; 40])),
            mismatch("gate", 32, 40),
        ),
        (
            "f0",
            sel,
            with(&|y| y.f0 = Some(vec![0.0; 8])),
            mismatch("f0", 16, 8),
        ),
        (
            "kv_len",
            Options::new(),
            with(&|y| y.kv_len = Some(vec![8])),
            mismatch("kv_len", 2, 1),
        ),
    ];
    for (what, o, y, want) in cases {
        assert_eq!(call(s, o, &y), want, "{what}");
    }
    assert_eq!(
        call(s, Options::new(), &with(&|y| y.kv_len = Some(vec![8, 9]))),
        Some(Error::KvLenTooLarge {
            batch: 1,
            kv_len: 9,
            keys: 8
        })
    );
    assert_eq!(
        call(s, Options::new(), &with(&|y| y.kv_len = Some(vec![0, 8]))),
        None,
        "kv_len 0 and Nk are valid"
    );
}
