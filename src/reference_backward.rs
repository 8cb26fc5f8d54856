//! The exact CPU reference of the backward pass: DESIGN.md §1b in f64, written as the formulas.
//!
//! Like [`crate::reference`] it is the oracle, so it is plain: P is recomputed from the f64
//! forward's LSE, every gradient is accumulated as the formula reads, and the selective terms
//! build the full dF and dS matrices (the GPU kernels never do).

use crate::reference::{attention, dot, temperature, Dims, HostInputs};
use crate::spec::{numel, Resolved, Spec};
use crate::{Error, Result};

/// Gradients of one call, in f64, each shaped like the input it belongs to.
#[derive(Clone, Debug, Default)]
pub struct HostGrads {
    /// dQ `[B, Hq, Nq, D]`.
    pub dq: Vec<f64>,
    /// dK `[B, Hkv, Nk, D]`.
    pub dk: Vec<f64>,
    /// dV `[B, Hkv, Nk, D]`.
    pub dv: Vec<f64>,
    /// dtau `[B, Hq, Nq]`: the gradient of the per-query temperature (also defined where tau is
    /// absent, at tau = 1).
    pub dtau: Vec<f64>,
    /// dalpha `[Hq]` (at alpha = 0 where alpha is absent).
    pub dalpha: Vec<f64>,
    /// dgate `[B, Hkv, Nk]` (at gate = 1 where the gate is absent).
    pub dgate: Vec<f64>,
    /// dF0 `[B, Nk]` with selective masking (at F0 = 0 where F0 is absent), else empty.
    pub df0: Vec<f64>,
}

// Long on purpose: the oracle is written as the formulas of DESIGN.md §1b, term by term, so it
// can be read against them line for line (house style: no cleverness in the reference).
/// The backward pass of [`attention`]: the gradients of `sum(dO · O) + sum(dF_out · F_out)`
/// with respect to every input. `d_o` is `[B, Hq, Nq, D]`; `df_out` `[B, Nk]` (selective
/// masking only; absent means zero).
pub fn backward(
    spec: &Spec,
    x: &HostInputs,
    d_o: &[f32],
    df_out: Option<&[f32]>,
) -> Result<HostGrads> {
    let fwd = attention(spec, x)?;
    let r = spec.validate()?;
    check_upstream(&r, d_o, df_out)?;
    let dm = Dims::of(&r.shape);
    let (bn, hq, hkv, nq, nk, d, group) = dm.sizes();
    let scale = r.scale as f64;
    let start = r.start as usize;
    let causal = r.options.causal;
    let q_row = |b: usize, h: usize, i: usize| dm.q_row(&x.q, b, h, i);
    let k_row = |b: usize, h: usize, j: usize| dm.kv_row(&x.k, b, h, j);
    let v_row = |b: usize, h: usize, j: usize| dm.kv_row(&x.v, b, h, j);
    let do_row = |b: usize, h: usize, i: usize| dm.q_row(d_o, b, h, i);

    let mut g = HostGrads {
        dq: vec![0.0; bn * hq * nq * d],
        dk: vec![0.0; bn * hkv * nk * d],
        dv: vec![0.0; bn * hkv * nk * d],
        dtau: vec![0.0; bn * hq * nq],
        dalpha: vec![0.0; hq],
        dgate: vec![0.0; bn * hkv * nk],
        df0: Vec::new(),
    };
    if r.selective() {
        g.df0 = vec![0.0; bn * nk];
    }

    for b in 0..bn {
        let valid = x.kv_len.as_ref().map_or(nk, |l| l[b] as usize);
        let pos = |i: usize| start + i;
        let allowed = |i: usize, j: usize| j < valid && (!causal || j <= pos(i));
        let sel = r.options.selective.map(|h| h as usize);
        // Selective masking, as the forward: S_kj, then F_ij as a prefix over rows.
        let (s_pre, f) = match sel {
            None => (vec![], vec![]),
            Some(sel) => {
                let f0 = |j: usize| x.f0.as_ref().map_or(0.0, |f| f[b * nk + j] as f64);
                // The pre-activation u_kj = scale q_sel_k . k_sel_j where S is not forced to 0.
                let mut u = vec![vec![None::<f64>; nk]; nq];
                for (k, row) in u.iter_mut().enumerate() {
                    if pos(k) >= valid {
                        continue;
                    }
                    for (j, uv) in row.iter_mut().enumerate().take(pos(k)).skip(1) {
                        *uv = Some(scale * dot(q_row(b, sel, k), k_row(b, sel / group, j)));
                    }
                }
                let mut f = vec![vec![0.0f64; nk]; nq];
                for (i, frow) in f.iter_mut().enumerate() {
                    for (j, fij) in frow.iter_mut().enumerate() {
                        *fij = f0(j)
                            + (0..nq)
                                .filter(|&k| pos(k) < pos(i))
                                .map(|k| u[k][j].map_or(0.0, |v| v.max(0.0)))
                                .sum::<f64>();
                    }
                }
                (u, f)
            }
        };
        // dF_ij = -sum_h dz^h_ij.
        let mut df = vec![vec![0.0f64; nk]; if sel.is_some() { nq } else { 0 }];

        for h in 0..hq {
            let hk = h / group;
            for i in 0..nq {
                let row = (b * hq + h) * nq + i;
                let lse = fwd.lse[row];
                if lse == f64::NEG_INFINITY {
                    continue; // no allowed key: every gradient of this row is 0
                }
                let t = temperature(x.tau.as_deref(), x.alpha.as_deref(), row, h, pos(i));
                let o = &fwd.o[row * d..][..d];
                let doi = do_row(b, h, i);
                // Delta_i = dot(dO_i, O_i)
                let delta: f64 = doi.iter().zip(o).map(|(&a, &b)| a as f64 * b).sum();
                let mut dt = 0.0;
                for j in 0..nk {
                    if !allowed(i, j) {
                        continue;
                    }
                    let gate = x
                        .gate
                        .as_ref()
                        .map_or(1.0, |gt| gt[(b * hkv + hk) * nk + j] as f64);
                    let l = scale * dot(q_row(b, h, i), k_row(b, hk, j));
                    let fij = if sel.is_some() { f[i][j] } else { 0.0 };
                    let p = (t * l - fij - lse).exp();
                    let dov = dot(doi, v_row(b, hk, j));
                    let dp = gate * dov;
                    let dz = p * (dp - delta);
                    let kv = (b * hkv + hk) * nk + j;
                    for (e, &od) in doi.iter().enumerate() {
                        g.dv[kv * d + e] += gate * p * od as f64;
                    }
                    g.dgate[kv] += p * dov;
                    dt += l * dz;
                    let kj = k_row(b, hk, j);
                    let qi = q_row(b, h, i);
                    for e in 0..d {
                        g.dq[row * d + e] += scale * t * dz * kj[e] as f64;
                        g.dk[kv * d + e] += scale * t * dz * qi[e] as f64;
                    }
                    if sel.is_some() {
                        df[i][j] -= dz;
                    }
                }
                g.dtau[row] = dt;
                g.dalpha[h] += ((pos(i) + 1) as f64).ln() * dt;
            }
        }

        if let Some(sel) = sel {
            let dfo = |j: usize| df_out.map_or(0.0, |f| f[b * nk + j] as f64);
            for (j, d) in g.df0[b * nk..(b + 1) * nk].iter_mut().enumerate() {
                *d = dfo(j) + df.iter().map(|row| row[j]).sum::<f64>();
            }
            let sel_kv = sel / group;
            for (k, urow) in s_pre.iter().enumerate() {
                for (j, &u) in urow.iter().enumerate() {
                    // S_kj exists only for 0 < j < p_k < kv_len (u is None elsewhere).
                    let Some(u) = u else { continue };
                    let ds = dfo(j)
                        + (0..nq)
                            .filter(|&i| pos(i) > pos(k))
                            .map(|i| df[i][j])
                            .sum::<f64>();
                    let du = if u > 0.0 { ds } else { 0.0 };
                    let qk = q_row(b, sel, k);
                    let kj = k_row(b, sel_kv, j);
                    for e in 0..d {
                        g.dq[((b * hq + sel) * nq + k) * d + e] += scale * du * kj[e] as f64;
                        g.dk[((b * hkv + sel_kv) * nk + j) * d + e] += scale * du * qk[e] as f64;
                    }
                }
            }
        }
    }
    Ok(g)
}

/// dO and dF_out must have their tensors' lengths, and dF_out needs selective masking.
fn check_upstream(r: &Resolved, d_o: &[f32], df_out: Option<&[f32]>) -> Result<()> {
    let s = r.shape;
    if d_o.len() as u64 != numel(&s.q_dims()) {
        return Err(Error::LengthMismatch {
            what: "dO",
            expected: numel(&s.q_dims()),
            got: d_o.len() as u64,
        });
    }
    if let Some(f) = df_out {
        if !r.selective() {
            return Err(Error::InputWithoutUse {
                what: "dF_out",
                why: "selective masking is off",
            });
        }
        if f.len() as u64 != numel(&s.f_dims()) {
            return Err(Error::LengthMismatch {
                what: "dF_out",
                expected: numel(&s.f_dims()),
                got: f.len() as u64,
            });
        }
    }
    Ok(())
}
