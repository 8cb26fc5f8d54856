//! Seeded randomized misuse (issue 9): thousands of calls mixing valid and invalid shapes,
//! element types, options, tensors of another device, odd and destroyed buffers, cache steps,
//! appends, resets, truncations, checkpoints and rollbacks, with and without per-sequence counts. Each call must either return a typed error and change nothing (cache
//! lengths, positions and slots; outputs left as they were), or succeed with the reference's
//! result. Prints the counts. `SELATTN_MISUSE_CALLS` sets the number of calls per adapter
//! (default 20000, and at most 45 s per adapter so CI time stays bounded).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{compare, contexts, Rng};
use selattn::reference::HostInputs;
use selattn::reference_cache::{HostQueries, HostTokens, RefCache, RefSeq};
use selattn::{
    Checkpoint, Context, DType, DecodeOptions, Error, Inputs, KvCache, KvCacheConfig, Options,
    Outputs, Shape, Step, Tensor, Tokens,
};

/// What happened to one call.
#[derive(Default)]
struct Counts {
    calls: u64,
    errors: BTreeMap<String, u64>,
    checked: u64,
    gpu_calls: u64,
    failures: Vec<String>,
}

impl Counts {
    fn error(&mut self, e: &Error) {
        let name = format!("{e:?}");
        let variant = name
            .split(|c: char| !c.is_alphanumeric())
            .next()
            .unwrap_or("")
            .to_string();
        *self.errors.entry(variant).or_default() += 1;
    }
    fn fail(&mut self, s: String) {
        if self.failures.len() < 20 {
            self.failures.push(s);
        }
    }
}

/// A cache's lengths, positions and evictions: what a refused call must leave as they were.
type HostState = (Vec<u32>, Vec<u64>, Vec<u64>);

/// One way to spoil a call, or none.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Spoil {
    None,
    ShapeOf(usize),
    DTypeOf(usize),
    HeadDim,
    Heads,
    Scale(f32),
    Start,
    SelectiveNotCausal,
    SelectionHead,
    F0WithoutSelective,
    AliasOut,
    Foreign(usize),
    Destroyed,
    ForceCoopF32,
}

fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> T {
    xs[rng.below(xs.len() as u32) as usize]
}

struct World<'a> {
    ctx: &'a Context,
    other: &'a Context,
    rng: Rng,
    counts: Counts,
}

const NAMES: [&str; 8] = ["q", "k", "v", "tau", "alpha", "gate", "kv_len", "f0"];

impl World<'_> {
    fn up(&self, ctx: &Context, dims: &[u64], x: &[f32], dtype: DType) -> Tensor {
        match dtype {
            DType::F16 => ctx.upload_f16(dims, x).unwrap(),
            _ => ctx.upload(dims, x).unwrap(),
        }
    }

    /// One prefill call, valid or spoiled in one way.
    fn attention(&mut self) {
        let r = &mut self.rng;
        let mut shape = Shape::new(1 + r.below(2), 1 + r.below(2), 1 + r.below(9), 8);
        shape.kv_heads = if shape.q_heads.is_multiple_of(2) && r.below(2) == 0 {
            1
        } else {
            shape.q_heads
        };
        shape.k_len = shape.q_len + r.below(6);
        // A few feature sets, so that few pipelines are compiled and most time goes to calls:
        // (causal, tau, alpha, gate, kv_len, selective).
        let (causal, tau, alpha, gate, kv_len, selective) = pick(
            r,
            &[
                (true, false, false, false, false, false),
                (true, true, true, true, false, false),
                (false, false, false, false, true, false),
                (true, false, false, false, true, true),
            ],
        );
        let mut opts = if causal {
            Options::causal()
        } else {
            Options::new()
        };
        if selective {
            opts = opts.selective(r.below(shape.q_heads));
        }
        if r.below(3) == 0 {
            opts = opts.scale(0.05 + r.uniform() as f32);
        }
        let f16 = self.ctx.capabilities().f16 && !selective && !tau && r.below(6) == 0;
        // Valid calls sometimes read Q from an application's buffer larger than the tensor.
        let big_q = r.below(6) == 0;
        let mut elem = if f16 { DType::F16 } else { DType::F32 };
        let spoil = match r.below(16) {
            0..=4 => Spoil::None,
            5 => Spoil::ShapeOf(r.below(8) as usize),
            6 => Spoil::DTypeOf(r.below(8) as usize),
            7 => Spoil::HeadDim,
            8 => Spoil::Heads,
            9 => Spoil::Scale(pick(r, &[0.0, -1.0, f32::NAN, f32::INFINITY])),
            10 => Spoil::Start,
            11 => Spoil::SelectiveNotCausal,
            12 => Spoil::SelectionHead,
            13 => Spoil::F0WithoutSelective,
            14 => Spoil::AliasOut,
            _ => match r.below(3) {
                0 => Spoil::Foreign(r.below(8) as usize),
                1 => Spoil::ForceCoopF32,
                _ => Spoil::Destroyed,
            },
        };
        // Spoils that live in the shape or options.
        match spoil {
            Spoil::HeadDim => shape.head_dim = pick(r, &[4, 12, 264]),
            Spoil::Heads => {
                shape.q_heads = 3;
                shape.kv_heads = 2;
            }
            Spoil::Scale(s) => opts = opts.scale(s),
            Spoil::Start => {
                opts.causal = true;
                opts = opts.start(shape.k_len - shape.q_len + 1);
            }
            Spoil::SelectiveNotCausal => {
                opts.causal = false;
                opts.selective = Some(0);
            }
            // The cooperative path takes f16 only.
            Spoil::ForceCoopF32 => {
                opts = opts.path(selattn::Path::Coop);
                elem = DType::F32;
            }
            Spoil::SelectionHead => {
                opts.causal = true;
                opts.selective = Some(shape.q_heads + r.below(3));
            }
            _ => {}
        }
        if spoil == Spoil::F0WithoutSelective {
            opts.selective = None;
        }
        let selective = opts.selective.is_some();
        let seed = r.next_u64();
        let controls = common::Switches {
            tau,
            alpha,
            gate,
            kv_len,
            ..common::Switches::NONE
        };
        let mut x: HostInputs = common::random_inputs(&shape, controls, seed);
        if selective || spoil == Spoil::F0WithoutSelective {
            let mut rr = Rng::new(seed ^ 1);
            x.f0 = Some(rr.range(0.0, 1.0, (shape.batch * shape.k_len) as usize));
        }
        if f16 {
            x.q = selattn_tools::testing::round_f16(&x.q);
            x.k = selattn_tools::testing::round_f16(&x.k);
            x.v = selattn_tools::testing::round_f16(&x.v);
        }
        let ctx = self.ctx;
        let foreign = |i: usize| matches!(spoil, Spoil::Foreign(j) if j == i);
        let on = |i: usize| if foreign(i) { self.other } else { ctx };
        let mut dims = [
            shape.q_dims(),
            shape.kv_dims(),
            shape.kv_dims(),
            shape.row_dims(),
            shape.alpha_dims(),
            shape.gate_dims(),
            shape.kv_len_dims(),
            shape.f_dims(),
        ];
        if let Spoil::ShapeOf(i) = spoil {
            let a = self.rng.below(dims[i].len() as u32) as usize;
            dims[i][a] += 1;
        }
        let dims_of = |i: usize| dims[i].clone();
        let dtype_of = |i: usize, natural: DType| {
            if spoil == Spoil::DTypeOf(i) {
                match natural {
                    DType::U32 => DType::F32,
                    _ => DType::U32,
                }
            } else {
                natural
            }
        };
        let make = |w: &World, i: usize, d: Vec<u64>, data: &[f32], natural: DType| {
            let c = on(i);
            let n = d.iter().product::<u64>() as usize;
            let mut data = data.to_vec();
            data.resize(n, 0.5);
            match dtype_of(i, natural) {
                DType::U32 => {
                    let u: Vec<u32> = data.iter().map(|&v| v as u32).collect();
                    c.upload_u32(&d, &u).unwrap()
                }
                dt => w.up(c, &d, &data, dt),
            }
        };
        let mut q = make(self, 0, dims_of(0), &x.q, elem);
        if big_q && spoil == Spoil::None {
            let bytes = q.bytes().div_ceil(4) * 4;
            let buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("application buffer"),
                size: bytes + 256,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            enc.copy_buffer_to_buffer(q.buffer(), 0, &buf, 0, bytes);
            ctx.queue.submit([enc.finish()]);
            q = Tensor::from_buffer(ctx, buf, q.shape(), q.dtype()).unwrap();
        }
        let k = make(self, 1, dims_of(1), &x.k, elem);
        let v = make(self, 2, dims_of(2), &x.v, elem);
        let opt = |w: &World, i: usize, d: Vec<u64>, data: &Option<Vec<f32>>| {
            data.as_ref().map(|t| make(w, i, d, t, DType::F32))
        };
        let tau_t = opt(self, 3, dims_of(3), &x.tau);
        let alpha_t = opt(self, 4, dims_of(4), &x.alpha);
        let gate_t = opt(self, 5, dims_of(5), &x.gate);
        let kv_t = x.kv_len.as_ref().map(|l| {
            let f: Vec<f32> = l.iter().map(|&v| v as f32).collect();
            make(self, 6, dims_of(6), &f, DType::U32)
        });
        let f0_t = opt(self, 7, dims_of(7), &x.f0);
        let o = ctx.empty(&shape.q_dims(), elem).unwrap();
        let lse = ctx.empty(&shape.row_dims(), DType::F32).unwrap();
        let f_out = ctx.empty(&shape.f_dims(), DType::F32).unwrap();
        for t in [&o, &lse, &f_out] {
            ctx.poison(t).unwrap();
        }
        if spoil == Spoil::Destroyed {
            v.buffer().destroy();
        }
        let inputs = Inputs {
            q: &q,
            k: &k,
            v: &v,
            tau: tau_t.as_ref(),
            alpha: alpha_t.as_ref(),
            gate: gate_t.as_ref(),
            kv_len: kv_t.as_ref(),
            f0: f0_t.as_ref(),
        };
        let mut outs = Outputs::new(&o).lse(&lse);
        if selective {
            outs = outs.f_out(&f_out);
        }
        let alias = Tensor::from_buffer(ctx, q.buffer().clone(), &shape.row_dims(), DType::F32);
        let alias = alias.unwrap();
        if spoil == Spoil::AliasOut {
            outs.lse = Some(&alias);
        }
        // A spoil aimed at an absent optional input spoils nothing.
        let present = [true, true, true, tau, alpha, gate, kv_len, x.f0.is_some()];
        let spoiled = match spoil {
            Spoil::None => false,
            Spoil::ShapeOf(i) | Spoil::DTypeOf(i) | Spoil::Foreign(i) => present[i],
            Spoil::HeadDim => true,
            _ => true,
        };
        self.counts.calls += 1;
        let res = ctx.attention(&inputs, &opts, &outs);
        if spoiled {
            let what = format!("attention spoiled by {spoil:?} ({})", NAMES[0]);
            if self.expect_err(res, &what) && self.rng.below(4) == 0 {
                // Nothing was written.
                let got = ctx.download(&o).unwrap();
                if got.iter().any(|v| !v.is_nan()) {
                    self.counts.fail(format!("{what}: O was written"));
                }
            }
            return;
        }
        self.counts.gpu_calls += 1;
        if let Err(e) = res {
            self.counts.fail(format!(
                "valid attention {shape:?} {opts:?} {elem:?} failed: {e}"
            ));
            return;
        }
        let want = common::run_ref(&shape, &x, &opts);
        let gpu = common::GpuOut {
            o: ctx.download(&o).unwrap(),
            lse: ctx.download(&lse).unwrap(),
            f_out: if selective {
                ctx.download(&f_out).unwrap()
            } else {
                vec![]
            },
        };
        let tol = if f16 { 5e-3 } else { 2e-5 };
        match common::check_case("misuse", ctx, &gpu, &want, tol) {
            None => self.counts.checked += 1,
            Some(m) => self
                .counts
                .fail(format!("{m} ({shape:?} {opts:?} {elem:?})")),
        }
    }

    /// Counts an expected error; records a failure for a success. True when it was an error.
    fn expect_err(&mut self, r: selattn::Result<()>, what: &str) -> bool {
        match r {
            Ok(()) => {
                self.counts.fail(format!("{what}: accepted"));
                false
            }
            Err(e) => {
                self.counts.error(&e);
                true
            }
        }
    }

    /// A refused cache call: counts `e`, which must be the error wanted (`right`), and the cache
    /// must be as it was (`before`).
    fn refused(&mut self, cw: &CacheWorld, before: &HostState, e: &Error, right: bool, call: &str) {
        self.counts.error(e);
        if !right {
            self.counts.fail(format!("{call}: wrong error {e:?}"));
        }
        self.unmoved(cw, before, call);
    }

    /// After a refused cache call: the cache must be as it was (`before`).
    fn unmoved(&mut self, cw: &CacheWorld, before: &HostState, call: &str) {
        if cw.host_state() != *before {
            self.counts.fail(format!("refused {call} moved the cache"));
        }
    }

    /// Tensor construction and transfer misuse: sizes that overflow or are zero, lengths that
    /// disagree, buffers without a usage or too small, another device's tensors.
    fn tensors(&mut self) {
        let ctx = self.ctx;
        let r = &mut self.rng;
        let kind = r.below(8);
        let res: selattn::Result<()> = match kind {
            0 => ctx
                .empty(&[(1 << 63) + r.below(4) as u64, 2], DType::F32)
                .map(|_| ()),
            1 => ctx.empty(&[3, 0, 2], DType::F16).map(|_| ()),
            2 => ctx.upload(&[2, 3], &[1.0; 5]).map(|_| ()),
            3 => {
                let b = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: 4 * (1 + r.below(8) as u64),
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                });
                let t = Tensor::from_buffer(ctx, b, &[1], DType::F32).unwrap();
                ctx.download(&t).map(|_| ())
            }
            4 => {
                let b = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: 6,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                });
                Tensor::from_buffer(ctx, b, &[3], DType::F16).map(|_| ())
            }
            5 => {
                let t = self.other.upload(&[4], &[1.0; 4]).unwrap();
                ctx.download(&t).map(|_| ())
            }
            6 => {
                let t = ctx.upload(&[4], &[1.0; 4]).unwrap();
                t.buffer().destroy();
                ctx.download(&t).map(|_| ())
            }
            _ => {
                let b = ctx.empty(&[4], DType::F32).unwrap().buffer().clone();
                Tensor::from_buffer(ctx, b, &[1 << 40, 1 << 30], DType::F32).map(|_| ())
            }
        };
        self.counts.calls += 1;
        self.expect_err(res, &format!("tensor misuse {kind}"));
    }
}

/// The cache under test and its reference.
struct CacheWorld {
    cache: KvCache,
    reference: RefCache,
    /// Per sequence, the position after the last query that ran with selective masking since
    /// the reset (0: none): truncating below it is refused.
    touched: Vec<u64>,
    /// Per sequence: its live checkpoint with the reference sequence and selective mark then.
    cps: Vec<Option<(Checkpoint, RefSeq, u64)>>,
    /// Per sequence: the last checkpoint a reset, a newer checkpoint or a truncation made stale.
    stale: Vec<Option<Checkpoint>>,
}

impl CacheWorld {
    /// A cache of 2 sequences of 10 slots, with a budget of 6 or none; `segmented`: each
    /// sequence stored in segments of 4, 4 and 2 slots (buffers of at most 4 slots' K).
    fn new(ctx: &Context, budget: bool, segmented: bool) -> CacheWorld {
        let mut cfg = KvCacheConfig::new(2, 1, 8, 10);
        if budget {
            cfg = cfg.budget(6);
        }
        if segmented {
            cfg = cfg.max_buffer_bytes(4 * 8 * 4);
        }
        CacheWorld {
            cache: KvCache::new(ctx, cfg).unwrap(),
            reference: RefCache::new(cfg).unwrap(),
            touched: vec![0; cfg.batch as usize],
            cps: vec![None; cfg.batch as usize],
            stale: vec![None; cfg.batch as usize],
        }
    }

    /// Sequence `b`'s checkpoint, if any, is stale from now on.
    fn drop_checkpoint(&mut self, b: usize) {
        if let Some((cp, ..)) = self.cps[b].take() {
            self.stale[b] = Some(cp);
        }
    }

    fn host_state(&self) -> HostState {
        (
            self.cache.lens().to_vec(),
            self.cache.positions().to_vec(),
            self.cache.evictions().to_vec(),
        )
    }

    /// The cache's host state and its slots' positions agree with the reference.
    fn agrees(&self, ctx: &Context, slots: bool) -> Result<(), String> {
        let r = &self.reference;
        let lens: Vec<u32> = r.seqs.iter().map(|s| s.slots.len() as u32).collect();
        let pos: Vec<u64> = r.seqs.iter().map(|s| s.next_pos).collect();
        if self.cache.lens() != lens.as_slice() || self.cache.positions() != pos.as_slice() {
            return Err(format!(
                "lens {:?} positions {:?}, reference {lens:?} {pos:?}",
                self.cache.lens(),
                self.cache.positions()
            ));
        }
        if slots {
            let st = self.cache.download_state(ctx).map_err(|e| e.to_string())?;
            let cap = self.cache.config().capacity as usize;
            for (b, seq) in r.seqs.iter().enumerate() {
                let got: Vec<u64> = (0..seq.slots.len())
                    .map(|j| st.pos[b * cap + j] as u64)
                    .collect();
                let want: Vec<u64> = seq.slots.iter().map(|s| s.pos).collect();
                if got != want {
                    return Err(format!("seq {b} slot positions {got:?} vs {want:?}"));
                }
                let f: Vec<f32> = (0..seq.slots.len()).map(|j| st.f[b * cap + j]).collect();
                let rf: Vec<f64> = seq.slots.iter().map(|s| s.f).collect();
                let c = compare(&f, &rf, 1e-4, 1e-4);
                if c.bad > 0 {
                    return Err(format!("seq {b} selective state {c:?}"));
                }
            }
        }
        Ok(())
    }
}

impl World<'_> {
    /// A truncation of `cw`, in range or not: refused with the right typed error and nothing
    /// changed, or done and equal to the reference's.
    fn truncate(&mut self, cw: &mut CacheWorld) {
        let r = &mut self.rng;
        let s = r.below(3);
        let pos = cw.cache.positions().get(s as usize).copied().unwrap_or(4);
        let len = r.below(pos as u32 + 2) as u64;
        let before = cw.host_state();
        self.counts.calls += 1;
        let res = cw.cache.truncate_sequence(s, len);
        let b = s as usize;
        let refused = if b >= cw.touched.len() {
            Some("index out of range")
        } else if len > pos {
            Some("past the end")
        } else if len == pos {
            None
        } else if cw.cache.evictions()[b] > 0 {
            Some("after eviction")
        } else if cw.touched[b] > len {
            Some("below a selective query")
        } else {
            None
        };
        match (refused, res) {
            (Some(why), Err(e)) => {
                let right = if b >= cw.touched.len() {
                    matches!(e, Error::LengthMismatch { .. })
                } else {
                    matches!(e, Error::CannotTruncate { .. })
                };
                self.refused(cw, &before, &e, right, &format!("truncate ({why})"));
            }
            (Some(why), Ok(())) => self.counts.fail(format!("truncate {why}: accepted")),
            (None, Err(e)) => self
                .counts
                .fail(format!("valid truncate of {s} to {len} failed: {e}")),
            (None, Ok(())) => {
                cw.reference.truncate(b, len);
                if cw.cps[b]
                    .as_ref()
                    .is_some_and(|(cp, ..)| cp.position() > len)
                {
                    cw.drop_checkpoint(b);
                }
                match cw.agrees(self.ctx, self.rng.below(8) == 0) {
                    Ok(()) => self.counts.checked += 1,
                    Err(m) => self.counts.fail(format!("after truncate: {m}")),
                }
            }
        }
    }

    /// A checkpoint (`take`; of a sequence in range or not) or a rollback (to a live checkpoint,
    /// or to a stale one): refused with the right typed error and nothing changed, or done and
    /// equal to the reference's.
    fn checkpoint_call(&mut self, cw: &mut CacheWorld, take: bool) {
        let r = &mut self.rng;
        let before = cw.host_state();
        if take {
            let s = r.below(3);
            self.counts.calls += 1;
            match (cw.cache.checkpoint(self.ctx, s), cw.cps.get(s as usize)) {
                (Ok(cp), Some(_)) => {
                    let b = s as usize;
                    cw.drop_checkpoint(b);
                    cw.cps[b] = Some((cp, cw.reference.seqs[b].clone(), cw.touched[b]));
                    if cw.host_state() != before || cp.position() != cw.reference.seqs[b].next_pos {
                        self.counts
                            .fail(format!("checkpoint of {s} moved the cache"));
                    }
                }
                (Ok(_), None) => self.counts.fail(format!("checkpoint of {s}: accepted")),
                (Err(e), None) => {
                    let right = matches!(e, Error::LengthMismatch { .. });
                    self.refused(cw, &before, &e, right, "checkpoint out of range");
                }
                (Err(e), Some(_)) => self.counts.fail(format!("checkpoint of {s} failed: {e}")),
            }
            return;
        }
        let b = r.below(2) as usize;
        let live = r.below(4) != 0;
        match (&cw.cps[b], cw.stale[b]) {
            (Some((cp, seq, t)), _) if live || cw.stale[b].is_none() => {
                self.counts.calls += 1;
                match cw.cache.rollback(self.ctx, cp) {
                    Ok(()) => {
                        cw.reference.seqs[b] = seq.clone();
                        cw.touched[b] = *t;
                        match cw.agrees(self.ctx, self.rng.below(2) == 0) {
                            Ok(()) => self.counts.checked += 1,
                            Err(m) => self.counts.fail(format!("after rollback: {m}")),
                        }
                    }
                    Err(e) => self
                        .counts
                        .fail(format!("valid rollback of {b} failed: {e}")),
                }
            }
            (_, Some(old)) => {
                self.counts.calls += 1;
                match cw.cache.rollback(self.ctx, &old) {
                    Err(e) => {
                        let right = matches!(e, Error::StaleCheckpoint { .. });
                        self.refused(cw, &before, &e, right, "stale rollback");
                    }
                    Ok(()) => self.counts.fail("stale rollback: accepted".into()),
                }
            }
            _ => {}
        }
    }

    /// A decode step, append, reset or truncation on `cw`, valid or spoiled in one way.
    fn cache_call(&mut self, cw: &mut CacheWorld) {
        let ctx = self.ctx;
        let cfg = *cw.cache.config();
        let (b, d) = (cfg.batch as usize, cfg.head_dim as usize);
        let r = &mut self.rng;
        let what = r.below(12);
        if what >= 10 {
            return self.checkpoint_call(cw, what == 10);
        }
        if what == 0 {
            // Resets, in and out of range.
            let s = r.below(4);
            if s == 3 {
                cw.cache.reset();
                for seq in &mut cw.reference.seqs {
                    *seq = Default::default();
                }
                cw.touched.fill(0);
                for b in 0..cw.cps.len() {
                    cw.drop_checkpoint(b);
                }
            } else if let Some(seq) = cw.reference.seqs.get_mut(s as usize) {
                if let Err(e) = cw.cache.reset_sequence(s) {
                    self.counts
                        .fail(format!("valid reset of sequence {s} failed: {e}"));
                }
                *seq = Default::default();
                cw.touched[s as usize] = 0;
                cw.drop_checkpoint(s as usize);
            } else {
                let before = cw.host_state();
                if self.expect_err(cw.cache.reset_sequence(s), "reset out of range") {
                    self.unmoved(cw, &before, "reset out of range");
                }
            }
            self.counts.calls += 1;
            return;
        }
        if what == 1 {
            return self.truncate(cw);
        }
        let n = 1 + r.below(2) as usize;
        let hq = 2usize;
        let t = HostTokens {
            n,
            k: r.normals(b * n * d),
            v: r.normals(b * n * d),
            gate: None,
            f: None,
        };
        let spoil = r.below(13);
        let before = cw.host_state();
        let kvd = [b as u64, 1, n as u64, d as u64];
        let k = ctx.upload(&kvd, &t.k).unwrap();
        let v = ctx.upload(&kvd, &t.v).unwrap();
        let foreign_k = self.other.upload(&kvd, &t.k).unwrap();
        let own_k = cw.cache.k().clone();
        let own_v = cw.cache.v().clone();
        if what <= 3 {
            // Append.
            let counts: Vec<u32> = (0..b).map(|_| r.below(n as u32 + 1)).collect();
            let use_counts = r.below(2) == 0;
            let mut tk = Tokens::new(&k, &v);
            let mut bad_counts = counts.clone();
            let spoiled = match spoil {
                0 => {
                    tk.k = &foreign_k;
                    true
                }
                1 => {
                    bad_counts.push(1);
                    true
                }
                2 => {
                    bad_counts[0] = n as u32 + 1;
                    true
                }
                3 => {
                    tk.v = &own_k;
                    true
                }
                _ => false,
            };
            let c_arg = if spoiled && (spoil == 1 || spoil == 2) {
                Some(bad_counts.as_slice())
            } else if use_counts {
                Some(counts.as_slice())
            } else {
                None
            };
            let would_fill = cw.cache.lens().iter().enumerate().any(|(s, &l)| {
                let add = c_arg.map_or(n as u32, |c| c.get(s).copied().unwrap_or(0));
                cfg.budget.is_none() && l + add > cfg.capacity
            });
            self.counts.calls += 1;
            let res = cw.cache.append(ctx, &tk, c_arg);
            if spoiled || would_fill {
                let call = format!("append spoil {spoil}");
                if self.expect_err(res, &call) {
                    self.unmoved(cw, &before, &call);
                }
            } else {
                self.counts.gpu_calls += 1;
                match res {
                    Ok(()) => {
                        cw.reference.append(&t, c_arg).unwrap();
                        match cw.agrees(ctx, self.rng.below(4) == 0) {
                            Ok(()) => self.counts.checked += 1,
                            Err(m) => self.counts.fail(format!("after append: {m}")),
                        }
                    }
                    Err(e) => self.counts.fail(format!("valid append failed: {e}")),
                }
            }
            return;
        }
        // Decode step.
        let n_q = n;
        let qd = [b as u64, hq as u64, n_q as u64, d as u64];
        let xq = HostQueries {
            q_heads: hq,
            q: r.normals(b * hq * n_q * d),
            tau: None,
            alpha: None,
        };
        let q = ctx.upload(&qd, &xq.q).unwrap();
        let o = ctx.empty(&qd, DType::F32).unwrap();
        let lse = ctx
            .empty(&[b as u64, hq as u64, n_q as u64], DType::F32)
            .unwrap();
        ctx.poison(&o).unwrap();
        let mut opts = DecodeOptions::new();
        if r.below(3) == 0 {
            opts = opts.selective(r.below(hq as u32));
        }
        let stale: Vec<u64> = cw.cache.positions().iter().map(|p| p + 1).collect();
        let good_pos = cw.cache.positions().to_vec();
        let wrong_q = ctx
            .upload(
                &[b as u64, hq as u64, 9, d as u64],
                &vec![0.0; b * hq * 9 * d],
            )
            .unwrap();
        let q16;
        // Per-sequence counts: valid (some 0, uneven) or, as spoil 9, of the wrong length or
        // over n.
        let counts: Vec<u32> = (0..b).map(|_| r.below(n as u32 + 1)).collect();
        let mut bad_counts = counts.clone();
        if r.below(2) == 0 {
            bad_counts.truncate(r.below(b as u32) as usize);
        } else {
            bad_counts[r.below(b as u32) as usize] = n as u32 + 1 + r.below(3);
        }
        let use_counts = r.below(2) == 0;
        let mut step = Step::new(&q, &k, &v).positions(&good_pos);
        if use_counts {
            step = step.counts(&counts);
        }
        // Over capacity without a budget: refused.
        let full = cw.cache.lens().iter().enumerate().any(|(s, &l)| {
            let add = if use_counts { counts[s] } else { n as u32 };
            cfg.budget.is_none() && l + add > cfg.capacity
        });
        let mut outs = Outputs::new(&o).lse(&lse);
        let spoiled = match spoil {
            0 => {
                step.k = &foreign_k;
                true
            }
            1 => {
                step.positions = Some(&stale);
                true
            }
            2 => {
                step.q = &wrong_q;
                true
            }
            3 => {
                outs.o = &own_v;
                true
            }
            4 => {
                opts = opts.scale(pick(r, &[0.0, -2.0, f32::NAN]));
                true
            }
            5 => {
                opts = opts.selective(hq as u32);
                true
            }
            6 => {
                q.buffer().destroy();
                true
            }
            7 => {
                outs.f_out = Some(&lse);
                true
            }
            8 if ctx.capabilities().f16 => {
                q16 = ctx.upload_f16(&qd, &xq.q).unwrap();
                step.q = &q16;
                true
            }
            9 => {
                step.counts = Some(&bad_counts);
                true
            }
            _ => false,
        };
        self.counts.calls += 1;
        let res = cw.cache.step(ctx, &step, &opts, &outs);
        if spoiled || full {
            let call = format!("step spoil {spoil}");
            if self.expect_err(res, &call) {
                self.unmoved(cw, &before, &call);
                if self.rng.below(4) == 0 {
                    if let Err(m) = cw.agrees(ctx, true) {
                        self.counts.fail(format!("after failed step {spoil}: {m}"));
                    }
                }
            }
            return;
        }
        self.counts.gpu_calls += 1;
        if let Err(e) = res {
            self.counts.fail(format!("valid step failed: {e}"));
            return;
        }
        let c_arg = use_counts.then_some(counts.as_slice());
        if opts.selective.is_some() {
            for (s, &p) in good_pos.iter().enumerate() {
                let cnt = c_arg.map_or(n as u32, |c| c[s]);
                if cnt > 0 {
                    cw.touched[s] = p + cnt as u64;
                }
            }
        }
        let want = cw
            .reference
            .step_counts(&xq, &t, c_arg, None, opts.selective)
            .unwrap();
        let got = ctx.download(&o).unwrap();
        let c = compare(&got, &want.o, 2e-5, 2e-5);
        if c.bad > 0 {
            self.counts.fail(format!("step O {c:?}"));
        } else {
            match cw.agrees(ctx, self.rng.below(4) == 0) {
                Ok(()) => self.counts.checked += 1,
                Err(m) => self.counts.fail(format!("after step: {m}")),
            }
        }
    }
}

#[test]
fn randomized_misuse() {
    let calls: u64 = std::env::var("SELATTN_MISUSE_CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20000);
    let budget = Duration::from_secs(45);
    let mut all_failures = vec![];
    // Another device: a context of its own over the default adapter.
    let other = Context::new().unwrap();
    for (ci, ctx) in contexts().iter().enumerate() {
        let mut w = World {
            ctx,
            other: &other,
            rng: Rng::new(0x5e1a_77e5 + ci as u64),
            counts: Counts::default(),
        };
        let mut caches = [
            CacheWorld::new(ctx, false, false),
            CacheWorld::new(ctx, true, false),
            CacheWorld::new(ctx, true, true),
        ];
        assert_eq!(caches[2].cache.segments(), 3);
        let t0 = Instant::now();
        while w.counts.calls < calls && t0.elapsed() < budget {
            match w.rng.below(10) {
                0..=3 => w.attention(),
                4 | 5 => w.tensors(),
                x => {
                    let cw = &mut caches[(x % 3) as usize];
                    w.cache_call(cw)
                }
            }
        }
        let c = &w.counts;
        let errors: u64 = c.errors.values().sum();
        println!(
            "misuse [{}]: {} calls in {:.1} s: {} typed errors {:?}; {} valid calls on the GPU, {} results checked against the reference; {} failures",
            ctx.describe(),
            c.calls,
            t0.elapsed().as_secs_f64(),
            errors,
            c.errors,
            c.gpu_calls,
            c.checked,
            c.failures.len()
        );
        for f in &c.failures {
            all_failures.push(format!("[{}] {f}", ctx.describe()));
        }
    }
    assert!(all_failures.is_empty(), "{}", all_failures.join("\n"));
}
