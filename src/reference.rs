//! The exact CPU reference: DESIGN.md §1 in f64, written as the formulas, step by step.
//!
//! This is the oracle every kernel is tested against, so it is deliberately plain: no tiling, no
//! online softmax, no cleverness. It takes f32 inputs (what the GPU stores) and computes in f64.

use crate::spec::{check_kv_len, numel, Resolved, Spec};
use crate::{Error, Result};

/// Host-side inputs of one call, f32 row-major as on the GPU.
#[derive(Clone, Debug, Default)]
pub struct HostInputs {
    /// Q `[B, Hq, Nq, D]`.
    pub q: Vec<f32>,
    /// K `[B, Hkv, Nk, D]`.
    pub k: Vec<f32>,
    /// V `[B, Hkv, Nk, D]`.
    pub v: Vec<f32>,
    /// Per-query temperature `[B, Hq, Nq]`.
    pub tau: Option<Vec<f32>>,
    /// Positional-temperature coefficient `[Hq]`.
    pub alpha: Option<Vec<f32>>,
    /// Per-key value gate `[B, Hkv, Nk]`.
    pub gate: Option<Vec<f32>>,
    /// Valid keys per batch element `[B]`.
    pub kv_len: Option<Vec<u32>>,
    /// Selective state carried in `[B, Nk]`.
    pub f0: Option<Vec<f32>>,
}

/// Outputs of the reference, in f64.
#[derive(Clone, Debug, Default)]
pub struct HostOutputs {
    /// O `[B, Hq, Nq, D]`.
    pub o: Vec<f64>,
    /// LSE `[B, Hq, Nq]`, natural log; `-inf` for rows with no allowed key.
    pub lse: Vec<f64>,
    /// F_out `[B, Nk]` when selective masking is on, else empty.
    pub f_out: Vec<f64>,
}

impl HostInputs {
    /// Which optional inputs are present (outputs LSE and F_out are marked wanted). `causal`
    /// is set with `selective`; in a [`Spec`] both are decided by its options.
    pub fn present(&self, selective: bool) -> crate::spec::Switches {
        crate::spec::Switches {
            causal: selective,
            selective,
            tau: self.tau.is_some(),
            alpha: self.alpha.is_some(),
            gate: self.gate.is_some(),
            kv_len: self.kv_len.is_some(),
            f0: self.f0.is_some(),
            lse: true,
            f_out: selective,
        }
    }

    /// Checks every length against the shape.
    pub fn check(&self, r: &Resolved) -> Result<()> {
        let s = &r.shape;
        let len = |what: &'static str, got: usize, dims: Vec<u64>| {
            let expected = numel(&dims);
            if got as u64 != expected {
                Err(Error::LengthMismatch {
                    what,
                    expected,
                    got: got as u64,
                })
            } else {
                Ok(())
            }
        };
        len("q", self.q.len(), s.q_dims())?;
        len("k", self.k.len(), s.kv_dims())?;
        len("v", self.v.len(), s.kv_dims())?;
        if let Some(t) = &self.tau {
            len("tau", t.len(), s.row_dims())?;
        }
        if let Some(a) = &self.alpha {
            len("alpha", a.len(), s.alpha_dims())?;
        }
        if let Some(g) = &self.gate {
            len("gate", g.len(), s.gate_dims())?;
        }
        if let Some(f) = &self.f0 {
            len("f0", f.len(), s.f_dims())?;
        }
        if let Some(l) = &self.kv_len {
            check_kv_len(l, s)?;
        }
        Ok(())
    }
}

/// Temperature of one query row: `tau[row]` (or 1) plus `alpha[h]·ln(pos + 1)` (when alpha is
/// given). Shared with the KV-cache reference.
pub(crate) fn temperature(
    tau: Option<&[f32]>,
    alpha: Option<&[f32]>,
    row: usize,
    h: usize,
    pos: usize,
) -> f64 {
    let t = tau.map_or(1.0, |t| t[row] as f64);
    t + alpha.map_or(0.0, |a| a[h] as f64 * ((pos + 1) as f64).ln())
}

/// The shape as host indices, and the row accessors both references read tensors through.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub bn: usize,
    pub hq: usize,
    pub hkv: usize,
    pub nq: usize,
    pub nk: usize,
    pub d: usize,
    /// Query heads per KV head.
    pub group: usize,
}

impl Dims {
    pub(crate) fn of(s: &crate::spec::Shape) -> Self {
        let (hq, hkv) = (s.q_heads as usize, s.kv_heads as usize);
        Dims {
            bn: s.batch as usize,
            hq,
            hkv,
            nq: s.q_len as usize,
            nk: s.k_len as usize,
            d: s.head_dim as usize,
            group: hq / hkv,
        }
    }

    /// `(B, Hq, Hkv, Nq, Nk, D, group)`.
    pub(crate) fn sizes(&self) -> (usize, usize, usize, usize, usize, usize, usize) {
        (
            self.bn, self.hq, self.hkv, self.nq, self.nk, self.d, self.group,
        )
    }

    /// Row `i` of query head `h`, batch `b`, of a `[B, Hq, Nq, D]` tensor (Q, O, dO).
    pub(crate) fn q_row<'a>(&self, t: &'a [f32], b: usize, h: usize, i: usize) -> &'a [f32] {
        &t[((b * self.hq + h) * self.nq + i) * self.d..][..self.d]
    }

    /// Row `j` of KV head `h`, batch `b`, of a `[B, Hkv, Nk, D]` tensor (K, V).
    pub(crate) fn kv_row<'a>(&self, t: &'a [f32], b: usize, h: usize, j: usize) -> &'a [f32] {
        &t[((b * self.hkv + h) * self.nk + j) * self.d..][..self.d]
    }
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

// Long on purpose: the oracle is written as the formulas of DESIGN.md §1, pass by pass, so it
// can be read against them line for line (house style: no cleverness in the reference).
/// Runs the operator of DESIGN.md §1 on the CPU in f64.
pub fn attention(spec: &Spec, x: &HostInputs) -> Result<HostOutputs> {
    attention_keys(spec, x, 0..usize::MAX)
}

/// The operator of DESIGN.md §1 restricted to the keys `keys` (a key shard): O and LSE are those
/// of the softmax over the allowed keys in the range only (O = 0, LSE = -inf for a row with
/// none there); everything else — positions, masks, temperature, the selective state F built
/// from every key's scores, F_out — is exactly as in [`attention`]. Merging the shards of a
/// partition of the keys ([`crate::merge_partials_reference`]) gives [`attention`]'s O and LSE.
pub fn attention_keys(
    spec: &Spec,
    x: &HostInputs,
    keys: std::ops::Range<usize>,
) -> Result<HostOutputs> {
    let r = spec.validate()?;
    x.check(&r)?;
    // The oracle must never silently run with other inputs than the spec says.
    let p = spec.present;
    for (what, said, given) in [
        ("tau", p.tau, x.tau.is_some()),
        ("alpha", p.alpha, x.alpha.is_some()),
        ("gate", p.gate, x.gate.is_some()),
        ("kv_len", p.kv_len, x.kv_len.is_some()),
        ("f0", p.f0, x.f0.is_some()),
    ] {
        if said != given {
            return Err(Error::PresenceMismatch { what, said, given });
        }
    }
    let dm = Dims::of(&r.shape);
    let (bn, hq, hkv, nq, nk, d, group) = dm.sizes();
    let scale = r.scale as f64;
    let start = r.start as usize;
    let causal = r.options.causal;
    let q_row = |b: usize, h: usize, i: usize| dm.q_row(&x.q, b, h, i);
    let k_row = |b: usize, h: usize, j: usize| dm.kv_row(&x.k, b, h, j);
    let v_row = |b: usize, h: usize, j: usize| dm.kv_row(&x.v, b, h, j);

    let mut out = HostOutputs {
        o: vec![0.0; bn * hq * nq * d],
        lse: vec![f64::NEG_INFINITY; bn * hq * nq],
        f_out: Vec::new(),
    };
    if r.selective() {
        out.f_out = vec![0.0; bn * nk];
    }

    for b in 0..bn {
        let valid = x.kv_len.as_ref().map_or(nk, |l| l[b] as usize);
        let pos = |i: usize| start + i;
        let allowed =
            |i: usize, j: usize| j < valid && (!causal || j <= pos(i)) && keys.contains(&j);

        // Selective masking: S[k][j] from the selection head, then F[i][j] as a prefix over rows.
        let f = r.options.selective.map(|sel| {
            let sel = sel as usize;
            let sel_kv = sel / group;
            let f0 = |j: usize| x.f0.as_ref().map_or(0.0, |f| f[b * nk + j] as f64);
            // S_kj = relu(scale * q_sel_k . k_sel_j) for 0 < j < p_k; zero for padding (j, p_k >= kv_len).
            let mut s_mat = vec![vec![0.0f64; nk]; nq];
            for (k, row) in s_mat.iter_mut().enumerate() {
                if pos(k) >= valid {
                    continue;
                }
                for (j, sv) in row.iter_mut().enumerate().take(pos(k)).skip(1) {
                    *sv = (scale * dot(q_row(b, sel, k), k_row(b, sel_kv, j))).max(0.0);
                }
            }
            // F_ij = F0_j + sum over rows k with p_k < p_i of S_kj.
            let mut f = vec![vec![0.0f64; nk]; nq];
            for (i, frow) in f.iter_mut().enumerate() {
                for (j, fij) in frow.iter_mut().enumerate() {
                    let mut acc = f0(j);
                    for (k, srow) in s_mat.iter().enumerate() {
                        if pos(k) < pos(i) {
                            acc += srow[j];
                        }
                    }
                    *fij = acc;
                }
            }
            // F_out_j = F0_j + sum over all rows of S_kj.
            for j in 0..nk {
                out.f_out[b * nk + j] = f0(j) + s_mat.iter().map(|row| row[j]).sum::<f64>();
            }
            f
        });

        for h in 0..hq {
            let hk = h / group;
            for i in 0..nq {
                // 1. temperature of this row
                let t = temperature(
                    x.tau.as_deref(),
                    x.alpha.as_deref(),
                    (b * hq + h) * nq + i,
                    h,
                    pos(i),
                );
                // 2. logits z_ij over allowed keys
                let z: Vec<Option<f64>> = (0..nk)
                    .map(|j| {
                        allowed(i, j).then(|| {
                            let l = scale * dot(q_row(b, h, i), k_row(b, hk, j));
                            let fij = f.as_ref().map_or(0.0, |f| f[i][j]);
                            t * l - fij
                        })
                    })
                    .collect();
                // 3. max, 4. exp-sum
                let m = z.iter().flatten().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                if m == f64::NEG_INFINITY {
                    continue; // no allowed key: O = 0, LSE = -inf
                }
                let sum: f64 = z.iter().flatten().map(|&zj| (zj - m).exp()).sum();
                out.lse[(b * hq + h) * nq + i] = m + sum.ln();
                // 5. normalise and weight the gated values
                let o = &mut out.o[((b * hq + h) * nq + i) * d..][..d];
                for (j, zj) in z.iter().enumerate() {
                    let Some(zj) = zj else { continue };
                    let p = (zj - m).exp() / sum;
                    let g = x
                        .gate
                        .as_ref()
                        .map_or(1.0, |g| g[(b * hkv + hk) * nk + j] as f64);
                    for (od, &vd) in o.iter_mut().zip(v_row(b, hk, j)) {
                        *od += p * g * vd as f64;
                    }
                }
            }
        }
    }
    Ok(out)
}
