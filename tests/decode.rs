//! KV cache, decode steps and context pruning against the step-by-step CPU reference
//! (`selattn::reference_cache`), on every adapter.

mod common;
use common::*;
use selattn::reference_cache::{HostQueries, HostTokens, RefCache, RefSeq};
use selattn::{
    CacheState, Checkpoint, Context, DType, DecodeOptions, Error, KvCache, KvCacheConfig, Options,
    Outputs, Shape, Step, Tensor, Tokens,
};

/// One decode scenario: a prefill of different lengths per sequence, then steps of 1 to 8 tokens.
#[derive(Clone, Debug)]
struct Case {
    batch: u32,
    q_heads: u32,
    kv_heads: u32,
    dim: u32,
    capacity: u32,
    budget: Option<u32>,
    dtype: DType,
    gate: bool,
    tau: bool,
    alpha: bool,
    selective: Option<u32>,
    prefill: Vec<u32>,
    steps: Vec<u32>,
    splits: Option<u32>,
    threads: Option<u32>,
    rows: Option<u32>,
    /// Sequences per buffer group (the cache's buffers capped to that many sequences' K).
    group: Option<u32>,
    /// Slots per buffer (the cache's buffers capped to that many slots of one sequence's K:
    /// sequences stored in segments).
    segment: Option<u32>,
}

impl Case {
    fn new(q_heads: u32, kv_heads: u32, dim: u32) -> Case {
        Case {
            batch: 2,
            q_heads,
            kv_heads,
            dim,
            capacity: 40,
            budget: None,
            dtype: DType::F32,
            gate: false,
            tau: false,
            alpha: false,
            selective: None,
            prefill: vec![5, 9],
            steps: vec![1, 1, 3, 1, 8, 2, 1],
            splits: None,
            threads: None,
            rows: None,
            group: None,
            segment: None,
        }
    }
    fn all(mut self) -> Case {
        self.gate = true;
        self.tau = true;
        self.alpha = true;
        self
    }
    fn name(&self) -> String {
        let mut f = vec![];
        if self.gate {
            f.push("gate".to_string());
        }
        if self.tau {
            f.push("tau".into());
        }
        if self.alpha {
            f.push("alpha".into());
        }
        if let Some(s) = self.selective {
            f.push(format!("sel{s}"));
        }
        format!(
            "B{} Hq{} Hkv{} D{} C{} budget {:?} {:?} [{}] prefill {:?} steps {:?} splits {:?} threads {:?} rows {:?} group {:?} segment {:?}",
            self.batch,
            self.q_heads,
            self.kv_heads,
            self.dim,
            self.capacity,
            self.budget,
            self.dtype,
            f.join("+"),
            self.prefill,
            self.steps,
            self.splits,
            self.threads,
            self.rows,
            self.group,
            self.segment
        )
    }
    fn config(&self) -> KvCacheConfig {
        let mut c = KvCacheConfig::new(self.batch, self.kv_heads, self.dim, self.capacity)
            .dtype(self.dtype);
        if let Some(b) = self.budget {
            c = c.budget(b);
        }
        if self.gate {
            c = c.with_gate();
        }
        if let Some(g) = self.group {
            let per_seq =
                self.kv_heads as u64 * self.capacity as u64 * self.dim as u64 * self.dtype.size();
            c = c.max_buffer_bytes(g as u64 * per_seq);
        }
        if let Some(s) = self.segment {
            let per_slot = self.kv_heads as u64 * self.dim as u64 * self.dtype.size();
            c = c.max_buffer_bytes(s as u64 * per_slot);
        }
        c
    }
}

/// Rounds to what the GPU stores, so the reference sees the same values.
fn stored(x: Vec<f32>, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => x
            .into_iter()
            .map(|v| half::f16::from_f32(v).to_f32())
            .collect(),
        _ => x,
    }
}

fn up(ctx: &Context, dims: &[u64], x: &[f32], dtype: DType) -> Tensor {
    match dtype {
        DType::F16 => ctx.upload_f16(dims, x).unwrap(),
        _ => ctx.upload(dims, x).unwrap(),
    }
}

fn tokens(rng: &mut Rng, c: &Case, n: usize, with_f: bool) -> HostTokens {
    let kv = c.batch as usize * c.kv_heads as usize * n * c.dim as usize;
    HostTokens {
        n,
        k: stored(rng.normals(kv), c.dtype),
        v: stored(rng.normals(kv), c.dtype),
        gate: c
            .gate
            .then(|| rng.range(0.05, 1.0, c.batch as usize * c.kv_heads as usize * n)),
        f: with_f.then(|| rng.range(0.0, 2.0, c.batch as usize * n)),
    }
}

struct GpuTokens {
    k: Tensor,
    v: Tensor,
    gate: Option<Tensor>,
    f: Option<Tensor>,
}

fn upload_tokens(ctx: &Context, c: &Case, t: &HostTokens) -> GpuTokens {
    let (b, h, d, n) = (c.batch as u64, c.kv_heads as u64, c.dim as u64, t.n as u64);
    GpuTokens {
        k: up(ctx, &[b, h, n, d], &t.k, c.dtype),
        v: up(ctx, &[b, h, n, d], &t.v, c.dtype),
        gate: t.gate.as_ref().map(|g| ctx.upload(&[b, h, n], g).unwrap()),
        f: t.f.as_ref().map(|f| ctx.upload(&[b, n], f).unwrap()),
    }
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 5e-3,
        _ => 2e-5,
    }
}

/// Compares the GPU cache's occupied slots with the reference: same positions in the same
/// slots (so the same tokens were evicted), F within tolerance.
fn check_state(st: &CacheState, r: &RefCache, cap: usize, msgs: &mut Vec<String>, when: &str) {
    for (b, seq) in r.seqs.iter().enumerate() {
        if st.len[b] as usize != seq.slots.len() {
            msgs.push(format!(
                "{when}: seq {b} len {} vs ref {}",
                st.len[b],
                seq.slots.len()
            ));
            continue;
        }
        let pos: Vec<u64> = (0..seq.slots.len())
            .map(|j| st.pos[b * cap + j] as u64)
            .collect();
        let rpos: Vec<u64> = seq.slots.iter().map(|s| s.pos).collect();
        if pos != rpos {
            msgs.push(format!(
                "{when}: seq {b} slot positions {pos:?} vs ref {rpos:?}"
            ));
        }
        let f: Vec<f32> = (0..seq.slots.len()).map(|j| st.f[b * cap + j]).collect();
        let rf: Vec<f64> = seq.slots.iter().map(|s| s.f).collect();
        let cf = compare(&f, &rf, 1e-4, 1e-4);
        if cf.bad > 0 {
            msgs.push(format!("{when}: seq {b} F {cf:?}"));
        }
    }
}

/// One decode step of `n` tokens (`counts` per sequence, all n when `None`) on the GPU cache and
/// the reference, compared (O, LSE, slots, evictions); false when the GPU refused the step.
#[allow(clippy::too_many_arguments)]
fn one_step(
    ctx: &Context,
    c: &Case,
    cache: &mut KvCache,
    r: &mut RefCache,
    rng: &mut Rng,
    (si, n, counts, selective): (usize, u32, Option<Vec<u32>>, Option<u32>),
    msgs: &mut Vec<String>,
    outs: &mut Vec<Vec<f32>>,
) -> bool {
    let cap = c.capacity as usize;
    let (b, hq, d) = (c.batch as u64, c.q_heads as u64, c.dim as u64);
    let nn = n as usize;
    let t = tokens(rng, c, nn, false);
    let rows = (b * hq) as usize * nn;
    let x = HostQueries {
        q_heads: hq as usize,
        q: stored(rng.normals(rows * d as usize), c.dtype),
        tau: c.tau.then(|| rng.range(0.5, 1.5, rows)),
        alpha: c.alpha.then(|| rng.range(0.0, 0.3, hq as usize)),
    };
    let g = upload_tokens(ctx, c, &t);
    let q = up(ctx, &[b, hq, n as u64, d], &x.q, c.dtype);
    let tau = x
        .tau
        .as_ref()
        .map(|v| ctx.upload(&[b, hq, n as u64], v).unwrap());
    let alpha = x.alpha.as_ref().map(|v| ctx.upload(&[hq], v).unwrap());
    let o = ctx.empty(&[b, hq, n as u64, d], c.dtype).unwrap();
    let lse = ctx.empty(&[b, hq, n as u64], DType::F32).unwrap();
    ctx.poison(&o).unwrap();
    ctx.poison(&lse).unwrap();
    let positions = cache.positions().to_vec();
    let mut step = Step::new(&q, &g.k, &g.v).positions(&positions);
    if let Some(cs) = &counts {
        step = step.counts(cs);
    }
    if let Some(x) = &g.gate {
        step = step.gate(x);
    }
    if let Some(x) = &tau {
        step = step.tau(x);
    }
    if let Some(x) = &alpha {
        step = step.alpha(x);
    }
    let mut opts = DecodeOptions::new();
    opts.selective = selective;
    opts.splits = c.splits;
    opts.threads = c.threads;
    opts.rows = c.rows;
    if let Err(e) = cache.step(ctx, &step, &opts, &Outputs::new(&o).lse(&lse)) {
        msgs.push(format!("step {si}: {e}"));
        return false;
    }
    let ro = r
        .step_counts(&x, &t, counts.as_deref(), None, selective)
        .unwrap();
    let go = ctx.download(&o).unwrap();
    let gl = ctx.download(&lse).unwrap();
    let tl = tol(c.dtype);
    let co = compare(&go, &ro.o, tl, tl);
    let cl = compare(&gl, &ro.lse, 1e-4, 1e-4);
    if co.bad > 0 || co.rel_norm > tl {
        msgs.push(format!("step {si} (n {n}): O {co:?}"));
    }
    if c.dtype == DType::F16 {
        // No worse than twice the error of the reference rounded to f16.
        let rounded: Vec<f32> =
            ro.o.iter()
                .map(|&v| half::f16::from_f64(v).to_f32())
                .collect();
        let cr = compare(&rounded, &ro.o, 1.0, 1.0);
        if co.rel_norm > 2.0 * cr.rel_norm.max(1e-4) {
            msgs.push(format!(
                "step {si}: f16 O rel {:.2e} > 2 x rounding {:.2e}",
                co.rel_norm, cr.rel_norm
            ));
        }
    }
    if cl.bad > 0 {
        msgs.push(format!("step {si} (n {n}): LSE {cl:?}"));
    }
    check_state(
        &cache.download_state(ctx).unwrap(),
        r,
        cap,
        msgs,
        &format!("step {si}"),
    );
    let ev: Vec<u64> = r.seqs.iter().map(|s| s.evictions).collect();
    if cache.evictions() != ev.as_slice() {
        msgs.push(format!(
            "step {si}: evictions {:?} vs ref {ev:?}",
            cache.evictions()
        ));
    }
    outs.push(go);
    outs.push(gl);
    true
}

/// Runs a case on the GPU and the reference, step by step; returns failure lines and the
/// step outputs (for bitwise comparisons between runs).
fn run_case(ctx: &Context, c: &Case, seed: u64) -> (Vec<String>, Vec<Vec<f32>>) {
    let mut rng = Rng::new(seed);
    let mut msgs = vec![];
    let mut outs = vec![];
    let cfg = c.config();
    let mut cache = KvCache::new(ctx, cfg).unwrap();
    let mut r = RefCache::new(cfg).unwrap();
    let cap = c.capacity as usize;

    let n0 = *c.prefill.iter().max().unwrap() as usize;
    let t = tokens(&mut rng, c, n0, c.selective.is_some());
    let g = upload_tokens(ctx, c, &t);
    let mut tk = Tokens::new(&g.k, &g.v);
    if let Some(x) = &g.gate {
        tk = tk.gate(x);
    }
    if let Some(x) = &g.f {
        tk = tk.f(x);
    }
    cache.append(ctx, &tk, Some(&c.prefill)).unwrap();
    r.append(&t, Some(&c.prefill)).unwrap();
    check_state(
        &cache.download_state(ctx).unwrap(),
        &r,
        cap,
        &mut msgs,
        "prefill",
    );

    for (si, &n) in c.steps.iter().enumerate() {
        let sel = c.selective;
        if !one_step(
            ctx,
            c,
            &mut cache,
            &mut r,
            &mut rng,
            (si, n, None, sel),
            &mut msgs,
            &mut outs,
        ) {
            return (msgs, outs);
        }
    }
    (msgs, outs)
}

fn sweep(cases: &[Case], seed: u64) {
    let mut failures = vec![];
    for ctx in contexts() {
        for (k, c) in cases.iter().enumerate() {
            if c.dtype == DType::F16 && !ctx.capabilities().f16 {
                eprintln!("[{}] no SHADER_F16: skipping {}", ctx.describe(), c.name());
                continue;
            }
            let (msgs, _) = run_case(ctx, c, seed + k as u64);
            eprintln!(
                "[{}] {}: {}",
                ctx.describe(),
                c.name(),
                if msgs.is_empty() { "ok" } else { "FAILED" }
            );
            for m in msgs {
                failures.push(format!("[{}] {}: {m}", ctx.describe(), c.name()));
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
fn decode_matches_reference_without_pruning() {
    sweep(
        &[
            Case::new(2, 2, 16),
            Case::new(4, 1, 32).all(),
            Case {
                splits: Some(1),
                ..Case::new(4, 2, 64).all()
            },
            Case {
                splits: Some(7),
                selective: Some(1),
                ..Case::new(4, 2, 16)
            },
            Case {
                selective: Some(3),
                ..Case::new(4, 1, 32).all()
            },
            // Smaller workgroups than the device's choice: other thread layouts, more splits.
            Case {
                threads: Some(32),
                selective: Some(2),
                ..Case::new(4, 1, 64).all()
            },
            Case {
                threads: Some(64),
                ..Case::new(8, 2, 40).all()
            },
            // Many query rows per workgroup (CPU adapters default to 2; GPUs take up to 16),
            // at a small head dim so the unrolled kernel compiles fast on lavapipe.
            Case {
                rows: Some(16),
                selective: Some(5),
                ..Case::new(8, 1, 8).all()
            },
            Case {
                batch: 3,
                prefill: vec![1, 4, 0],
                steps: vec![1, 2, 1],
                selective: Some(0),
                ..Case::new(8, 2, 24).all()
            },
        ],
        100,
    );
}

#[test]
fn decode_matches_reference_with_pruning() {
    sweep(
        &[
            // No selective state: F is zero, so pruning is a sliding window that keeps token 0.
            Case {
                budget: Some(8),
                capacity: 8,
                ..Case::new(2, 2, 16)
            },
            Case {
                budget: Some(10),
                selective: Some(0),
                ..Case::new(4, 2, 32).all()
            },
            Case {
                budget: Some(3),
                capacity: 5,
                selective: Some(1),
                steps: vec![1, 8, 2, 1, 1],
                ..Case::new(2, 1, 16)
            },
            Case {
                budget: Some(12),
                capacity: 12,
                selective: Some(2),
                splits: Some(3),
                prefill: vec![20, 7],
                steps: vec![1, 1, 4, 1, 1, 1, 2],
                ..Case::new(4, 2, 16).all()
            },
        ],
        200,
    );
}

#[test]
fn decode_matches_reference_f16() {
    let f16 = |c: Case| Case {
        dtype: DType::F16,
        ..c
    };
    sweep(
        &[
            f16(Case::new(2, 2, 16).all()),
            f16(Case {
                selective: Some(1),
                ..Case::new(4, 2, 32).all()
            }),
            f16(Case {
                budget: Some(10),
                selective: Some(0),
                ..Case::new(4, 1, 64).all()
            }),
            f16(Case {
                threads: Some(32),
                ..Case::new(8, 2, 128).all()
            }),
            f16(Case::new(2, 1, 8)),
            f16(Case {
                rows: Some(8),
                budget: Some(9),
                selective: Some(2),
                ..Case::new(4, 1, 16).all()
            }),
        ],
        300,
    );
}

/// A cache split into several sequence groups, each with its own buffers (the layout of caches
/// larger than one binding, forced here with small buffers), is exact, with every option.
#[test]
fn multi_buffer_cache_matches_reference() {
    let cases = [
        Case {
            batch: 3,
            group: Some(1),
            selective: Some(1),
            prefill: vec![5, 9, 2],
            ..Case::new(4, 2, 16).all()
        },
        Case {
            batch: 3,
            group: Some(2),
            budget: Some(8),
            selective: Some(0),
            splits: Some(2),
            prefill: vec![5, 9, 2],
            ..Case::new(8, 2, 32).all()
        },
        Case {
            batch: 3,
            group: Some(2),
            dtype: DType::F16,
            budget: Some(10),
            prefill: vec![5, 9, 2],
            ..Case::new(4, 1, 16).all()
        },
    ];
    for ctx in contexts() {
        for c in &cases {
            if c.dtype == DType::F16 && !ctx.capabilities().f16 {
                continue;
            }
            let cache = KvCache::new(ctx, c.config()).unwrap();
            let want = c.batch.div_ceil(c.group.unwrap()) as usize;
            assert_eq!(cache.buffer_groups(), want, "{}", c.name());
        }
        // Not even one sequence fits: a typed error.
        let c = &cases[0];
        let tiny = c.config().max_buffer_bytes(64);
        assert!(matches!(
            KvCache::new(ctx, tiny),
            Err(Error::TooLarge { .. })
        ));
    }
    sweep(&cases, 400);
}

/// Sequences stored in 2 to 10 segments (a sequence's K larger than a buffer may be), with
/// pruning across the segments, selective masking, GQA, gate, temperatures, splits, f32 and f16;
/// every step and the slots after it exact against the reference.
#[test]
fn segmented_cache_matches_reference() {
    let cases = [
        // 2 segments of 20 slots, no budget: sequences grow across the boundary.
        Case {
            batch: 3,
            segment: Some(24),
            selective: Some(1),
            prefill: vec![5, 19, 2],
            ..Case::new(4, 2, 16).all()
        },
        // 3 segments of 14 slots, a budget over all three: eviction picks over every segment.
        Case {
            batch: 3,
            segment: Some(16),
            budget: Some(30),
            selective: Some(0),
            splits: Some(2),
            prefill: vec![25, 9, 29],
            steps: vec![1, 3, 8, 2, 1, 8, 4, 1],
            ..Case::new(8, 2, 32).all()
        },
        // 3 segments, a budget inside two of them, f16.
        Case {
            batch: 2,
            segment: Some(14),
            dtype: DType::F16,
            budget: Some(20),
            selective: Some(2),
            prefill: vec![18, 3],
            ..Case::new(4, 1, 16).all()
        },
        // 2 segments, f16, no selective masking (a sliding window over the boundary).
        Case {
            batch: 2,
            segment: Some(20),
            dtype: DType::F16,
            budget: Some(24),
            prefill: vec![23, 1],
            ..Case::new(2, 2, 16)
        },
        // 8 segments of 5 slots, a prefill past the budget (it evicts token by token while
        // appending), the budget over three segments.
        Case {
            batch: 3,
            segment: Some(5),
            budget: Some(12),
            selective: Some(3),
            prefill: vec![30, 13, 2],
            ..Case::new(4, 2, 16).all()
        },
        // 10 segments of 4 slots, no budget: the first steps reach at most 8 segments (a
        // partials buffer per segment, merged by `merge_segments`), the later ones more (every
        // segment's partials in one shared buffer, merged once).
        Case {
            batch: 2,
            segment: Some(4),
            selective: Some(1),
            prefill: vec![22, 5],
            ..Case::new(4, 2, 16).all()
        },
        // The same without selective masking, f16 (the attend's F-rows binding is then its own
        // partials buffer).
        Case {
            batch: 3,
            segment: Some(4),
            dtype: DType::F16,
            prefill: vec![20, 3, 9],
            ..Case::new(4, 1, 32).all()
        },
    ];
    for ctx in contexts() {
        for (c, want) in cases.iter().zip([2, 3, 3, 2, 8, 10, 10]) {
            if c.dtype == DType::F16 && !ctx.capabilities().f16 {
                continue;
            }
            let cache = KvCache::new(ctx, c.config()).unwrap();
            assert_eq!(cache.segments(), want, "{}", c.name());
            assert_eq!(
                cache.buffer_groups(),
                (want * c.batch) as usize,
                "{}",
                c.name()
            );
        }
        // Not even one slot fits: a typed error.
        let tiny = cases[0].config().max_buffer_bytes(64);
        assert!(matches!(
            KvCache::new(ctx, tiny),
            Err(Error::TooLarge { .. })
        ));
    }
    sweep(&cases, 1200);
}

/// A segmented cache (pruning over three segments, gate, selective) runs on a device that grants
/// only the 10 storage buffers per shader stage the library asks for: no segment kernel binds
/// more.
#[test]
fn segmented_cache_within_storage_buffer_limit() {
    let case = Case {
        batch: 2,
        segment: Some(16),
        budget: Some(30),
        selective: Some(0),
        prefill: vec![25, 29],
        ..Case::new(4, 2, 16).all()
    };
    for (a, why) in selattn::adapters() {
        if why.is_some() {
            continue;
        }
        let limits = wgpu::Limits {
            max_storage_buffers_per_shader_stage: selattn::kernels::STORAGE_BUFFERS_NEEDED,
            ..a.limits()
        };
        let desc = wgpu::DeviceDescriptor {
            label: Some("selattn test, 10 storage buffers"),
            required_limits: limits,
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(a.request_device(&desc)).unwrap();
        let ctx = Context::from_device(device, queue, a.get_info(), vec![]).unwrap();
        assert_eq!(ctx.capabilities().max_storage_buffers, 10);
        let (msgs, _) = run_case(&ctx, &case, 77);
        assert!(msgs.is_empty(), "[{}] {msgs:?}", ctx.describe());
    }
}

/// A serving loop's operations.
enum Op {
    /// A step of n tokens, with per-sequence counts, with or without selective masking.
    Step(u32, Option<Vec<u32>>, bool),
    /// Reset one sequence (remove it; it restarts empty, as a new one).
    Reset(u32),
    /// Truncate a sequence by this many tokens (speculative decoding rejects them), or (None)
    /// to one past its end (always refused).
    Truncate(u32, Option<u64>),
    /// Take a checkpoint of a sequence.
    Checkpoint(u32),
    /// Roll a sequence back to its checkpoint (refused when a reset or a truncation below it
    /// made it stale, or when there is none).
    Rollback(u32),
}

/// What a serving script did.
#[derive(Clone, Copy, Debug, Default)]
struct Served {
    /// Truncations done.
    truncated: u32,
    /// Truncations refused.
    refused: u32,
    /// Rollbacks done.
    rolled: u32,
    /// Rollbacks done after the sequence had evicted tokens since its checkpoint.
    rolled_evicted: u32,
    /// Rollbacks done after a query of the sequence added selective scores since its checkpoint.
    rolled_selective: u32,
    /// Rollbacks refused as stale.
    stale: u32,
}

impl std::ops::AddAssign for Served {
    fn add_assign(&mut self, o: Served) {
        self.truncated += o.truncated;
        self.refused += o.refused;
        self.rolled += o.rolled;
        self.rolled_evicted += o.rolled_evicted;
        self.rolled_selective += o.rolled_selective;
        self.stale += o.stale;
    }
}

/// A live checkpoint in the serving script: the cache's token, the reference sequence and its
/// selective mark when it was taken.
type Saved = (Checkpoint, RefSeq, u64);

/// Per-sequence counts (0: idle), resets, truncation (exact, or refused with nothing changed),
/// checkpoints and rollbacks, and pruning, step by step against the reference.
fn run_serving(ctx: &Context, c: &Case, ops: &[Op], seed: u64) -> Served {
    let mut rng = Rng::new(seed);
    let (mut msgs, mut outs) = (vec![], vec![]);
    let cfg = c.config();
    let mut cache = KvCache::new(ctx, cfg).unwrap();
    let mut r = RefCache::new(cfg).unwrap();
    let cap = c.capacity as usize;
    let n0 = *c.prefill.iter().max().unwrap() as usize;
    let t = tokens(&mut rng, c, n0, false);
    let g = upload_tokens(ctx, c, &t);
    let mut tk = Tokens::new(&g.k, &g.v);
    if let Some(x) = &g.gate {
        tk = tk.gate(x);
    }
    cache.append(ctx, &tk, Some(&c.prefill)).unwrap();
    r.append(&t, Some(&c.prefill)).unwrap();
    // 1 + the position of the last query that ran with selective masking, per sequence.
    let mut touched = vec![0u64; c.batch as usize];
    let mut served = Served::default();
    // Per sequence: its live checkpoint, and the last one a reset or truncation made stale.
    let mut cps: Vec<Option<Saved>> = vec![None; c.batch as usize];
    let mut stale: Vec<Option<Checkpoint>> = vec![None; c.batch as usize];
    for (si, op) in ops.iter().enumerate() {
        match op {
            Op::Step(n, counts, sel) => {
                let selective = sel.then_some(c.selective.unwrap_or(0));
                if selective.is_some() {
                    for (b, seq) in r.seqs.iter().enumerate() {
                        let cnt = counts.as_ref().map_or(*n, |cs| cs[b]) as u64;
                        if cnt > 0 {
                            touched[b] = seq.next_pos + cnt;
                        }
                    }
                }
                let step = (si, *n, counts.clone(), selective);
                if !one_step(
                    ctx, c, &mut cache, &mut r, &mut rng, step, &mut msgs, &mut outs,
                ) {
                    break;
                }
            }
            Op::Reset(b) => {
                cache.reset_sequence(*b).unwrap();
                r.seqs[*b as usize] = Default::default();
                touched[*b as usize] = 0;
                if let Some((cp, ..)) = cps[*b as usize].take() {
                    stale[*b as usize] = Some(cp);
                }
            }
            Op::Checkpoint(b) => {
                let bu = *b as usize;
                let cp = cache.checkpoint(ctx, *b).unwrap();
                if cp.position() != r.seqs[bu].next_pos || cp.batch() != *b {
                    msgs.push(format!("op {si}: checkpoint {cp:?}"));
                }
                if let Some((old, ..)) = cps[bu].take() {
                    stale[bu] = Some(old);
                }
                cps[bu] = Some((cp, r.seqs[bu].clone(), touched[bu]));
            }
            Op::Rollback(b) => {
                let bu = *b as usize;
                let before = (cache.lens().to_vec(), cache.positions().to_vec());
                match (&cps[bu], stale[bu]) {
                    (Some((cp, seq, t)), _) => match cache.rollback(ctx, cp) {
                        Ok(()) => {
                            served.rolled += 1;
                            if r.seqs[bu].evictions > seq.evictions {
                                served.rolled_evicted += 1;
                            }
                            if touched[bu] > seq.next_pos {
                                served.rolled_selective += 1;
                            }
                            r.seqs[bu] = seq.clone();
                            touched[bu] = *t;
                        }
                        Err(e) => msgs.push(format!("op {si}: rollback of {b}: {e}")),
                    },
                    (None, Some(old)) => match cache.rollback(ctx, &old) {
                        Err(Error::StaleCheckpoint { batch, .. }) if batch == *b => {
                            served.stale += 1;
                            if (cache.lens().to_vec(), cache.positions().to_vec()) != before {
                                msgs.push(format!("op {si}: a refused rollback changed the cache"));
                            }
                        }
                        other => msgs.push(format!("op {si}: stale rollback gave {other:?}")),
                    },
                    (None, None) => msgs.push(format!("op {si}: script error, no checkpoint")),
                }
            }
            Op::Truncate(b, back) => {
                let bu = *b as usize;
                let end = r.seqs[bu].next_pos;
                let to = back.map_or(end + 1, |k| end.saturating_sub(k));
                let before = (cache.lens().to_vec(), cache.positions().to_vec());
                match cache.truncate_sequence(*b, to) {
                    Ok(()) => {
                        // Exact only without evictions and without removed selective queries.
                        if r.seqs[bu].evictions > 0 || touched[bu] > to || to > end {
                            msgs.push(format!("op {si}: truncating seq {b} to {to} was allowed"));
                        }
                        r.truncate(bu, to);
                        served.truncated += 1;
                        if cps[bu].as_ref().is_some_and(|(cp, ..)| cp.position() > to) {
                            stale[bu] = cps[bu].take().map(|(cp, ..)| cp);
                        }
                    }
                    Err(Error::CannotTruncate { .. }) => {
                        if r.seqs[bu].evictions == 0 && touched[bu] <= to && to <= end {
                            msgs.push(format!("op {si}: truncating seq {b} to {to} was refused"));
                        }
                        if (cache.lens().to_vec(), cache.positions().to_vec()) != before {
                            msgs.push(format!("op {si}: a refused truncation changed the cache"));
                        }
                        served.refused += 1;
                    }
                    Err(e) => msgs.push(format!("op {si}: {e}")),
                }
            }
        }
        check_state(
            &cache.download_state(ctx).unwrap(),
            &r,
            cap,
            &mut msgs,
            &format!("after op {si}"),
        );
        if cache
            .positions()
            .iter()
            .zip(&r.seqs)
            .any(|(&p, s)| p != s.next_pos)
        {
            msgs.push(format!("op {si}: positions {:?}", cache.positions()));
        }
    }
    assert!(
        msgs.is_empty(),
        "[{}] {}: {} failures:\n{}",
        ctx.describe(),
        c.name(),
        msgs.len(),
        msgs.join("\n")
    );
    served
}

/// Runs `ops` (seeded with `seed`) on every adapter for four cases of one serving loop (three
/// sequences, every input, selective): f32 without and with a budget, f16 with a budget,
/// splits and groups where the adapter has f16, and f32 with sequences in segments of 3 slots and
/// a budget over three of them; each exact against the reference. Returns the
/// outcomes summed.
fn serve_everywhere(capacity: u32, ops: &[Op], seed: u64) -> Served {
    let base = Case {
        batch: 3,
        prefill: vec![4, 0, 2],
        capacity,
        selective: Some(1),
        ..Case::new(4, 2, 16).all()
    };
    let cases = [
        base.clone(),
        Case {
            budget: Some(7),
            ..base.clone()
        },
        Case {
            dtype: DType::F16,
            budget: Some(9),
            splits: Some(2),
            group: Some(2),
            ..base.clone()
        },
        // Sequences in segments of 3 slots, the budget over three of them.
        Case {
            budget: Some(8),
            segment: Some(3),
            ..base.clone()
        },
    ];
    let mut total = Served::default();
    for ctx in contexts() {
        for c in &cases {
            if c.dtype == DType::F16 && !ctx.capabilities().f16 {
                continue;
            }
            let s = run_serving(ctx, c, ops, seed);
            eprintln!("[{}] {}: {s:?}", ctx.describe(), c.name());
            total += s;
        }
    }
    total
}

/// Idle sequences and different token counts per sequence in one step, resets, speculative
/// rollbacks and pruning, mixed, each step exact against the reference.
#[test]
fn serving_loop_matches_reference() {
    use Op::*;
    let ops = [
        Step(3, Some(vec![3, 0, 1]), false),
        Step(2, Some(vec![0, 2, 2]), true),
        Truncate(0, Some(2)),
        Reset(1),
        Step(4, Some(vec![4, 1, 0]), false),
        Truncate(0, Some(3)),
        Truncate(2, Some(1)),
        Truncate(1, None),
        Step(1, None, true),
        Step(2, Some(vec![2, 0, 1]), false),
        Truncate(1, Some(1)),
        Step(3, Some(vec![1, 3, 3]), false),
        Truncate(1, Some(2)),
        Step(1, Some(vec![1, 1, 0]), true),
        Reset(0),
        Step(2, Some(vec![2, 0, 2]), false),
        Truncate(0, Some(1)),
        Step(1, Some(vec![0, 0, 0]), false),
    ];
    let total = serve_everywhere(20, &ops, 900);
    // The script exercises both outcomes.
    assert!(total.truncated > 0 && total.refused > 0, "{total:?}");
}

/// Speculative decoding with pruning and selective masking: checkpoint sequences, append draft
/// tokens (steps with a budget evicting and selective scores going into F), roll back, replay
/// the accepted tokens; every step, and the slots after every operation, exact against the
/// reference; stale checkpoints (after a reset, a newer checkpoint or a truncation below them)
/// refused with nothing changed.
#[test]
fn speculative_rollback_matches_reference() {
    use Op::*;
    let ops = [
        Checkpoint(0),
        Checkpoint(2),
        Step(3, Some(vec![3, 1, 2]), true),
        Step(2, Some(vec![2, 2, 2]), true),
        Rollback(0),
        Step(1, Some(vec![1, 0, 1]), true),
        Rollback(2),
        Step(2, Some(vec![2, 1, 0]), false),
        Checkpoint(1),
        Step(4, Some(vec![0, 4, 4]), true),
        Rollback(1),
        Step(2, Some(vec![1, 2, 0]), true),
        Rollback(1),
        Step(3, Some(vec![1, 3, 0]), true),
        Checkpoint(0),
        Reset(0),
        Rollback(0),
        Step(2, None, true),
        Checkpoint(2),
        Step(1, Some(vec![0, 0, 1]), false),
        Truncate(2, Some(1)),
        Rollback(2),
        Checkpoint(1),
        Checkpoint(1),
        Step(3, None, true),
        Rollback(1),
        Step(1, None, true),
    ];
    let total = serve_everywhere(24, &ops, 950);
    // Rollbacks over evictions and over selective scores both ran, and stale ones were refused.
    assert!(
        total.rolled_evicted > 0 && total.rolled_selective > 0 && total.stale > 0,
        "{total:?}"
    );
}

/// A checkpoint, draft steps that evict and add selective scores, and the rollback, all recorded
/// into one encoder and submitted once, equal the reference (the copies are ordered with the
/// passes in the encoder); with whole sequences per buffer and with sequences in segments.
#[test]
fn checkpoint_and_rollback_in_one_encoder() {
    let plain = Case {
        batch: 2,
        budget: Some(5),
        selective: Some(0),
        prefill: vec![4, 2],
        capacity: 16,
        ..Case::new(4, 2, 8).all()
    };
    // The same with sequences in segments of 2 slots (the budget over three of them).
    let segmented = Case {
        segment: Some(2),
        ..plain.clone()
    };
    for (ctx, c) in contexts()
        .iter()
        .flat_map(|ctx| [(ctx, &plain), (ctx, &segmented)])
    {
        let mut rng = Rng::new(77);
        let cfg = c.config();
        let mut cache = KvCache::new(ctx, cfg).unwrap();
        let mut r = RefCache::new(cfg).unwrap();
        let t = tokens(&mut rng, c, 4, true);
        let g = upload_tokens(ctx, c, &t);
        let tk = Tokens::new(&g.k, &g.v)
            .gate(g.gate.as_ref().unwrap())
            .f(g.f.as_ref().unwrap());
        cache.append(ctx, &tk, Some(&c.prefill)).unwrap();
        r.append(&t, Some(&c.prefill)).unwrap();
        let saved = r.clone();
        let (b, hq, d, n) = (2u64, 4u64, 8u64, 3u64);
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        let cp = cache.encode_checkpoint(ctx, &mut enc, 0).unwrap();
        let mut keep = vec![];
        for _ in 0..2 {
            let t = tokens(&mut rng, c, n as usize, false);
            let rows = (b * hq * n) as usize;
            let x = HostQueries {
                q_heads: hq as usize,
                q: rng.normals(rows * d as usize),
                tau: Some(rng.range(0.5, 1.5, rows)),
                alpha: Some(rng.range(0.0, 0.3, hq as usize)),
            };
            let g = upload_tokens(ctx, c, &t);
            let q = ctx.upload(&[b, hq, n, d], &x.q).unwrap();
            let tau = ctx.upload(&[b, hq, n], x.tau.as_ref().unwrap()).unwrap();
            let alpha = ctx.upload(&[hq], x.alpha.as_ref().unwrap()).unwrap();
            let o = ctx.empty(&[b, hq, n, d], DType::F32).unwrap();
            let step = Step::new(&q, &g.k, &g.v)
                .gate(g.gate.as_ref().unwrap())
                .tau(&tau)
                .alpha(&alpha);
            let opts = DecodeOptions::new().selective(0);
            cache
                .encode_step(ctx, &mut enc, &step, &opts, &Outputs::new(&o), None)
                .unwrap();
            r.step(&x, &t, None, Some(0)).unwrap();
            keep.push((g, q, tau, alpha, o));
        }
        // The drafts evicted from both sequences and scored into F.
        assert!(
            r.seqs.iter().all(|s| s.evictions > 0),
            "{:?}",
            cache.evictions()
        );
        cache.encode_rollback(ctx, &mut enc, &cp).unwrap();
        ctx.queue.submit([enc.finish()]);
        r.seqs[0] = saved.seqs[0].clone();
        let mut msgs = vec![];
        check_state(
            &cache.download_state(ctx).unwrap(),
            &r,
            c.capacity as usize,
            &mut msgs,
            "rollback in one encoder",
        );
        let ev: Vec<u64> = r.seqs.iter().map(|s| s.evictions).collect();
        assert_eq!(cache.evictions(), ev.as_slice());
        // Steps after the rollback see the restored K and V.
        let mut outs = vec![];
        for si in 0..2 {
            let step = (si, 2, None, Some(0));
            assert!(one_step(
                ctx, c, &mut cache, &mut r, &mut rng, step, &mut msgs, &mut outs
            ));
        }
        assert!(
            msgs.is_empty(),
            "[{}] {}: {}",
            ctx.describe(),
            c.name(),
            msgs.join("\n")
        );
    }
}

/// Checkpoint misuse: another cache's checkpoint, one replaced by a newer one, one made stale by
/// a reset, an index past the batch; each a typed error that changes nothing.
#[test]
fn checkpoint_misuse_is_refused() {
    for ctx in contexts() {
        let cfg = KvCacheConfig::new(2, 1, 8, 16).budget(4);
        let mut a = KvCache::new(ctx, cfg).unwrap();
        let mut b = KvCache::new(ctx, cfg).unwrap();
        let k = ctx.upload(&[2, 1, 3, 8], &[0.5; 48]).unwrap();
        let v = ctx.upload(&[2, 1, 3, 8], &[1.5; 48]).unwrap();
        a.append(ctx, &Tokens::new(&k, &v), None).unwrap();
        b.append(ctx, &Tokens::new(&k, &v), None).unwrap();
        let cb = b.checkpoint(ctx, 0).unwrap();
        let first = a.checkpoint(ctx, 0).unwrap();
        let second = a.checkpoint(ctx, 0).unwrap();
        a.append(ctx, &Tokens::new(&k, &v), None).unwrap();
        let before = (
            a.lens().to_vec(),
            a.positions().to_vec(),
            a.evictions().to_vec(),
        );
        let unchanged = |a: &KvCache| {
            (
                a.lens().to_vec(),
                a.positions().to_vec(),
                a.evictions().to_vec(),
            ) == before
        };
        let stale =
            |r: selattn::Result<()>| matches!(r, Err(Error::StaleCheckpoint { batch: 0, .. }));
        assert!(stale(a.rollback(ctx, &cb)), "another cache's checkpoint");
        assert!(unchanged(&a));
        assert!(stale(a.rollback(ctx, &first)), "a replaced checkpoint");
        assert!(unchanged(&a));
        assert!(matches!(
            a.checkpoint(ctx, 2),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(unchanged(&a));
        a.rollback(ctx, &second).unwrap();
        assert_eq!(a.positions(), &[3, 6]);
        assert_eq!(a.evictions(), &[0, 2]);
        a.reset_sequence(0).unwrap();
        assert!(stale(a.rollback(ctx, &second)), "after a reset");
        assert_eq!(a.positions(), &[0, 6]);
        // The async forms: sequence 1 back to before its second append.
        let cp1 = pollster::block_on(b.checkpoint_async(ctx, 1)).unwrap();
        b.append(ctx, &Tokens::new(&k, &v), None).unwrap();
        assert_eq!(b.evictions(), &[2, 2]);
        pollster::block_on(b.rollback_async(ctx, &cp1)).unwrap();
        assert_eq!((b.positions(), b.evictions()), (&[6, 3][..], &[2, 0][..]));
        assert!(stale(pollster::block_on(b.rollback_async(ctx, &second))));
    }
}

#[test]
fn budget_at_least_length_equals_no_pruning() {
    for ctx in contexts() {
        let base = Case {
            selective: Some(1),
            ..Case::new(4, 2, 16).all()
        };
        let total = 9 + base.steps.iter().sum::<u32>();
        let (m0, o0) = run_case(ctx, &base, 7);
        let pruned = Case {
            budget: Some(total),
            capacity: total,
            ..base.clone()
        };
        let (m1, o1) = run_case(ctx, &pruned, 7);
        assert!(m0.is_empty() && m1.is_empty(), "{m0:?} {m1:?}");
        assert_eq!(o0.len(), o1.len());
        for (k, (a, b)) in o0.iter().zip(&o1).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "[{}] output {k} differs with budget {total} (= length) from no budget",
                ctx.describe()
            );
        }
    }
}

/// Prefill of P tokens with the forward kernel (F_out into the cache), then decode steps, equals
/// one prefill of all N tokens: O and LSE of the later rows, and the final selective state.
#[test]
fn prefill_then_decode_equals_full_prefill() {
    let (bn, hq, hkv, d, nfull, p) = (2u32, 4u32, 2u32, 32u32, 23u32, 9u32);
    let steps = [1u32, 3, 1, 8, 1];
    assert_eq!(p + steps.iter().sum::<u32>(), nfull);
    let mut failures = vec![];
    for ctx in contexts() {
        for budget in [None, Some(nfull)] {
            let shape = Shape::new(bn, hq, nfull, d).with_kv_heads(hkv);
            let c = Switches {
                tau: true,
                alpha: true,
                gate: true,
                kv_len: false,
                ..Switches::NONE
            };
            let x = random_inputs(&shape, c, 11);
            let opts = Options::causal().selective(1);
            let full = run_ref(&shape, &x, &opts);

            // Slices of the full inputs: rows [a, a + n) of a [B, H, N, w] tensor.
            let rows = |v: &[f32], h: u32, w: u32, a: u32, n: u32| -> Vec<f32> {
                let mut out = vec![];
                for bh in 0..(bn * h) as usize {
                    let base = (bh * nfull as usize + a as usize) * w as usize;
                    out.extend_from_slice(&v[base..base + (n * w) as usize]);
                }
                out
            };
            let dims = |h: u32, n: u32| vec![bn as u64, h as u64, n as u64, d as u64];
            let tau = x.tau.as_ref().unwrap();
            let alpha = x.alpha.as_ref().unwrap();
            let gate = x.gate.as_ref().unwrap();

            // 1. Prefill on the GPU, keeping F_out.
            let pshape = Shape::new(bn, hq, p, d).with_kv_heads(hkv);
            let qp = ctx.upload(&dims(hq, p), &rows(&x.q, hq, d, 0, p)).unwrap();
            let kp = ctx
                .upload(&dims(hkv, p), &rows(&x.k, hkv, d, 0, p))
                .unwrap();
            let vp = ctx
                .upload(&dims(hkv, p), &rows(&x.v, hkv, d, 0, p))
                .unwrap();
            let tp = ctx
                .upload(&pshape.row_dims(), &rows(tau, hq, 1, 0, p))
                .unwrap();
            let ap = ctx.upload(&[hq as u64], alpha).unwrap();
            let gp = ctx
                .upload(&pshape.gate_dims(), &rows(gate, hkv, 1, 0, p))
                .unwrap();
            let inputs = selattn::Inputs::new(&qp, &kp, &vp)
                .tau(&tp)
                .alpha(&ap)
                .gate(&gp);
            let out = ctx.attention_alloc(&inputs, &opts).unwrap();
            let f_out = out.f_out.unwrap();

            // 2. Into the cache, with F.
            let mut cfg = KvCacheConfig::new(bn, hkv, d, nfull).with_gate();
            if let Some(b) = budget {
                cfg = cfg.budget(b);
            }
            let mut cache = KvCache::new(ctx, cfg).unwrap();
            cache
                .append(ctx, &Tokens::new(&kp, &vp).gate(&gp).f(&f_out), None)
                .unwrap();

            // 3. Decode the rest.
            let mut at = p;
            let mut msgs = vec![];
            for &n in &steps {
                let q = ctx.upload(&dims(hq, n), &rows(&x.q, hq, d, at, n)).unwrap();
                let k = ctx
                    .upload(&dims(hkv, n), &rows(&x.k, hkv, d, at, n))
                    .unwrap();
                let v = ctx
                    .upload(&dims(hkv, n), &rows(&x.v, hkv, d, at, n))
                    .unwrap();
                let t = ctx
                    .upload(&[bn as u64, hq as u64, n as u64], &rows(tau, hq, 1, at, n))
                    .unwrap();
                let g = ctx
                    .upload(
                        &[bn as u64, hkv as u64, n as u64],
                        &rows(gate, hkv, 1, at, n),
                    )
                    .unwrap();
                let o = ctx.empty(&dims(hq, n), DType::F32).unwrap();
                let lse = ctx
                    .empty(&[bn as u64, hq as u64, n as u64], DType::F32)
                    .unwrap();
                ctx.poison(&o).unwrap();
                ctx.poison(&lse).unwrap();
                let step = Step::new(&q, &k, &v).gate(&g).tau(&t).alpha(&ap);
                cache
                    .step(
                        ctx,
                        &step,
                        &DecodeOptions::new().selective(1),
                        &Outputs::new(&o).lse(&lse),
                    )
                    .unwrap();
                let go = ctx.download(&o).unwrap();
                let gl = ctx.download(&lse).unwrap();
                let ro: Vec<f64> = (0..(bn * hq) as usize)
                    .flat_map(|bh| {
                        let base = (bh * nfull as usize + at as usize) * d as usize;
                        full.o[base..base + (n * d) as usize].to_vec()
                    })
                    .collect();
                let rl: Vec<f64> = (0..(bn * hq) as usize)
                    .flat_map(|bh| {
                        let base = bh * nfull as usize + at as usize;
                        full.lse[base..base + n as usize].to_vec()
                    })
                    .collect();
                let co = compare(&go, &ro, 2e-5, 2e-5);
                let cl = compare(&gl, &rl, 1e-4, 1e-4);
                if co.bad > 0 || co.rel_norm > 2e-5 {
                    msgs.push(format!("rows {at}..{}: O {co:?}", at + n));
                }
                if cl.bad > 0 {
                    msgs.push(format!("rows {at}..{}: LSE {cl:?}", at + n));
                }
                at += n;
            }
            // 4. The cache's F state is the full prefill's F_out, slot j holding token j.
            let st = cache.download_state(ctx).unwrap();
            for b in 0..bn as usize {
                let pos: Vec<u32> = st.pos[b * nfull as usize..][..nfull as usize].to_vec();
                if pos != (0..nfull).collect::<Vec<_>>() {
                    msgs.push(format!("seq {b}: slots hold positions {pos:?}"));
                }
            }
            let cf = compare(&st.f, &full.f_out, 1e-4, 1e-4);
            if cf.bad > 0 {
                msgs.push(format!("F state vs full F_out: {cf:?}"));
            }
            for m in msgs {
                failures.push(format!("[{}] budget {budget:?}: {m}", ctx.describe()));
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
fn bad_input_gets_typed_errors() {
    for ctx in contexts() {
        let name = ctx.describe();
        // Budgets below the minimum, or above the capacity.
        for budget in [0, 1, 2, 9] {
            let e = KvCache::new(ctx, KvCacheConfig::new(1, 2, 16, 8).budget(budget)).unwrap_err();
            assert!(
                matches!(e, Error::BadBudget { budget: b, .. } if b == budget),
                "[{name}] budget {budget}: {e:?}"
            );
        }
        let e = KvCache::new(ctx, KvCacheConfig::new(1, 2, 12, 8)).unwrap_err();
        assert!(
            matches!(e, Error::HeadDimUnsupported { got: 12, .. }),
            "[{name}] {e:?}"
        );

        let mut cache = KvCache::new(ctx, KvCacheConfig::new(2, 2, 16, 8)).unwrap();
        let kv = |h: u64, n: u64, d: u64| {
            ctx.upload(&[2, h, n, d], &vec![0.5; (2 * h * n * d) as usize])
                .unwrap()
        };
        // Threads per workgroup not a power of two, or out of range: nothing recorded.
        {
            let (k1, v1, q1) = (kv(2, 1, 16), kv(2, 1, 16), kv(4, 1, 16));
            let o1 = ctx.empty(&[2, 4, 1, 16], DType::F32).unwrap();
            for t in [0, 48, 16, 1024] {
                let e = cache
                    .step(
                        ctx,
                        &Step::new(&q1, &k1, &v1),
                        &DecodeOptions::new().threads(t),
                        &Outputs::new(&o1),
                    )
                    .unwrap_err();
                assert!(
                    matches!(e, Error::TooLarge { .. }),
                    "[{name}] threads {t}: {e:?}"
                );
                assert_eq!(
                    cache.lens(),
                    &[0, 0],
                    "[{name}] a failed step changed the cache"
                );
            }
        }
        // Past capacity without a budget: 6 + 3 > 8, nothing recorded.
        let (k6, v6) = (kv(2, 6, 16), kv(2, 6, 16));
        cache.append(ctx, &Tokens::new(&k6, &v6), None).unwrap();
        let (k3, v3) = (kv(2, 3, 16), kv(2, 3, 16));
        let e = cache.append(ctx, &Tokens::new(&k3, &v3), None).unwrap_err();
        assert_eq!(
            e,
            Error::CacheFull {
                batch: 0,
                len: 6,
                adding: 3,
                capacity: 8
            },
            "[{name}]"
        );
        assert_eq!(
            cache.lens(),
            &[6, 6],
            "[{name}] a failed append changed the cache"
        );
        let e = cache
            .append(ctx, &Tokens::new(&k3, &v3), Some(&[2, 3]))
            .unwrap_err();
        assert!(
            matches!(e, Error::CacheFull { batch: 1, .. }),
            "[{name}] {e:?}"
        );
        // Mismatched heads and head dim.
        let (kh, vh) = (kv(3, 1, 16), kv(3, 1, 16));
        let e = cache.append(ctx, &Tokens::new(&kh, &vh), None).unwrap_err();
        assert!(
            matches!(
                e,
                Error::CacheMismatch {
                    cache: 2,
                    got: 3,
                    ..
                }
            ),
            "[{name}] {e:?}"
        );
        let (kd, vd) = (kv(2, 1, 32), kv(2, 1, 32));
        let e = cache.append(ctx, &Tokens::new(&kd, &vd), None).unwrap_err();
        assert!(
            matches!(
                e,
                Error::CacheMismatch {
                    cache: 16,
                    got: 32,
                    ..
                }
            ),
            "[{name}] {e:?}"
        );
        // A decode step: wrong head dim of q, too many queries, stale positions, full cache.
        let (k1, v1) = (kv(2, 1, 16), kv(2, 1, 16));
        let o = ctx.empty(&[2, 4, 1, 16], DType::F32).unwrap();
        let qd = kv(4, 1, 32);
        let e = cache
            .step(
                ctx,
                &Step::new(&qd, &k1, &v1),
                &DecodeOptions::new(),
                &Outputs::new(&o),
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::CacheMismatch {
                    cache: 16,
                    got: 32,
                    ..
                }
            ),
            "[{name}] {e:?}"
        );
        let q9 = kv(4, 9, 16);
        let (k9, v9) = (kv(2, 9, 16), kv(2, 9, 16));
        let o9 = ctx.empty(&[2, 4, 9, 16], DType::F32).unwrap();
        let e = cache
            .step(
                ctx,
                &Step::new(&q9, &k9, &v9),
                &DecodeOptions::new(),
                &Outputs::new(&o9),
            )
            .unwrap_err();
        assert!(
            matches!(e, Error::QueriesPerStep { got: 9, max: 8 }),
            "[{name}] {e:?}"
        );
        let q1 = kv(4, 1, 16);
        let q3 = ctx.upload(&[2, 3, 1, 16], &[0.5; 96]).unwrap();
        let o3 = ctx.empty(&[2, 3, 1, 16], DType::F32).unwrap();
        let e = cache
            .step(
                ctx,
                &Step::new(&q3, &k1, &v1),
                &DecodeOptions::new(),
                &Outputs::new(&o3),
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::HeadsNotMultiple {
                    q_heads: 3,
                    kv_heads: 2
                }
            ),
            "[{name}] {e:?}"
        );
        let e = cache
            .step(
                ctx,
                &Step::new(&q1, &k1, &v1).positions(&[6, 2]),
                &DecodeOptions::new(),
                &Outputs::new(&o),
            )
            .unwrap_err();
        assert_eq!(
            e,
            Error::StalePosition {
                batch: 1,
                cache: 6,
                expected: 2
            },
            "[{name}]"
        );
        cache.reset_sequence(0).unwrap();
        let e = cache
            .step(
                ctx,
                &Step::new(&q1, &k1, &v1).positions(&[6, 6]),
                &DecodeOptions::new(),
                &Outputs::new(&o),
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::StalePosition {
                    batch: 0,
                    cache: 0,
                    expected: 6
                }
            ),
            "[{name}] {e:?}"
        );
        // Per-sequence counts: one per sequence, each at most the step's tokens; truncation
        // inside the sequence's range only. Nothing changes on refusal.
        let before = (cache.lens().to_vec(), cache.positions().to_vec());
        for (counts, what) in [
            (&[1u32][..], "one per sequence"),
            (&[1, 2][..], "at most n"),
        ] {
            let e = cache
                .step(
                    ctx,
                    &Step::new(&q1, &k1, &v1).counts(counts),
                    &DecodeOptions::new(),
                    &Outputs::new(&o),
                )
                .unwrap_err();
            assert!(
                matches!(e, Error::LengthMismatch { .. }),
                "[{name}] counts {what}: {e:?}"
            );
        }
        let e = cache.truncate_sequence(2, 0).unwrap_err();
        assert!(matches!(e, Error::LengthMismatch { .. }), "[{name}] {e:?}");
        let end = cache.positions()[1];
        let e = cache.truncate_sequence(1, end + 1).unwrap_err();
        assert!(
            matches!(e, Error::CannotTruncate { batch: 1, .. }),
            "[{name}] {e:?}"
        );
        assert_eq!(
            (cache.lens().to_vec(), cache.positions().to_vec()),
            before,
            "[{name}] a refused call changed the cache"
        );
        let e = cache
            .step(
                ctx,
                &Step::new(&q1, &k1, &v1),
                &DecodeOptions::new().selective(4),
                &Outputs::new(&o),
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::SelectionHeadOutOfRange {
                    head: 4,
                    q_heads: 4
                }
            ),
            "[{name}] {e:?}"
        );
        let (k2, v2) = (kv(2, 2, 16), kv(2, 2, 16));
        let q2 = kv(4, 2, 16);
        let o2 = ctx.empty(&[2, 4, 2, 16], DType::F32).unwrap();
        cache
            .step(
                ctx,
                &Step::new(&q2, &k2, &v2),
                &DecodeOptions::new(),
                &Outputs::new(&o2),
            )
            .unwrap();
        let e = cache
            .step(
                ctx,
                &Step::new(&q2, &k2, &v2),
                &DecodeOptions::new(),
                &Outputs::new(&o2),
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::CacheFull {
                    batch: 1,
                    len: 8,
                    adding: 2,
                    ..
                }
            ),
            "[{name}] {e:?}"
        );
        // Gate given to a cache without gates; output aliasing the cache.
        let g = ctx.upload(&[2, 2, 1], &[1.0; 4]).unwrap();
        let e = cache
            .append(ctx, &Tokens::new(&k1, &v1).gate(&g), None)
            .unwrap_err();
        assert!(matches!(e, Error::InputWithoutUse { .. }), "[{name}] {e:?}");
        let own_k = cache.k().clone();
        let e = cache
            .append(ctx, &Tokens::new(&own_k, &v1), None)
            .unwrap_err();
        assert!(matches!(e, Error::BadBuffer { .. }), "[{name}] {e:?}");
    }
}

/// `CacheParams`, `DecodeParams`, `SegParams` and `MergeSegParams` match their WGSL mirrors field
/// for field (naga's layout).
#[test]
fn params_match_wgsl_layout() {
    use selattn::kernels::decode::{CacheParams, DecodeParams, MergeSegParams, SegParams};
    use selattn::kernels::Source;
    use std::mem::{offset_of, size_of};
    let check = |src: Source, name: &str, size: usize, fields: &[(&str, usize)]| {
        let text = src.text(DType::F32).unwrap();
        let module = naga::front::wgsl::parse_str(&text).unwrap();
        let (_, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{name} not in {src:?}"));
        let naga::TypeInner::Struct { members, span } = &ty.inner else {
            panic!("{name} is not a struct");
        };
        assert_eq!(*span as usize, size, "{name} size");
        let got: Vec<(String, usize)> = members
            .iter()
            .map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize))
            .collect();
        let want: Vec<(String, usize)> = fields.iter().map(|(n, o)| (n.to_string(), *o)).collect();
        assert_eq!(got, want, "{name} fields");
    };
    check(
        Source::Cache,
        "CacheParams",
        size_of::<CacheParams>(),
        &[
            ("batch", offset_of!(CacheParams, batch)),
            ("kv_heads", offset_of!(CacheParams, kv_heads)),
            ("capacity", offset_of!(CacheParams, capacity)),
            ("limit", offset_of!(CacheParams, limit)),
            ("n", offset_of!(CacheParams, n)),
            ("b0", offset_of!(CacheParams, b0)),
            ("_pad1", offset_of!(CacheParams, _pad1)),
            ("_pad2", offset_of!(CacheParams, _pad2)),
        ],
    );
    check(
        Source::Decode,
        "DecodeParams",
        size_of::<DecodeParams>(),
        &[
            ("batch", offset_of!(DecodeParams, batch)),
            ("q_heads", offset_of!(DecodeParams, q_heads)),
            ("kv_heads", offset_of!(DecodeParams, kv_heads)),
            ("group", offset_of!(DecodeParams, group)),
            ("n", offset_of!(DecodeParams, n)),
            ("capacity", offset_of!(DecodeParams, capacity)),
            ("sel_head", offset_of!(DecodeParams, sel_head)),
            ("sel_kv", offset_of!(DecodeParams, sel_kv)),
            ("scale", offset_of!(DecodeParams, scale)),
            ("splits", offset_of!(DecodeParams, splits)),
            ("split_len", offset_of!(DecodeParams, split_len)),
            ("rows", offset_of!(DecodeParams, rows)),
            ("n_rblocks", offset_of!(DecodeParams, n_rblocks)),
            ("ml_base", offset_of!(DecodeParams, ml_base)),
            ("b0", offset_of!(DecodeParams, b0)),
            ("split0", offset_of!(DecodeParams, split0)),
            ("pb0", offset_of!(DecodeParams, pb0)),
            ("_pad0", offset_of!(DecodeParams, _pad0)),
            ("_pad1", offset_of!(DecodeParams, _pad1)),
            ("_pad2", offset_of!(DecodeParams, _pad2)),
        ],
    );
    check(
        Source::CacheSegments,
        "SegParams",
        size_of::<SegParams>(),
        &[
            ("batch", offset_of!(SegParams, batch)),
            ("kv_heads", offset_of!(SegParams, kv_heads)),
            ("seg_cap", offset_of!(SegParams, seg_cap)),
            ("limit", offset_of!(SegParams, limit)),
            ("n", offset_of!(SegParams, n)),
            ("b0", offset_of!(SegParams, b0)),
            ("seg0", offset_of!(SegParams, seg0)),
            ("t0", offset_of!(SegParams, t0)),
            ("t1", offset_of!(SegParams, t1)),
            ("_pad0", offset_of!(SegParams, _pad0)),
            ("_pad1", offset_of!(SegParams, _pad1)),
            ("_pad2", offset_of!(SegParams, _pad2)),
        ],
    );
    check(
        Source::CacheSegments,
        "MergeSegParams",
        size_of::<MergeSegParams>(),
        &[
            ("q_heads", offset_of!(MergeSegParams, q_heads)),
            ("n", offset_of!(MergeSegParams, n)),
            ("b0", offset_of!(MergeSegParams, b0)),
            ("nseg", offset_of!(MergeSegParams, nseg)),
            ("nseq", offset_of!(MergeSegParams, nseq)),
            ("_pad0", offset_of!(MergeSegParams, _pad0)),
            ("_pad1", offset_of!(MergeSegParams, _pad1)),
            ("_pad2", offset_of!(MergeSegParams, _pad2)),
            ("splits", offset_of!(MergeSegParams, splits)),
            ("ml_base", offset_of!(MergeSegParams, ml_base)),
        ],
    );
}

/// The unchecked production shaders give the same bits as the same shaders built with naga's
/// runtime bounds checks (a stray out-of-bounds access would differ or be clamped).
/// The decode forms that are on by default keep their old forms as fallbacks: one shared
/// partials buffer for a cache's sequence groups (`SELATTN_DECODE_GROUP_PARTS=0`) and no loads a
/// tile ahead in the attend kernel (`SELATTN_DECODE_PREFETCH=0`). The reference tests that reach
/// them run again with both, in a child process.
#[test]
fn fallback_forms_match_reference() {
    rerun_with_env(
        &[
            "decode_matches_reference_without_pruning",
            "multi_buffer_cache_matches_reference",
            "segmented_cache_matches_reference",
        ],
        &[
            ("SELATTN_DECODE_GROUP_PARTS", "0"),
            ("SELATTN_DECODE_PREFETCH", "0"),
        ],
    );
}

#[test]
fn bounds_checked_build_gives_same_bits() {
    let case = Case {
        budget: Some(10),
        selective: Some(1),
        splits: Some(3),
        ..Case::new(4, 2, 32).all()
    };
    // Sequences in 3 segments of 14 slots, the budget over all three.
    let segmented = Case {
        budget: Some(30),
        segment: Some(16),
        prefill: vec![27, 12],
        ..case.clone()
    };
    // Sequences in 2 groups of buffers (with SELATTN_DECODE_GROUP_PARTS=1, partials per group).
    let grouped = Case {
        batch: 3,
        group: Some(2),
        selective: None,
        prefill: vec![5, 9, 2],
        ..case.clone()
    };
    for (a, why) in selattn::adapters() {
        if why.is_some() {
            continue;
        }
        for case in [&case, &segmented, &grouped] {
            let plain = Context::from_adapter(&a).unwrap();
            let checked = Context::from_adapter(&a).unwrap().with_bounds_checks(true);
            let (m0, o0) = run_case(&plain, case, 5);
            let (m1, o1) = run_case(&checked, case, 5);
            assert!(m0.is_empty() && m1.is_empty(), "{m0:?} {m1:?}");
            for (k, (x, y)) in o0.iter().zip(&o1).enumerate() {
                assert!(
                    common::same_up_to_contraction(&plain, x, y),
                    "[{}] {}: output {k} differs with bounds checks on",
                    plain.describe(),
                    case.name()
                );
            }
        }
    }
}

/// Every decode and cache kernel variant, specialised, is translated by naga to SPIR-V (checked
/// with spirv-val where installed), MSL, HLSL and (f32) GLSL, so the Metal, DX12 and GL paths are
/// at least compiled here.
#[test]
fn decode_shaders_translate_to_every_backend() {
    use naga::back::{glsl, hlsl, msl, spv};
    use selattn::kernels::decode::{AppendConfig, AttendConfig, MergeConfig, ScoreConfig};
    use selattn::kernels::{Kernel, KernelKey};
    let mut kernels = vec![];
    for flags in [false, true] {
        let append = AppendConfig {
            d: 64,
            wg: 256,
            gate: flags,
            f: flags,
        };
        kernels.push(Kernel::CacheAppend(append));
        kernels.push(Kernel::CachePut(append));
        kernels.push(Kernel::CachePutState(append));
        kernels.push(Kernel::CacheCandidates(append));
        kernels.push(Kernel::DecodeAttend(AttendConfig {
            d: 128,
            wg: if flags { 256 } else { 64 },
            rb: if flags { 4 } else { 16 },
            half: flags,
            features: AttendConfig::switches(if flags { Switches::ALL } else { Switches::NONE }),
            prefetch: flags,
        }));
        kernels.push(Kernel::DecodeMerge(MergeConfig {
            d: 64,
            wg: 64,
            features: MergeConfig::switches(Switches {
                lse: flags,
                ..Switches::NONE
            }),
        }));
        kernels.push(Kernel::CacheMergeSegments(MergeConfig {
            d: 64,
            wg: 64,
            features: MergeConfig::switches(Switches {
                lse: flags,
                ..Switches::NONE
            }),
        }));
    }
    kernels.push(Kernel::DecodeScore(ScoreConfig { d: 32, wg: 64 }));
    let spirv_val = std::process::Command::new("spirv-val")
        .arg("--version")
        .output()
        .is_ok();
    for kernel in kernels {
        for elem in [DType::F32, DType::F16] {
            let key = KernelKey { kernel, elem };
            let name = format!("{key:?}");
            let text = key.wgsl().unwrap();
            let module = naga::front::wgsl::parse_str(&text)
                .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&text)));
            let mut validator = naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            );
            let info = validator
                .validate(&module)
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
            let constants: naga::back::PipelineConstants = key
                .constants()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            let ep = (naga::ShaderStage::Compute, key.entry());
            let (module, info) = naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some(ep),
                &constants,
            )
            .unwrap_or_else(|e| panic!("{name}: overrides: {e:?}"));
            let words = spv::write_vec(
                &module,
                &info,
                &spv::Options::default(),
                Some(&spv::PipelineOptions {
                    shader_stage: naga::ShaderStage::Compute,
                    entry_point: key.entry().into(),
                }),
            )
            .unwrap_or_else(|e| panic!("{name}: SPIR-V: {e}"));
            if spirv_val {
                let path = std::env::temp_dir().join(format!(
                    "selattn-decode-{}-{}.spv",
                    std::process::id(),
                    key.entry()
                ));
                std::fs::write(&path, bytemuck::cast_slice::<u32, u8>(&words)).unwrap();
                let out = std::process::Command::new("spirv-val")
                    .arg(&path)
                    .output()
                    .unwrap();
                let _ = std::fs::remove_file(&path);
                assert!(
                    out.status.success(),
                    "{name}: spirv-val: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let msl_opts = msl::Options {
                lang_version: (2, 4),
                ..Default::default()
            };
            msl::write_string(
                &module,
                &info,
                &msl_opts,
                &msl::PipelineOptions {
                    entry_point: Some((naga::ShaderStage::Compute, key.entry().into())),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{name}: MSL: {e}"));
            let hlsl_opts = hlsl::Options {
                shader_model: hlsl::ShaderModel::V6_2,
                ..Default::default()
            };
            let hlsl_pipe = hlsl::PipelineOptions {
                entry_point: Some((naga::ShaderStage::Compute, key.entry().into())),
            };
            let mut out = String::new();
            hlsl::Writer::new(&mut out, &hlsl_opts, &hlsl_pipe)
                .write(&module, &info, None)
                .unwrap_or_else(|e| panic!("{name}: HLSL: {e}"));
            if elem == DType::F32 {
                let mut out = String::new();
                let opts = glsl::Options {
                    version: glsl::Version::Desktop(430),
                    ..Default::default()
                };
                let pipe = glsl::PipelineOptions {
                    shader_stage: naga::ShaderStage::Compute,
                    entry_point: key.entry().into(),
                    multiview: None,
                };
                glsl::Writer::new(
                    &mut out,
                    &module,
                    &info,
                    &opts,
                    &pipe,
                    naga::proc::BoundsCheckPolicies::default(),
                )
                .and_then(|mut w| w.write())
                .unwrap_or_else(|e| panic!("{name}: GLSL: {e}"));
            }
        }
    }
}

/// The planner's defaults on a discrete GPU like the H200 are the configurations measured there
/// (BENCHMARKS.md, 2026-12-03): 128 threads for B16 x 16384 (5 splits), 256 for B16 x 65536 (17
/// splits) and B1 x 131072 (33 splits); f16, D128, Hq 32, Hkv 8, one query.
#[test]
fn planner_defaults_on_a_discrete_gpu() {
    use selattn::kernels::decode::{plan, DecodeShape};
    let mut caps = contexts()[0].capabilities().clone();
    caps.info.device_type = wgpu::DeviceType::DiscreteGpu;
    caps.max_invocations = 1024;
    caps.workgroup_memory = 48 << 10;
    caps.max_workgroups_per_dim = 65535;
    caps.max_storage_binding = 2 << 30;
    caps.max_buffer = 1 << 40;
    for (batch, max_len, wg, splits) in [
        (16, 16685, 128, 5),
        (16, 65637, 256, 17),
        (1, 131373, 256, 33),
    ] {
        let shape = DecodeShape {
            batch,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            n: 1,
            capacity: max_len,
            max_len,
        };
        let p = plan(
            &caps,
            shape,
            true,
            0.1,
            selattn::Switches::NONE,
            0,
            None,
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            (p.attend.wg, p.attend.rb, p.params.splits),
            (wg, 4, splits),
            "B{batch} x {max_len}"
        );
        // An explicit thread count is kept.
        let q = plan(
            &caps,
            shape,
            true,
            0.1,
            selattn::Switches::NONE,
            0,
            None,
            Some(256),
            None,
        )
        .unwrap();
        assert_eq!(q.attend.wg, 256);
    }
}
