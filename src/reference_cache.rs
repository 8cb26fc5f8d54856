//! The CPU reference of the KV cache, decode steps and context pruning, in f64, step by step.
//!
//! It keeps the same slots as [`crate::KvCache`]: occupied slots are `0..len`; a new token goes to
//! slot `len` until the sequence reaches its limit; after that, before each new token is written,
//! the victim is the occupied slot with the largest F, never position 0 and never the newest
//! token in the cache, ties to the oldest position. A decode step appends its tokens, then its
//! queries attend (DESIGN.md §1 over the occupied slots, by absolute position), then F is updated.

use crate::cache::KvCacheConfig;
use crate::reference::{dot, temperature};
use crate::{Error, Result};

/// One occupied slot.
#[derive(Clone, Debug, PartialEq)]
pub struct RefSlot {
    /// Absolute position of the token.
    pub pos: u64,
    /// Key per KV head `[Hkv, D]`.
    pub k: Vec<f32>,
    /// Value per KV head `[Hkv, D]`.
    pub v: Vec<f32>,
    /// Gate per KV head `[Hkv]` (1 without gates).
    pub gate: Vec<f32>,
    /// Selective state.
    pub f: f64,
}

/// One sequence of the reference cache.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RefSeq {
    /// Occupied slots, by slot index.
    pub slots: Vec<RefSlot>,
    /// Position of the next token.
    pub next_pos: u64,
    /// Tokens evicted so far.
    pub evictions: u64,
}

/// New tokens, host-side, in the GPU layout: K and V `[B, Hkv, n, D]`, gate `[B, Hkv, n]`,
/// F `[B, n]`.
#[derive(Clone, Debug, Default)]
pub struct HostTokens {
    /// Tokens per sequence in the tensors (n).
    pub n: usize,
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
    /// Gates.
    pub gate: Option<Vec<f32>>,
    /// Selective state of the new tokens.
    pub f: Option<Vec<f32>>,
}

/// Queries of one decode step, host-side: Q `[B, Hq, n, D]`, tau `[B, Hq, n]`, alpha `[Hq]`.
#[derive(Clone, Debug, Default)]
pub struct HostQueries {
    /// Query heads.
    pub q_heads: usize,
    /// Queries.
    pub q: Vec<f32>,
    /// Per-query temperature.
    pub tau: Option<Vec<f32>>,
    /// Positional-temperature coefficient.
    pub alpha: Option<Vec<f32>>,
}

/// Outputs of one reference decode step, f64: O `[B, Hq, n, D]`, LSE `[B, Hq, n]`.
#[derive(Clone, Debug, Default)]
pub struct StepOut {
    /// O.
    pub o: Vec<f64>,
    /// LSE, natural log.
    pub lse: Vec<f64>,
}

/// The reference cache.
#[derive(Clone, Debug)]
pub struct RefCache {
    /// Configuration (capacity, budget, sizes).
    pub cfg: KvCacheConfig,
    /// Sequences.
    pub seqs: Vec<RefSeq>,
}

impl RefCache {
    /// An empty cache.
    pub fn new(cfg: KvCacheConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(RefCache {
            cfg,
            seqs: vec![RefSeq::default(); cfg.batch as usize],
        })
    }

    /// The slot to evict before writing the next token of sequence `b`: largest F, not position
    /// 0, not the newest token; ties to the oldest position.
    pub fn victim(&self, b: usize) -> Option<usize> {
        let seq = &self.seqs[b];
        let newest = seq.next_pos.checked_sub(1);
        let mut best: Option<usize> = None;
        for (j, s) in seq.slots.iter().enumerate() {
            if s.pos == 0 || Some(s.pos) == newest {
                continue;
            }
            best = match best {
                None => Some(j),
                Some(bj) => {
                    let o = &seq.slots[bj];
                    if s.f > o.f || (s.f == o.f && s.pos < o.pos) {
                        Some(j)
                    } else {
                        Some(bj)
                    }
                }
            };
        }
        best
    }

    /// Truncates sequence `b` back to its tokens at positions `0..len` (the slots of later
    /// tokens are dropped; F of the kept ones is left as it is).
    pub fn truncate(&mut self, b: usize, len: u64) {
        let seq = &mut self.seqs[b];
        seq.slots.retain(|s| s.pos < len);
        seq.next_pos = seq.next_pos.min(len);
    }

    /// Appends `counts[b]` tokens (all n when `None`) to each sequence, one at a time, evicting
    /// over the limit.
    pub fn append(&mut self, t: &HostTokens, counts: Option<&[u32]>) -> Result<()> {
        let (bn, hkv, d) = (
            self.cfg.batch as usize,
            self.cfg.kv_heads as usize,
            self.cfg.head_dim as usize,
        );
        let n = t.n;
        let limit = self.cfg.limit() as usize;
        for b in 0..bn {
            let count = counts.map_or(n, |c| c[b] as usize);
            if self.cfg.budget.is_none() && self.seqs[b].slots.len() + count > limit {
                return Err(Error::CacheFull {
                    batch: b as u32,
                    len: self.seqs[b].slots.len() as u32,
                    adding: count as u32,
                    capacity: self.cfg.capacity,
                });
            }
            for i in 0..count {
                let slot = RefSlot {
                    pos: self.seqs[b].next_pos,
                    k: (0..hkv)
                        .flat_map(|h| t.k[((b * hkv + h) * n + i) * d..][..d].iter().copied())
                        .collect(),
                    v: (0..hkv)
                        .flat_map(|h| t.v[((b * hkv + h) * n + i) * d..][..d].iter().copied())
                        .collect(),
                    gate: (0..hkv)
                        .map(|h| t.gate.as_ref().map_or(1.0, |g| g[(b * hkv + h) * n + i]))
                        .collect(),
                    f: t.f.as_ref().map_or(0.0, |f| f[b * n + i] as f64),
                };
                if self.seqs[b].slots.len() < limit {
                    self.seqs[b].slots.push(slot);
                } else {
                    let j = self.victim(b).ok_or(Error::BadBudget {
                        budget: limit as u32,
                        min: crate::cache::MIN_BUDGET,
                        max: self.cfg.capacity,
                    })?;
                    self.seqs[b].slots[j] = slot;
                    self.seqs[b].evictions += 1;
                }
                self.seqs[b].next_pos += 1;
            }
        }
        Ok(())
    }

    // Long on purpose: append, attend and the F update of one step, written as the formulas in
    // the order the GPU step performs them.
    /// One decode step: appends the n new tokens of every sequence, runs their n queries over
    /// the occupied slots, then adds the step's selective scores to F.
    pub fn step(
        &mut self,
        x: &HostQueries,
        t: &HostTokens,
        scale: Option<f32>,
        selective: Option<u32>,
    ) -> Result<StepOut> {
        self.step_counts(x, t, None, scale, selective)
    }

    /// [`RefCache::step`] with `counts[b]` new tokens and queries for sequence b (all n when
    /// `None`); the other query rows of the sequence get O = 0 and LSE = -inf.
    pub fn step_counts(
        &mut self,
        x: &HostQueries,
        t: &HostTokens,
        counts: Option<&[u32]>,
        scale: Option<f32>,
        selective: Option<u32>,
    ) -> Result<StepOut> {
        let (bn, hkv, d) = (
            self.cfg.batch as usize,
            self.cfg.kv_heads as usize,
            self.cfg.head_dim as usize,
        );
        let (hq, n) = (x.q_heads, t.n);
        let group = hq / hkv;
        let scale = scale.unwrap_or(1.0 / (d as f32).sqrt()) as f64;
        let starts: Vec<u64> = self.seqs.iter().map(|s| s.next_pos).collect();
        // 1. append
        self.append(t, counts)?;
        let mut out = StepOut {
            o: vec![0.0; bn * hq * n * d],
            lse: vec![f64::NEG_INFINITY; bn * hq * n],
        };
        let q_row = |b: usize, h: usize, i: usize| &x.q[((b * hq + h) * n + i) * d..][..d];
        for (b, seq) in self.seqs.iter_mut().enumerate() {
            let pos = |i: usize| starts[b] + i as u64;
            // Queries past the sequence's count do not run.
            let cnt = counts.map_or(n, |c| c[b] as usize);
            // 2. S[k][j] = relu(scale q_sel_k . k_sel_j) for 0 < pos_j < p_k
            let s_mat: Vec<Vec<f64>> = (0..cnt)
                .map(|k| {
                    seq.slots
                        .iter()
                        .map(|sl| match selective {
                            Some(sel) if sl.pos > 0 && sl.pos < pos(k) => {
                                let sel_kv = sel as usize / group;
                                let ks = &sl.k[sel_kv * d..][..d];
                                (scale * dot(q_row(b, sel as usize, k), ks)).max(0.0)
                            }
                            _ => 0.0,
                        })
                        .collect()
                })
                .collect();
            for h in 0..hq {
                let hk = h / group;
                for i in 0..cnt {
                    // 3. temperature
                    let temp = temperature(
                        x.tau.as_deref(),
                        x.alpha.as_deref(),
                        (b * hq + h) * n + i,
                        h,
                        pos(i) as usize,
                    );
                    // 4. logits over occupied slots at or before the query's position
                    let z: Vec<Option<f64>> = seq
                        .slots
                        .iter()
                        .enumerate()
                        .map(|(j, sl)| {
                            (sl.pos <= pos(i)).then(|| {
                                let l = scale * dot(q_row(b, h, i), &sl.k[hk * d..][..d]);
                                let f = if selective.is_some() {
                                    sl.f + (0..i).map(|k| s_mat[k][j]).sum::<f64>()
                                } else {
                                    0.0
                                };
                                temp * l - f
                            })
                        })
                        .collect();
                    // 5. softmax, gated values
                    let m = z.iter().flatten().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
                    if m == f64::NEG_INFINITY {
                        continue;
                    }
                    let sum: f64 = z.iter().flatten().map(|&v| (v - m).exp()).sum();
                    out.lse[(b * hq + h) * n + i] = m + sum.ln();
                    let o = &mut out.o[((b * hq + h) * n + i) * d..][..d];
                    for (j, zj) in z.iter().enumerate() {
                        let Some(zj) = zj else { continue };
                        let p = (zj - m).exp() / sum;
                        let sl = &seq.slots[j];
                        let g = sl.gate[hk] as f64;
                        for (od, &vd) in o.iter_mut().zip(&sl.v[hk * d..][..d]) {
                            *od += p * g * vd as f64;
                        }
                    }
                }
            }
            // 6. F += every query's score
            for (j, sl) in seq.slots.iter_mut().enumerate() {
                sl.f += (0..cnt).map(|k| s_mat[k][j]).sum::<f64>();
            }
        }
        Ok(out)
    }
}
