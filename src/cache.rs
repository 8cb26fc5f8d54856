//! A KV cache on the GPU for B sequences, decode steps over it, and context pruning under a
//! memory budget (DESIGN.md §2, "Decode" and "KV cache and context pruning").
//!
//! Each sequence has `capacity` slots. A slot holds, per KV head, a key, a value and a gate, and
//! per sequence the absolute position of its token and its selective state F. Occupied slots are
//! always `0..len`: tokens fill the next free slot until the sequence reaches its limit (the
//! budget, or the capacity without one); after that each new token first evicts the occupied
//! slot with the largest F — never position 0, never the newest token in the cache, ties to the
//! oldest position — and takes its place. With F all zero (no selective masking) that is a
//! sliding window that keeps the first token.
//!
//! The choice of victim is made on the GPU; the host never reads the cache back. What the host
//! keeps — tokens appended, occupied length, evictions per sequence — follows from the calls
//! alone (`len = min(appended, limit)`), so errors such as appending past capacity are found
//! before anything is recorded.
//!
//! The selective state is exact: a decode step adds the scores of its queries to F exactly as a
//! prefill of the whole sequence would (its F_out), and a prefill's F_out can be handed to
//! [`KvCache::append`] so a prefill followed by decode steps matches one long prefill.
//!
//! A cache larger than one buffer may be is split into groups of sequences with buffers of their
//! own; a sequence larger than one buffer is stored in segments (slot ranges, each with buffers of
//! its own), attended per segment and merged exactly ([`KvCache::segments`]).
//!
//! A model holds one cache per layer, each with its own budget. A cache must be used with the
//! [`Context`] that created it.

use crate::kernels::decode::{
    self, AppendConfig, CacheParams, DecodePlan, DecodeShape, SegKernel, MAX_QUERIES,
};
use crate::kernels::gpu::submit;
use crate::spec::SUPPORTED_HEAD_DIMS;
use crate::{Context, DType, Error, Outputs, Result, Tensor};

/// Smallest budget: the first token and the newest are never evicted, so a budget of two would
/// leave nothing to evict.
pub const MIN_BUDGET: u32 = 3;

/// Sizes and options of a [`KvCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvCacheConfig {
    /// Sequences (B).
    pub batch: u32,
    /// KV heads (Hkv).
    pub kv_heads: u32,
    /// Head dim (D).
    pub head_dim: u32,
    /// Slots per sequence.
    pub capacity: u32,
    /// Most slots kept per sequence; over it the largest-F slot is evicted. `None`: no pruning,
    /// and appending past the capacity is an error.
    pub budget: Option<u32>,
    /// Element type of K and V (and of the queries and outputs of decode steps).
    pub dtype: DType,
    /// Whether the cache holds a value gate per slot and KV head.
    pub gate: bool,
    /// Largest buffer the cache may use, in bytes; `None`: the device's storage-binding and
    /// buffer limits. A cache whose K (or V) is larger is split into groups of sequences, each
    /// group with its own buffers; a sequence whose own K is larger is stored in segments (slot
    /// ranges, each with its own buffers; see [`KvCache::segments`]). Only a limit below one
    /// slot's K (KV heads x head dim) is refused ([`Error::TooLarge`]).
    pub max_buffer_bytes: Option<u64>,
}

impl KvCacheConfig {
    /// f32, no budget, no gate.
    pub fn new(batch: u32, kv_heads: u32, head_dim: u32, capacity: u32) -> Self {
        KvCacheConfig {
            batch,
            kv_heads,
            head_dim,
            capacity,
            budget: None,
            dtype: DType::F32,
            gate: false,
            max_buffer_bytes: None,
        }
    }
    /// Keep every buffer of the cache at most `bytes` long (more sequence groups, or segments
    /// when one sequence does not fit; for tests of the multi-buffer layouts and for devices
    /// whose large buffers are slow).
    pub fn max_buffer_bytes(mut self, bytes: u64) -> Self {
        self.max_buffer_bytes = Some(bytes);
        self
    }
    /// Sequences per buffer group when buffers may hold `limit` bytes: as many as fit, or
    /// `None` when not even one sequence's K fits (the cache is then stored in segments).
    pub fn sequences_per_group(&self, limit: u64) -> Option<u32> {
        let per_seq = (self.kv_heads as u64)
            .saturating_mul(self.capacity as u64)
            .saturating_mul(self.head_dim as u64)
            .saturating_mul(self.dtype.size());
        let n = limit / per_seq.max(1);
        (n > 0).then(|| n.min(self.batch as u64) as u32)
    }
    /// Prune to at most `budget` slots per sequence.
    pub fn budget(mut self, budget: u32) -> Self {
        self.budget = Some(budget);
        self
    }
    /// Store K and V as `dtype`.
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }
    /// Hold a value gate per slot.
    pub fn with_gate(mut self) -> Self {
        self.gate = true;
        self
    }

    /// Slots a sequence may occupy: the budget, or the capacity without one.
    pub fn limit(&self) -> u32 {
        self.budget.unwrap_or(self.capacity)
    }

    /// Checks every size.
    pub fn validate(&self) -> Result<()> {
        for (what, v) in [
            ("batch", self.batch),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("capacity", self.capacity),
        ] {
            if v == 0 {
                return Err(Error::ZeroSize { what });
            }
        }
        if !self.head_dim.is_multiple_of(8) || self.head_dim > 256 {
            return Err(Error::HeadDimUnsupported {
                got: self.head_dim,
                supported: SUPPORTED_HEAD_DIMS,
            });
        }
        if let Some(b) = self.budget {
            if b < MIN_BUDGET || b > self.capacity {
                return Err(Error::BadBudget {
                    budget: b,
                    min: MIN_BUDGET,
                    max: self.capacity,
                });
            }
        }
        if self.dtype == DType::U32 {
            return Err(Error::DTypeMismatch {
                tensor: "cache",
                expected: DType::F32,
                got: DType::U32,
            });
        }
        Ok(())
    }

    /// Bytes of the cache's own buffers: K, V, gate, F and positions.
    pub fn bytes(&self) -> u64 {
        // Saturating: sizes past u64 are refused when the cache is made.
        let m = |xs: &[u64]| xs.iter().fold(1u64, |a, &x| a.saturating_mul(x));
        let slots = m(&[self.batch as u64, self.capacity as u64]);
        let kv = m(&[
            2,
            slots,
            self.kv_heads as u64,
            self.head_dim as u64,
            self.dtype.size(),
        ]);
        let gate = if self.gate {
            m(&[slots, self.kv_heads as u64, 4])
        } else {
            0
        };
        kv.saturating_add(gate).saturating_add(m(&[slots, 8]))
    }
}

/// Tokens to append: K and V `[B, Hkv, n, D]` in the cache's element type, the gate
/// `[B, Hkv, n]` (f32, exactly when the cache holds gates) and optionally their selective state
/// F `[B, n]` (f32; zero when absent).
#[derive(Clone, Copy, Debug)]
pub struct Tokens<'a> {
    /// Keys.
    pub k: &'a Tensor,
    /// Values.
    pub v: &'a Tensor,
    /// Value gate.
    pub gate: Option<&'a Tensor>,
    /// Selective state of the new tokens, e.g. the F_out of the prefill that produced them.
    pub f: Option<&'a Tensor>,
}

impl<'a> Tokens<'a> {
    /// K and V only.
    pub fn new(k: &'a Tensor, v: &'a Tensor) -> Self {
        Tokens {
            k,
            v,
            gate: None,
            f: None,
        }
    }
    /// With a value gate.
    pub fn gate(mut self, g: &'a Tensor) -> Self {
        self.gate = Some(g);
        self
    }
    /// With the tokens' selective state.
    pub fn f(mut self, f: &'a Tensor) -> Self {
        self.f = Some(f);
        self
    }
}

/// One decode step: `n` (1 to 8) new tokens per sequence, appended to the cache, and their `n`
/// queries attending to it. Q `[B, Hq, n, D]`; K and V `[B, Hkv, n, D]`; gate `[B, Hkv, n]`;
/// tau `[B, Hq, n]`; alpha `[Hq]`. Query i of sequence b sits at the cache's next position + i.
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    /// Queries.
    pub q: &'a Tensor,
    /// Keys of the new tokens.
    pub k: &'a Tensor,
    /// Values of the new tokens.
    pub v: &'a Tensor,
    /// Value gate of the new tokens (exactly when the cache holds gates).
    pub gate: Option<&'a Tensor>,
    /// Per-query temperature.
    pub tau: Option<&'a Tensor>,
    /// Positional-temperature coefficient per query head.
    pub alpha: Option<&'a Tensor>,
    /// The position the caller expects the first new token of each sequence at; a mismatch is
    /// [`Error::StalePosition`].
    pub positions: Option<&'a [u64]>,
    /// New tokens (and queries) per sequence, each at most n; all n when `None`. Sequence b
    /// appends its first `counts[b]` tokens and runs its first `counts[b]` queries; its other
    /// query rows get O = 0 and LSE = -inf. 0 leaves a sequence idle for the step.
    pub counts: Option<&'a [u32]>,
}

impl<'a> Step<'a> {
    /// Q, K and V with every optional input absent.
    pub fn new(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> Self {
        Step {
            q,
            k,
            v,
            gate: None,
            tau: None,
            alpha: None,
            positions: None,
            counts: None,
        }
    }
    /// With a value gate for the new tokens.
    pub fn gate(mut self, t: &'a Tensor) -> Self {
        self.gate = Some(t);
        self
    }
    /// With a per-query temperature.
    pub fn tau(mut self, t: &'a Tensor) -> Self {
        self.tau = Some(t);
        self
    }
    /// With a positional-temperature coefficient per head.
    pub fn alpha(mut self, t: &'a Tensor) -> Self {
        self.alpha = Some(t);
        self
    }
    /// Checking that each sequence is where the caller thinks it is.
    pub fn positions(mut self, p: &'a [u64]) -> Self {
        self.positions = Some(p);
        self
    }
    /// With `counts[b]` new tokens and queries for sequence b (0: idle this step).
    pub fn counts(mut self, c: &'a [u32]) -> Self {
        self.counts = Some(c);
        self
    }
}

/// Options of a decode step. Attention over the cache is always causal by position.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodeOptions {
    /// Logit scale; `1/sqrt(D)` when `None`.
    pub scale: Option<f32>,
    /// Selective masking with this selection head.
    pub selective: Option<u32>,
    /// Number of slot splits (flash-decoding); chosen from the shape when `None`.
    pub splits: Option<u32>,
    /// Threads per workgroup of the attention kernel (a power of two from 32 to 256, within
    /// the device's limit; for tuning); chosen from the device when `None`.
    pub threads: Option<u32>,
    /// Query rows (query heads of a KV head's group times queries) per workgroup of the
    /// attention kernel, a power of two up to 16 (for tuning and tests; the planner may take
    /// fewer); chosen from the device when `None`.
    pub rows: Option<u32>,
}

impl DecodeOptions {
    /// Every control off.
    pub fn new() -> Self {
        Self::default()
    }
    /// Use this logit scale.
    pub fn scale(mut self, s: f32) -> Self {
        self.scale = Some(s);
        self
    }
    /// Selective masking with `head` as the selection head.
    pub fn selective(mut self, head: u32) -> Self {
        self.selective = Some(head);
        self
    }
    /// Split the slots in `n` parts.
    pub fn splits(mut self, n: u32) -> Self {
        self.splits = Some(n);
        self
    }
    /// Run the attention kernel with `n` threads per workgroup.
    pub fn threads(mut self, n: u32) -> Self {
        self.threads = Some(n);
        self
    }
    /// Run the attention kernel with at most `n` query rows per workgroup.
    pub fn rows(mut self, n: u32) -> Self {
        self.rows = Some(n);
        self
    }
}

/// The cache's slots read back (tests, debugging).
#[derive(Clone, Debug, PartialEq)]
pub struct CacheState {
    /// Occupied slots per sequence.
    pub len: Vec<u32>,
    /// Position of the token in each slot `[B, capacity]`; meaningful for slots `< len`.
    pub pos: Vec<u32>,
    /// Selective state of each slot `[B, capacity]`; meaningful for slots `< len`.
    pub f: Vec<f32>,
}

/// A KV cache on the GPU. See the module docs.
///
/// One decode step over a pruned cache (runs on any adapter, software ones included):
///
/// ```
/// use selattn::{Context, DType, DecodeOptions, KvCache, KvCacheConfig, Outputs, Step};
///
/// # fn main() -> selattn::Result<()> {
/// let ctx = Context::new()?;
/// // 1 sequence, 2 KV heads, head dim 8, 64 slots, pruned to at most 32.
/// let mut cache = KvCache::new(&ctx, KvCacheConfig::new(1, 2, 8, 64).budget(32))?;
/// // A step with 4 query heads and 1 new token per sequence.
/// let q = ctx.upload(&[1, 4, 1, 8], &[0.5; 32])?;
/// let k = ctx.upload(&[1, 2, 1, 8], &[0.25; 16])?;
/// let v = ctx.upload(&[1, 2, 1, 8], &[1.0; 16])?;
/// let o = ctx.empty(&[1, 4, 1, 8], DType::F32)?;
/// let step = Step::new(&q, &k, &v);
/// cache.step(&ctx, &step, &DecodeOptions::new(), &Outputs::new(&o))?;
/// assert_eq!(cache.lens(), &[1]);
/// // The only key is the new token, so every query gets its value.
/// assert!(ctx.download(&o)?.iter().all(|&x| (x - 1.0).abs() < 1e-6));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct KvCache {
    cfg: KvCacheConfig,
    /// Sequence groups, each with its own buffers (one group unless the cache is larger than
    /// a buffer may be).
    groups: Vec<Group>,
    next_pos: Vec<u64>,
    len: Vec<u32>,
    evictions: Vec<u64>,
    /// Per sequence: 1 + the position of the last query whose selective scores went into F
    /// (0: none since the reset). Truncating below it would leave those scores in F.
    f_touched: Vec<u64>,
    part: Option<wgpu::Buffer>,
    /// Segmented caches: each group's (sequence and segment's) decode partials.
    seg_parts: Vec<Option<wgpu::Buffer>>,
    fq: Option<wgpu::Buffer>,
    /// Slots per segment: the capacity, unless one sequence's slots do not fit one buffer (then
    /// each sequence is stored in segments of this many slots, the last one possibly fewer).
    seg_cap: u32,
    /// Segmented caches: each sequence's best eviction candidate `[B, 4]`.
    best: Option<Tensor>,
    /// Identity of the cache, named by its checkpoints.
    id: u64,
    /// Serial number of the last checkpoint taken.
    serial: u64,
    /// Per sequence: its live checkpoint, if any.
    checkpoints: Vec<Option<SeqCheckpoint>>,
    /// Per sequence: the GPU copies behind its checkpoint, allocated on first use and reused.
    snapshots: Vec<Snapshot>,
}

/// A saved state of one sequence of a [`KvCache`], to go back to with [`KvCache::rollback`]
/// (speculative decoding: checkpoint, append draft tokens, roll back, replay the accepted ones).
/// A plain token: the saved slots stay in the cache, one checkpoint per sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    cache: u64,
    batch: u32,
    serial: u64,
    position: u64,
}

impl Checkpoint {
    /// The sequence it was taken of.
    pub fn batch(&self) -> u32 {
        self.batch
    }
    /// The sequence's next position when it was taken (its length in tokens).
    pub fn position(&self) -> u64 {
        self.position
    }
}

/// Host side of a live checkpoint: the sequence's host state when it was taken, and whether
/// the K, V and gate of its occupied slots have been copied yet (done before the first
/// eviction after the checkpoint; until then they are unchanged in place).
#[derive(Clone, Debug, PartialEq)]
struct SeqCheckpoint {
    serial: u64,
    next_pos: u64,
    len: u32,
    evictions: u64,
    f_touched: u64,
    kv_saved: bool,
}

/// GPU copies behind a sequence's checkpoint: F and positions `[2, capacity]` (u32 words),
/// and K, V `[Hkv, limit, D]` each, then the gate `[Hkv, limit]` (only with a budget).
#[derive(Debug, Default)]
struct Snapshot {
    f_pos: Option<wgpu::Buffer>,
    kv: Option<wgpu::Buffer>,
}

/// Source of cache identities.
static NEXT_CACHE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Slots `s0 .. s0 + cs` of sequences `b0 .. b0 + nb` of a cache and their buffers: K and V
/// `[nb, Hkv, cs, D]`, gate `[nb, Hkv, cs]`, F and positions `[nb, cs]`. Unsegmented caches
/// (every sequence's slots fit one buffer): `s0 = 0`, `cs = capacity`; segmented ones: one
/// sequence (`nb = 1`) per group, one group per segment.
#[derive(Debug)]
struct Group {
    b0: u32,
    nb: u32,
    s0: u32,
    cs: u32,
    k: Tensor,
    v: Tensor,
    gate: Option<Tensor>,
    f: Tensor,
    pos: Tensor,
}

impl Group {
    fn buffers(&self) -> decode::CacheBuffers<'_> {
        decode::CacheBuffers {
            k: self.k.buffer(),
            v: self.v.buffer(),
            gate: self.gate.as_ref().map(|g| g.buffer()),
            f: self.f.buffer(),
            pos: self.pos.buffer(),
        }
    }
}

fn check(tensor: &'static str, t: &Tensor, expected: Vec<u64>, dtype: DType) -> Result<()> {
    if t.shape() != expected.as_slice() {
        return Err(Error::ShapeMismatch {
            tensor,
            expected,
            got: t.shape().to_vec(),
        });
    }
    if t.dtype() != dtype {
        return Err(Error::DTypeMismatch {
            tensor,
            expected: dtype,
            got: t.dtype(),
        });
    }
    Ok(())
}

/// Positions are u32 on the GPU and formed as `position + i`: keep them well inside.
const MAX_POSITION: u64 = (u32::MAX / 2) as u64;

impl KvCache {
    /// Allocates a cache. Nothing is initialised on the GPU: a slot is only read once written.
    pub fn new(ctx: &Context, cfg: KvCacheConfig) -> Result<Self> {
        cfg.validate()?;
        // The append kernel runs one workgroup per sequence: refuse what cannot be dispatched
        // now rather than at the first append.
        let max = ctx.capabilities().max_workgroups_per_dim;
        if cfg.batch > max {
            return Err(Error::DispatchTooLarge {
                what: "sequences per dispatch (cache batch)",
                workgroups: cfg.batch as u64,
                limit: max as u64,
            });
        }
        // Layout: sequences in groups, each group's K, V, gate, F and positions in buffers of
        // their own, as large as the device binds (WGSL has no portable way to pick a binding
        // at run time, so a group is dispatched as a batch of its own). A sequence whose K does
        // not fit one buffer is stored in segments (slot ranges), each in buffers of its own.
        let caps = ctx.capabilities();
        let limit = caps
            .max_storage_binding
            .min(caps.max_buffer)
            .min(cfg.max_buffer_bytes.unwrap_or(u64::MAX));
        let (h, c, d) = (
            cfg.kv_heads as u64,
            cfg.capacity as u64,
            cfg.head_dim as u64,
        );
        let Some(per_group) = cfg.sequences_per_group(limit) else {
            return Self::new_segmented(ctx, cfg, limit);
        };
        let mut groups = vec![];
        let mut b0 = 0;
        while b0 < cfg.batch {
            let nb = per_group.min(cfg.batch - b0);
            let b = nb as u64;
            let gate = if cfg.gate {
                Some(ctx.empty(&[b, h, c], DType::F32)?)
            } else {
                None
            };
            groups.push(Group {
                b0,
                nb,
                s0: 0,
                cs: cfg.capacity,
                k: ctx.empty(&[b, h, c, d], cfg.dtype)?,
                v: ctx.empty(&[b, h, c, d], cfg.dtype)?,
                gate,
                f: ctx.empty(&[b, c], DType::F32)?,
                pos: ctx.empty(&[b, c], DType::U32)?,
            });
            b0 += nb;
        }
        Ok(Self::with_groups(cfg, groups, cfg.capacity))
    }

    /// A cache whose sequences are stored in segments of at most `limit` bytes of K each: one
    /// group per sequence and segment. [`Error::TooLarge`] when not even one slot's keys fit.
    fn new_segmented(ctx: &Context, cfg: KvCacheConfig, limit: u64) -> Result<Self> {
        let (h, c, d) = (
            cfg.kv_heads as u64,
            cfg.capacity as u64,
            cfg.head_dim as u64,
        );
        let row = h * d * cfg.dtype.size();
        let most = limit / row;
        if most == 0 {
            return Err(Error::TooLarge {
                what: "one slot's keys (KV heads x head dim) in one cache buffer",
                bytes: row,
                limit,
            });
        }
        // As few segments as fit, of equal size but the last.
        let segments = c.div_ceil(most);
        let seg_cap = c.div_ceil(segments) as u32;
        let mut groups = vec![];
        for b0 in 0..cfg.batch {
            let mut s0 = 0u32;
            while s0 < cfg.capacity {
                let cs = seg_cap.min(cfg.capacity - s0);
                let n = cs as u64;
                let gate = if cfg.gate {
                    Some(ctx.empty(&[1, h, n], DType::F32)?)
                } else {
                    None
                };
                groups.push(Group {
                    b0,
                    nb: 1,
                    s0,
                    cs,
                    k: ctx.empty(&[1, h, n, d], cfg.dtype)?,
                    v: ctx.empty(&[1, h, n, d], cfg.dtype)?,
                    gate,
                    f: ctx.empty(&[1, n], DType::F32)?,
                    pos: ctx.empty(&[1, n], DType::U32)?,
                });
                s0 += cs;
            }
        }
        let mut cache = Self::with_groups(cfg, groups, seg_cap);
        cache.best = Some(ctx.empty(&[cfg.batch as u64, 4], DType::U32)?);
        Ok(cache)
    }

    fn with_groups(cfg: KvCacheConfig, groups: Vec<Group>, seg_cap: u32) -> Self {
        KvCache {
            groups,
            next_pos: vec![0; cfg.batch as usize],
            len: vec![0; cfg.batch as usize],
            evictions: vec![0; cfg.batch as usize],
            f_touched: vec![0; cfg.batch as usize],
            part: None,
            seg_parts: vec![],
            fq: None,
            seg_cap,
            best: None,
            id: NEXT_CACHE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            serial: 0,
            checkpoints: vec![None; cfg.batch as usize],
            snapshots: (0..cfg.batch).map(|_| Snapshot::default()).collect(),
            cfg,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &KvCacheConfig {
        &self.cfg
    }
    /// Occupied slots per sequence.
    pub fn lens(&self) -> &[u32] {
        &self.len
    }
    /// Absolute position of the next token of each sequence (tokens appended since its reset).
    pub fn positions(&self) -> &[u64] {
        &self.next_pos
    }
    /// Tokens evicted per sequence since its reset.
    pub fn evictions(&self) -> &[u64] {
        &self.evictions
    }
    /// Buffer groups, each with buffers of its own (1 unless the cache is larger than one
    /// buffer may be; see [`KvCacheConfig::max_buffer_bytes`]): groups of whole sequences, or,
    /// when one sequence's slots do not fit one buffer, one per sequence and segment
    /// (`batch * segments()`).
    pub fn buffer_groups(&self) -> usize {
        self.groups.len()
    }
    /// Segments per sequence: 1 unless one sequence's K (KV heads x capacity x head dim) does
    /// not fit one buffer; then its slots are stored in this many slot ranges, each in buffers
    /// of its own (see [`KvCache::segment_slots`]).
    pub fn segments(&self) -> u32 {
        self.cfg.capacity.div_ceil(self.seg_cap)
    }
    /// Slots per segment (the last one may hold fewer): the capacity when unsegmented.
    pub fn segment_slots(&self) -> u32 {
        self.seg_cap
    }
    /// Keys `[nb, Hkv, capacity, D]` of the first sequence group (all B sequences when
    /// [`KvCache::buffer_groups`] is 1; `[1, Hkv, segment_slots, D]`, the first segment of
    /// sequence 0, when the cache is segmented).
    pub fn k(&self) -> &Tensor {
        &self.groups[0].k
    }
    /// Values of the first sequence group, as [`KvCache::k`].
    pub fn v(&self) -> &Tensor {
        &self.groups[0].v
    }
    /// Selective state `[nb, capacity]` of the first sequence group.
    pub fn f_state(&self) -> &Tensor {
        &self.groups[0].f
    }
    /// Token position per slot `[nb, capacity]`, u32, of the first sequence group.
    pub fn slot_positions(&self) -> &Tensor {
        &self.groups[0].pos
    }

    /// Bytes of GPU memory the cache holds: its slots, its decode scratch (with segments, the
    /// eviction candidates too) and the copies behind checkpoints.
    pub fn bytes(&self) -> u64 {
        let snap: u64 = self
            .snapshots
            .iter()
            .map(|s| {
                s.f_pos.as_ref().map_or(0, |b| b.size()) + s.kv.as_ref().map_or(0, |b| b.size())
            })
            .sum();
        self.cfg.bytes()
            + self.part.as_ref().map_or(0, |b| b.size())
            + self
                .seg_parts
                .iter()
                .flatten()
                .map(|b| b.size())
                .sum::<u64>()
            + self.fq.as_ref().map_or(0, |b| b.size())
            + self.best.as_ref().map_or(0, |t| t.bytes())
            + snap
    }

    /// Bytes of the slots in use (K, V, gate, F and position of occupied slots).
    pub fn bytes_in_use(&self) -> u64 {
        let used: u64 = self.len.iter().map(|&l| l as u64).sum();
        let per_slot = self.cfg.bytes() / (self.cfg.batch as u64 * self.cfg.capacity as u64);
        used * per_slot
    }

    /// Empties every sequence. No GPU work: slots past a sequence's length are never read.
    pub fn reset(&mut self) {
        for b in 0..self.len.len() {
            self.next_pos[b] = 0;
            self.len[b] = 0;
            self.evictions[b] = 0;
            self.f_touched[b] = 0;
            self.checkpoints[b] = None;
        }
    }

    /// Empties one sequence: the serving loop's "remove a sequence, add another in its place".
    /// No GPU work. An index past the batch is refused with [`Error::LengthMismatch`] and
    /// changes nothing.
    pub fn reset_sequence(&mut self, batch: u32) -> Result<()> {
        let b = batch as usize;
        if b >= self.len.len() {
            return Err(Error::LengthMismatch {
                what: "sequence index (batch)",
                expected: self.len.len() as u64,
                got: batch as u64,
            });
        }
        self.next_pos[b] = 0;
        self.len[b] = 0;
        self.evictions[b] = 0;
        self.f_touched[b] = 0;
        self.checkpoints[b] = None;
        Ok(())
    }

    /// Truncates sequence `batch` back to its first `len` tokens (positions `0..len`), as if
    /// the later ones had never been appended: speculative decoding rejecting draft tokens. No
    /// GPU work. Exact, so refused with [`Error::CannotTruncate`] (nothing changed) when a
    /// removed token evicted another (the sequence reached its budget or capacity limit since
    /// its reset: evicted tokens are gone), or a removed query ran with selective masking (its
    /// scores are in the kept tokens' F). A `len` equal to the current position does nothing.
    /// For those cases take a [`KvCache::checkpoint`] before appending and
    /// [`KvCache::rollback`] to it. Truncating below the sequence's checkpoint drops it.
    pub fn truncate_sequence(&mut self, batch: u32, len: u64) -> Result<()> {
        let b = batch as usize;
        if b >= self.len.len() {
            return Err(Error::LengthMismatch {
                what: "sequence index (batch)",
                expected: self.len.len() as u64,
                got: batch as u64,
            });
        }
        let why = if len > self.next_pos[b] {
            Some("that is past the sequence's end")
        } else if len == self.next_pos[b] {
            return Ok(());
        } else if self.evictions[b] > 0 {
            Some("tokens were evicted since the sequence's reset (pruning keeps no copy)")
        } else if self.f_touched[b] > len {
            Some("a removed query added its selective scores to F")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(Error::CannotTruncate {
                batch,
                to: len,
                why,
            });
        }
        // No eviction since the reset: slot j holds position j, so the first `len` slots are
        // exactly the kept tokens, with their F as it was when position `len` was next.
        self.next_pos[b] = len;
        self.len[b] = len as u32;
        if self.checkpoints[b]
            .as_ref()
            .is_some_and(|cp| cp.next_pos > len)
        {
            self.checkpoints[b] = None;
        }
        Ok(())
    }

    /// Saves sequence `batch` as it is now, to go back to with [`KvCache::rollback`], exactly
    /// (slots, positions, selective state F, evictions), whatever is appended or evicted in
    /// between: the serving loop's speculative decoding (checkpoint, append draft tokens with
    /// selective masking and a budget, roll back, replay the accepted tokens). Replaces the
    /// sequence's previous checkpoint. Submits its GPU work: a copy of the sequence's F and
    /// positions (8 bytes per occupied slot). With a budget, the first call that evicts from the
    /// sequence after the checkpoint first copies its occupied slots' K, V and gate (as many
    /// bytes as one decode step reads of the sequence; once per checkpoint). An index past the
    /// batch is refused with [`Error::LengthMismatch`].
    ///
    /// Speculative decoding over a pruned cache with selective masking:
    ///
    /// ```
    /// use selattn::{Context, DType, DecodeOptions, KvCache, KvCacheConfig, Outputs, Step};
    ///
    /// # fn main() -> selattn::Result<()> {
    /// let ctx = Context::new()?;
    /// // 1 sequence, 1 KV head, head dim 8, pruned to at most 4 slots.
    /// let mut cache = KvCache::new(&ctx, KvCacheConfig::new(1, 1, 8, 16).budget(4))?;
    /// let q = ctx.upload(&[1, 2, 3, 8], &[0.5; 48])?;
    /// let k = ctx.upload(&[1, 1, 3, 8], &[0.25; 24])?;
    /// let v = ctx.upload(&[1, 1, 3, 8], &[1.0; 24])?;
    /// let o = ctx.empty(&[1, 2, 3, 8], DType::F32)?;
    /// let opts = DecodeOptions::new().selective(0);
    /// cache.step(&ctx, &Step::new(&q, &k, &v), &opts, &Outputs::new(&o))?;
    /// let cp = cache.checkpoint(&ctx, 0)?;
    /// // Three draft tokens (two tokens are evicted: the budget is 4) and their verification...
    /// cache.step(&ctx, &Step::new(&q, &k, &v), &opts, &Outputs::new(&o))?;
    /// assert_eq!(cache.evictions(), &[2]);
    /// // ...which accepts only the first: roll back, then replay it.
    /// cache.rollback(&ctx, &cp)?;
    /// let step = Step::new(&q, &k, &v).counts(&[1]);
    /// cache.step(&ctx, &step, &opts, &Outputs::new(&o))?;
    /// assert_eq!(cache.positions(), &[4]);
    /// assert_eq!(cache.lens(), &[4]);
    /// assert_eq!(cache.evictions(), &[0]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn checkpoint(&mut self, ctx: &Context, batch: u32) -> Result<Checkpoint> {
        self.submit_or_restore(ctx, "selattn cache checkpoint", |cache, enc| {
            cache.encode_checkpoint(ctx, enc, batch)
        })
    }

    /// [`KvCache::checkpoint`] recorded into an encoder the application owns (no submit; the
    /// caveats of [`KvCache::encode_append`] apply).
    pub fn encode_checkpoint(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        batch: u32,
    ) -> Result<Checkpoint> {
        self.check_owner(ctx, &[])?;
        let b = self.check_batch(batch)?;
        let c = self.cfg.capacity as u64;
        let len = self.len[b] as u64;
        let buf = ctx.scoped("recording a cache checkpoint", || {
            Ok(copy_buffer(
                ctx,
                &mut self.snapshots[b].f_pos,
                8 * c,
                "selattn cache checkpoint F",
            ))
        })?;
        ctx.scoped("recording a cache checkpoint", || {
            for (g, bl, s0, n) in self.spans(b, len) {
                let cs = g.cs as u64;
                copy(encoder, g.f.buffer(), 4 * bl * cs, &buf, 4 * s0, 4 * n);
                copy(
                    encoder,
                    g.pos.buffer(),
                    4 * bl * cs,
                    &buf,
                    4 * (c + s0),
                    4 * n,
                );
            }
            Ok(())
        })?;
        self.serial += 1;
        self.checkpoints[b] = Some(SeqCheckpoint {
            serial: self.serial,
            next_pos: self.next_pos[b],
            len: self.len[b],
            evictions: self.evictions[b],
            f_touched: self.f_touched[b],
            kv_saved: false,
        });
        Ok(Checkpoint {
            cache: self.id,
            batch,
            serial: self.serial,
            position: self.next_pos[b],
        })
    }

    /// Puts the checkpoint's sequence back exactly as it was when the checkpoint was taken,
    /// as if nothing had been appended to it since (other sequences are untouched). The
    /// checkpoint stays valid (roll back to it again after more appends). Submits its GPU
    /// work: copies of the saved F and positions (and K, V and gate when tokens were evicted
    /// since). Refused with [`Error::StaleCheckpoint`], changing nothing, for a checkpoint of
    /// another cache, one replaced by a newer checkpoint of the sequence, or after the sequence
    /// was reset or truncated below it.
    pub fn rollback(&mut self, ctx: &Context, checkpoint: &Checkpoint) -> Result<()> {
        self.submit_or_restore(ctx, "selattn cache rollback", |cache, enc| {
            cache.encode_rollback(ctx, enc, checkpoint)
        })
    }

    /// [`KvCache::rollback`] recorded into an encoder the application owns (no submit; the
    /// caveats of [`KvCache::encode_append`] apply).
    pub fn encode_rollback(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        checkpoint: &Checkpoint,
    ) -> Result<()> {
        self.check_owner(ctx, &[])?;
        let stale = |why| Error::StaleCheckpoint {
            batch: checkpoint.batch,
            why,
        };
        if checkpoint.cache != self.id {
            return Err(stale("it was taken of another cache"));
        }
        let b = self.check_batch(checkpoint.batch)?;
        let cp =
            match &self.checkpoints[b] {
                Some(cp) if cp.serial == checkpoint.serial => cp.clone(),
                _ => return Err(stale(
                    "a newer checkpoint of the sequence replaced it, or the sequence was reset or \
                     truncated below it since",
                )),
            };
        let c = self.cfg.capacity as u64;
        let len = cp.len as u64;
        let snap = &self.snapshots[b];
        let Some(fp) = snap.f_pos.as_ref() else {
            return Err(Error::gpu_msg("cache checkpoint without its copy of F"));
        };
        for (g, bl, s0, n) in self.spans(b, len) {
            let cs = g.cs as u64;
            copy(encoder, fp, 4 * s0, g.f.buffer(), 4 * bl * cs, 4 * n);
            copy(
                encoder,
                fp,
                4 * (c + s0),
                g.pos.buffer(),
                4 * bl * cs,
                4 * n,
            );
        }
        if cp.kv_saved {
            let Some(kv) = snap.kv.as_ref() else {
                return Err(Error::gpu_msg(
                    "cache checkpoint without its copy of K and V",
                ));
            };
            for (slots, off, at, bytes) in self.kv_snapshot_copies(b, len) {
                copy(encoder, kv, at, slots, off, bytes);
            }
        }
        self.next_pos[b] = cp.next_pos;
        self.len[b] = cp.len;
        self.evictions[b] = cp.evictions;
        self.f_touched[b] = cp.f_touched;
        Ok(())
    }

    /// Before a call that evicts from sequences with a live checkpoint whose slots were not
    /// copied yet, records the copy of their occupied slots' K, V and gate (unchanged since the
    /// checkpoint: only an eviction overwrites an occupied slot).
    fn save_before_evictions(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        ev: &[u64],
    ) {
        let (hkv, d) = (self.cfg.kv_heads as u64, self.cfg.head_dim as u64);
        let esz = self.cfg.dtype.size();
        let lim = self.cfg.limit() as u64;
        let gate_bytes = if self.cfg.gate { hkv * lim * 4 } else { 0 };
        for (b, &e) in ev.iter().enumerate() {
            let len = match &self.checkpoints[b] {
                Some(cp) if e > 0 && !cp.kv_saved => cp.len as u64,
                _ => continue,
            };
            let kv = copy_buffer(
                ctx,
                &mut self.snapshots[b].kv,
                2 * hkv * lim * d * esz + gate_bytes,
                "selattn cache checkpoint K V",
            );
            for (slots, off, at, bytes) in self.kv_snapshot_copies(b, len) {
                copy(encoder, slots, off, &kv, at, bytes);
            }
            if let Some(cp) = self.checkpoints[b].as_mut() {
                cp.kv_saved = true;
            }
        }
    }

    /// The copies between the K, V and gate rows of sequence `b`'s first `len` slots and its
    /// checkpoint's K V snapshot (per KV head, `limit` slots: all K heads, then all V heads,
    /// then all gate heads), in recording order: `(slot buffer, offset there, offset in the
    /// snapshot, bytes)`. Saving copies slots to snapshot, a rollback the other way.
    fn kv_snapshot_copies(&self, b: usize, len: u64) -> Vec<(&wgpu::Buffer, u64, u64, u64)> {
        let (hkv, d) = (self.cfg.kv_heads as u64, self.cfg.head_dim as u64);
        let esz = self.cfg.dtype.size();
        let lim = self.cfg.limit() as u64;
        let mut copies = Vec::with_capacity(3 * hkv as usize);
        for (g, bl, s0, n) in self.spans(b, len) {
            let c = g.cs as u64;
            for h in 0..hkv {
                let row = ((bl * hkv + h) * c) * d * esz;
                let at = (h * lim + s0) * d * esz;
                copies.push((g.k.buffer(), row, at, n * d * esz));
                copies.push((g.v.buffer(), row, hkv * lim * d * esz + at, n * d * esz));
                if let Some(gate) = &g.gate {
                    let at = 2 * hkv * lim * d * esz + (h * lim + s0) * 4;
                    copies.push((gate.buffer(), (bl * hkv + h) * c * 4, at, n * 4));
                }
            }
        }
        copies
    }

    /// Records a call with `record` and submits it (labelled `label`); if recording or the
    /// submission fails, puts the host state back, so the failed call changes nothing.
    fn submit_or_restore<T>(
        &mut self,
        ctx: &Context,
        label: &str,
        record: impl FnOnce(&mut Self, &mut wgpu::CommandEncoder) -> Result<T>,
    ) -> Result<T> {
        let saved = self.host_state();
        let mut out = None;
        let r = submit(&ctx.device, &ctx.queue, label, |enc| {
            out = Some(record(self, enc)?);
            Ok(())
        });
        match (r, out) {
            (Ok(()), Some(v)) => Ok(v),
            (r, _) => {
                self.restore(saved);
                Err(r
                    .err()
                    .unwrap_or_else(|| Error::gpu_msg(format!("recording {label}"))))
            }
        }
    }

    /// Checks a sequence index.
    fn check_batch(&self, batch: u32) -> Result<usize> {
        let b = batch as usize;
        if b >= self.len.len() {
            return Err(Error::LengthMismatch {
                what: "sequence index (batch)",
                expected: self.len.len() as u64,
                got: batch as u64,
            });
        }
        Ok(b)
    }

    /// Whether sequences are stored in several segments.
    fn segmented(&self) -> bool {
        self.seg_cap < self.cfg.capacity
    }

    /// The pieces of sequence `b`'s first `len` slots, in slot order: `(group, index of the
    /// sequence in it, first slot, slots)` (one piece, or none for `len` 0, unless segmented).
    fn spans(&self, b: usize, len: u64) -> Vec<(&Group, u64, u64, u64)> {
        self.groups
            .iter()
            .filter(|g| (g.b0 as usize..(g.b0 + g.nb) as usize).contains(&b) && (g.s0 as u64) < len)
            .map(|g| {
                let s0 = g.s0 as u64;
                (
                    g,
                    (b - g.b0 as usize) as u64,
                    s0,
                    (len - s0).min(g.cs as u64),
                )
            })
            .collect()
    }

    /// Each group's F and positions, downloaded, put in place as `[B, capacity]`.
    fn place(&self, parts: Vec<(Vec<u32>, Vec<f32>)>) -> (Vec<u32>, Vec<f32>) {
        let (mut pos, mut f) = (vec![], vec![]);
        if !self.segmented() {
            for (p, x) in parts {
                pos.extend(p);
                f.extend(x);
            }
            return (pos, f);
        }
        let c = self.cfg.capacity as usize;
        pos.resize(self.cfg.batch as usize * c, 0);
        f.resize(self.cfg.batch as usize * c, 0.0);
        for (g, (p, x)) in self.groups.iter().zip(parts) {
            let at = g.b0 as usize * c + g.s0 as usize;
            let n = g.cs as usize;
            pos[at..at + n].copy_from_slice(&p[..n]);
            f[at..at + n].copy_from_slice(&x[..n]);
        }
        (pos, f)
    }

    /// Reads the slots back. Waits for the GPU; not on wasm (see
    /// [`KvCache::download_state_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn download_state(&self, ctx: &Context) -> Result<CacheState> {
        let mut parts = vec![];
        for g in &self.groups {
            parts.push((ctx.download_u32(&g.pos)?, ctx.download(&g.f)?));
        }
        let (pos, f) = self.place(parts);
        Ok(CacheState {
            len: self.len.clone(),
            pos,
            f,
        })
    }

    /// [`KvCache::download_state`] without blocking (also on wasm).
    pub async fn download_state_async(&self, ctx: &Context) -> Result<CacheState> {
        let mut parts = vec![];
        for g in &self.groups {
            let p = ctx.download_u32_async(&g.pos).await?;
            parts.push((p, ctx.download_async(&g.f).await?));
        }
        let (pos, f) = self.place(parts);
        Ok(CacheState {
            len: self.len.clone(),
            pos,
            f,
        })
    }

    /// Checks new tokens (and per-sequence counts) against the cache before anything changes;
    /// returns the token stride and the count per sequence.
    // Long on purpose: a flat list of checks in the order their errors are reported.
    fn check_tokens(&self, t: &Tokens, counts: Option<&[u32]>) -> Result<(u32, Vec<u32>)> {
        let c = &self.cfg;
        let ks = t.k.shape();
        if ks.len() != 4 {
            return Err(Error::RankMismatch {
                tensor: "k",
                rank: 4,
                got: ks.to_vec(),
            });
        }
        for (what, cache, got) in [
            ("batch of k", c.batch, ks[0]),
            ("KV heads of k", c.kv_heads, ks[1]),
            ("head dim of k", c.head_dim, ks[3]),
        ] {
            if cache as u64 != got {
                return Err(Error::CacheMismatch {
                    what,
                    cache,
                    got: got.min(u32::MAX as u64) as u32,
                });
            }
        }
        let n = u32::try_from(ks[2]).map_err(|_| Error::CountTooLarge {
            what: "tokens per append",
            count: ks[2],
            limit: u32::MAX as u64,
        })?;
        if n == 0 {
            return Err(Error::ZeroSize { what: "tokens" });
        }
        check("k", t.k, ks.to_vec(), c.dtype)?;
        check("v", t.v, ks.to_vec(), c.dtype)?;
        match (c.gate, t.gate) {
            (true, Some(g)) => check(
                "gate",
                g,
                vec![c.batch as u64, c.kv_heads as u64, n as u64],
                DType::F32,
            )?,
            (true, None) => {
                return Err(Error::InputWithoutUse {
                    what: "no gate",
                    why: "the cache holds gates (give one per new token)",
                })
            }
            (false, Some(_)) => {
                return Err(Error::InputWithoutUse {
                    what: "gate",
                    why: "the cache was made without gates",
                })
            }
            (false, None) => {}
        }
        if let Some(f) = t.f {
            check("f", f, vec![c.batch as u64, n as u64], DType::F32)?;
        }
        let counts = match counts {
            Some(cs) => {
                if cs.len() != c.batch as usize {
                    return Err(Error::LengthMismatch {
                        what: "counts",
                        expected: c.batch as u64,
                        got: cs.len() as u64,
                    });
                }
                if let Some(&bad) = cs.iter().find(|&&x| x > n) {
                    return Err(Error::LengthMismatch {
                        what: "count of new tokens (at most the tensor's token dimension)",
                        expected: n as u64,
                        got: bad as u64,
                    });
                }
                cs.to_vec()
            }
            None => vec![n; c.batch as usize],
        };
        for (b, &cnt) in counts.iter().enumerate() {
            let len = self.len[b];
            if c.budget.is_none() && len as u64 + cnt as u64 > c.capacity as u64 {
                return Err(Error::CacheFull {
                    batch: b as u32,
                    len,
                    adding: cnt,
                    capacity: c.capacity,
                });
            }
            if self.next_pos[b] + cnt as u64 + MAX_QUERIES as u64 > MAX_POSITION {
                return Err(Error::CountTooLarge {
                    what: "token position",
                    count: self.next_pos[b] + cnt as u64,
                    limit: MAX_POSITION,
                });
            }
        }
        Ok((n, counts))
    }

    /// Per-sequence (len before, first position, count, len after), and the new host state.
    fn plan_append(&self, counts: &[u32]) -> (Vec<[u32; 4]>, Vec<u32>, Vec<u64>) {
        let limit = self.cfg.limit();
        let mut info = Vec::with_capacity(counts.len());
        let mut lens = Vec::with_capacity(counts.len());
        let mut ev = Vec::with_capacity(counts.len());
        for (b, &cnt) in counts.iter().enumerate() {
            let len = self.len[b];
            let after = (len as u64 + cnt as u64).min(limit as u64) as u32;
            // next_pos < MAX_POSITION was checked, so the cast is exact.
            info.push([len, self.next_pos[b] as u32, cnt, after]);
            lens.push(after);
            ev.push(len as u64 + cnt as u64 - after as u64);
        }
        (info, lens, ev)
    }

    fn commit(&mut self, counts: &[u32], lens: Vec<u32>, ev: Vec<u64>) {
        for (b, &cnt) in counts.iter().enumerate() {
            self.next_pos[b] += cnt as u64;
            self.evictions[b] += ev[b];
        }
        self.len = lens;
    }

    /// Records the append of `t` (`n` tokens per sequence, `counts[b]` to sequence b, slot plan
    /// in `step_buf`).
    fn encode_append_pass(
        &self,
        ctx: &Context,
        pass: &mut wgpu::ComputePass<'_>,
        t: &Tokens,
        n: u32,
        counts: &[u32],
        step_buf: &wgpu::Buffer,
    ) -> Result<()> {
        let c = &self.cfg;
        let cfg = AppendConfig {
            d: c.head_dim,
            wg: append_threads(ctx.capabilities().max_invocations),
            gate: c.gate,
            f: t.f.is_some(),
        };
        let tokens = decode::TokenBuffers {
            k: bound(t.k),
            v: bound(t.v),
            gate: t.gate.map(bound),
            f: t.f.map(bound),
            step: step_buf,
        };
        if self.segmented() {
            return self.encode_append_segments(ctx, pass, cfg, &tokens, n, counts);
        }
        let gpu = ctx.gpu();
        for g in &self.groups {
            let params = CacheParams {
                batch: g.nb,
                kv_heads: c.kv_heads,
                capacity: c.capacity,
                limit: c.limit(),
                n,
                b0: g.b0,
                ..Default::default()
            };
            decode::encode_append(&gpu, pass, cfg, c.dtype, &params, &tokens, &g.buffers())?;
        }
        Ok(())
    }

    /// [`KvCache::encode_append_pass`] for a segmented cache: per sequence, the tokens that
    /// evict nothing in one `put` and one `put_state` per segment they land in; then, per
    /// evicting token, the candidates of every occupied segment (segment 0 first) and a `put`
    /// and a `put_state` per occupied segment (the one holding the victim writes).
    fn encode_append_segments(
        &self,
        ctx: &Context,
        pass: &mut wgpu::ComputePass<'_>,
        cfg: AppendConfig,
        tokens: &decode::TokenBuffers,
        n: u32,
        counts: &[u32],
    ) -> Result<()> {
        let c = &self.cfg;
        let best = self
            .best
            .as_ref()
            .ok_or_else(|| Error::gpu_msg("segmented cache without its candidate buffer"))?;
        let gpu = ctx.gpu();
        let limit = c.limit();
        for (b, &cnt) in counts.iter().enumerate() {
            let len0 = self.len[b];
            // Tokens 0..quiet take slot len0 + t; each later one evicts.
            let quiet = cnt.min(limit.saturating_sub(len0));
            let segs: Vec<&Group> = self.groups.iter().filter(|g| g.b0 as usize == b).collect();
            let mut run = |g: &Group, which: SegKernel, t0: u32, t1: u32| {
                let params = decode::SegParams {
                    batch: 1,
                    kv_heads: c.kv_heads,
                    seg_cap: g.cs,
                    limit,
                    n,
                    b0: b as u32,
                    seg0: g.s0,
                    t0,
                    t1,
                    ..Default::default()
                };
                let cb = g.buffers();
                decode::encode_segment_append(
                    &gpu,
                    pass,
                    cfg,
                    c.dtype,
                    &params,
                    which,
                    tokens,
                    &cb,
                    best.buffer(),
                )
            };
            if quiet > 0 {
                let (lo, hi) = (len0, len0 + quiet);
                for g in segs.iter().filter(|g| g.s0 < hi && lo < g.s0 + g.cs) {
                    run(g, SegKernel::Put, 0, quiet)?;
                    run(g, SegKernel::PutState, 0, quiet)?;
                }
            }
            for tok in quiet..cnt {
                let occupied = || segs.iter().filter(|g| g.s0 < limit);
                for g in occupied() {
                    run(g, SegKernel::Candidates, tok, tok + 1)?;
                }
                for g in occupied() {
                    run(g, SegKernel::Put, tok, tok + 1)?;
                    run(g, SegKernel::PutState, tok, tok + 1)?;
                }
            }
        }
        Ok(())
    }

    /// Appends tokens without attention (a prefill's K and V, with its F_out as `f` for exact
    /// selective state). `counts[b]` tokens (default: all `n`) go to sequence b, so sequences may
    /// grow by different amounts. Over the budget, tokens are evicted one by one as each new
    /// token is written. Submits the work.
    pub fn append(&mut self, ctx: &Context, tokens: &Tokens, counts: Option<&[u32]>) -> Result<()> {
        self.submit_or_restore(ctx, "selattn cache append", |cache, enc| {
            cache.encode_append(ctx, enc, tokens, counts)
        })
    }

    /// [`KvCache::append`] recorded into an encoder the application owns (no submit). The
    /// cache's host state advances when the call returns `Ok`; if the application's submit of
    /// the encoder then fails, the cache no longer matches its slots: [`KvCache::reset`] it.
    ///
    /// The encoder must have been created from the cache's context's device: wgpu 30 offers no
    /// way to ask an encoder for its device, so this can't be checked here (an encoder of
    /// another device is a caller bug that wgpu may report by panicking).
    pub fn encode_append(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        tokens: &Tokens,
        counts: Option<&[u32]>,
    ) -> Result<()> {
        self.check_owner(
            ctx,
            &[
                ("k", Some(tokens.k)),
                ("v", Some(tokens.v)),
                ("gate", tokens.gate),
                ("f", tokens.f),
            ],
        )?;
        self.check_no_alias(&[Some(tokens.k), Some(tokens.v), tokens.gate, tokens.f])?;
        let (n, counts) = self.check_tokens(tokens, counts)?;
        check_bindings(
            ctx,
            &[Some(tokens.k), Some(tokens.v), tokens.gate, tokens.f],
        )?;
        let (info, lens, ev) = self.plan_append(&counts);
        let cps = self.checkpoints.clone();
        let r = ctx.scoped("recording a cache append", || {
            self.save_before_evictions(ctx, encoder, &ev);
            let step_buf = ctx
                .gpu()
                .storage("selattn cache step", bytemuck::cast_slice(&info));
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("selattn cache append"),
                timestamp_writes: None,
            });
            self.encode_append_pass(ctx, &mut pass, tokens, n, &counts, &step_buf)
        });
        if let Err(e) = r {
            // A failed recording leaves the checkpoints as they were.
            self.checkpoints = cps;
            return Err(e);
        }
        if tokens.f.is_some() {
            // A prefill's F_out holds the scores of its queries up to its last token.
            for (b, &cnt) in counts.iter().enumerate() {
                if cnt > 0 {
                    self.f_touched[b] = self.next_pos[b] + cnt as u64;
                }
            }
        }
        self.commit(&counts, lens, ev);
        Ok(())
    }

    /// Host state a failed call restores: next positions, lengths, evictions, F marks,
    /// checkpoints.
    fn host_state(&self) -> HostState {
        HostState {
            next_pos: self.next_pos.clone(),
            len: self.len.clone(),
            evictions: self.evictions.clone(),
            f_touched: self.f_touched.clone(),
            checkpoints: self.checkpoints.clone(),
            serial: self.serial,
        }
    }

    fn restore(&mut self, h: HostState) {
        self.next_pos = h.next_pos;
        self.len = h.len;
        self.evictions = h.evictions;
        self.f_touched = h.f_touched;
        self.checkpoints = h.checkpoints;
        self.serial = h.serial;
    }

    /// Checks that the cache and every tensor of a call live on `ctx`'s device.
    fn check_owner(&self, ctx: &Context, ts: &[(&'static str, Option<&Tensor>)]) -> Result<()> {
        ctx.owns("cache", &self.groups[0].k)?;
        for (what, t) in ts {
            if let Some(t) = t {
                ctx.owns(what, t)?;
            }
        }
        Ok(())
    }

    fn check_no_alias(&self, ts: &[Option<&Tensor>]) -> Result<()> {
        let mine = self.groups.iter().flat_map(|g| {
            [
                Some(&g.k),
                Some(&g.v),
                g.gate.as_ref(),
                Some(&g.f),
                Some(&g.pos),
            ]
        });
        let mine: Vec<&Tensor> = mine.flatten().collect();
        for t in ts.iter().flatten() {
            if mine.iter().any(|m| m.buffer() == t.buffer()) {
                return Err(Error::BadBuffer {
                    why: "a tensor aliases one of the cache's own buffers".into(),
                });
            }
        }
        Ok(())
    }

    /// Runs one decode step (append the step's tokens, attend, update F) and submits it.
    pub fn step(
        &mut self,
        ctx: &Context,
        step: &Step,
        options: &DecodeOptions,
        outputs: &Outputs,
    ) -> Result<()> {
        self.submit_or_restore(ctx, "selattn decode", |cache, enc| {
            cache.encode_step(ctx, enc, step, options, outputs, None)
        })
    }

    /// Plans a step without recording it: validates every tensor against the cache.
    pub fn plan_step(
        &self,
        ctx: &Context,
        step: &Step,
        options: &DecodeOptions,
        outputs: &Outputs,
    ) -> Result<DecodePlan> {
        Ok(self.validate_step(ctx, step, options, outputs)?.0)
    }

    fn validate_step(
        &self,
        ctx: &Context,
        step: &Step,
        options: &DecodeOptions,
        outputs: &Outputs,
    ) -> Result<(DecodePlan, Vec<u32>)> {
        self.check_owner(
            ctx,
            &[
                ("q", Some(step.q)),
                ("k", Some(step.k)),
                ("v", Some(step.v)),
                ("gate", step.gate),
                ("tau", step.tau),
                ("alpha", step.alpha),
                ("o", Some(outputs.o)),
                ("lse", outputs.lse),
                ("f_out", outputs.f_out),
            ],
        )?;
        let c = &self.cfg;
        if c.dtype == DType::F16 && !ctx.capabilities().f16 {
            return Err(Error::FeatureMissing {
                feature: "SHADER_F16",
            });
        }
        let (hq, n) = self.check_step_q(step)?;
        let counts = self.check_step_tensors(step, outputs, hq, n)?;
        let scale = match options.scale {
            Some(x) if !(x.is_finite() && x > 0.0) => return Err(Error::BadScale { scale: x }),
            Some(x) => x,
            None => 1.0 / (c.head_dim as f32).sqrt(),
        };
        if let Some(h) = options.selective {
            if h >= hq {
                return Err(Error::SelectionHeadOutOfRange {
                    head: h,
                    q_heads: hq,
                });
            }
        }
        let (_, lens, _) = self.plan_append(&counts);
        // A segmented cache runs each segment as a cache of its own (`seg_cap` is the capacity
        // otherwise).
        let max_len = lens.iter().copied().max().unwrap_or(1).min(self.seg_cap);
        self.check_step_aliases(step, outputs)?;
        check_bindings(
            ctx,
            &[
                Some(step.q),
                Some(step.k),
                Some(step.v),
                step.gate,
                step.tau,
                step.alpha,
                Some(outputs.o),
                outputs.lse,
            ],
        )?;
        let plan = decode::plan(
            ctx.capabilities(),
            DecodeShape {
                batch: c.batch,
                q_heads: hq,
                kv_heads: c.kv_heads,
                head_dim: c.head_dim,
                n,
                capacity: self.seg_cap,
                max_len,
            },
            c.dtype == DType::F16,
            scale,
            crate::Switches {
                selective: options.selective.is_some(),
                tau: step.tau.is_some(),
                alpha: step.alpha.is_some(),
                gate: c.gate,
                lse: outputs.lse.is_some(),
                ..crate::Switches::NONE
            },
            options.selective.unwrap_or(0),
            options.splits,
            options.threads,
            options.rows,
        )?;
        Ok((plan, counts))
    }

    /// Checks a step's queries against the cache; returns (query heads, queries per sequence).
    fn check_step_q(&self, step: &Step) -> Result<(u32, u32)> {
        let c = &self.cfg;
        let qs = step.q.shape();
        if qs.len() != 4 {
            return Err(Error::RankMismatch {
                tensor: "q",
                rank: 4,
                got: qs.to_vec(),
            });
        }
        for (what, cache, got) in [
            ("batch of q", c.batch, qs[0]),
            ("head dim of q", c.head_dim, qs[3]),
        ] {
            if cache as u64 != got {
                return Err(Error::CacheMismatch {
                    what,
                    cache,
                    got: got.min(u32::MAX as u64) as u32,
                });
            }
        }
        let hq = u32::try_from(qs[1]).unwrap_or(u32::MAX);
        let n = u32::try_from(qs[2]).unwrap_or(u32::MAX);
        if hq == 0 {
            return Err(Error::ZeroSize { what: "q_heads" });
        }
        if !hq.is_multiple_of(c.kv_heads) {
            return Err(Error::HeadsNotMultiple {
                q_heads: hq,
                kv_heads: c.kv_heads,
            });
        }
        if n == 0 || n > MAX_QUERIES {
            return Err(Error::QueriesPerStep {
                got: qs[2],
                max: MAX_QUERIES,
            });
        }
        check("q", step.q, qs.to_vec(), c.dtype)?;
        Ok((hq, n))
    }

    /// Checks a step's new tokens, temperatures, outputs and positions against the cache and
    /// the queries; returns the tokens appended per sequence.
    fn check_step_tensors(
        &self,
        step: &Step,
        outputs: &Outputs,
        hq: u32,
        n: u32,
    ) -> Result<Vec<u32>> {
        let c = &self.cfg;
        let qs = step.q.shape();
        let kv = vec![
            c.batch as u64,
            c.kv_heads as u64,
            n as u64,
            c.head_dim as u64,
        ];
        if step.k.shape().len() == 4 && step.k.shape() != kv.as_slice() {
            let ks = step.k.shape();
            for (what, cache, got) in [
                ("KV heads of k", c.kv_heads, ks[1]),
                ("head dim of k", c.head_dim, ks[3]),
            ] {
                if cache as u64 != got {
                    return Err(Error::CacheMismatch {
                        what,
                        cache,
                        got: got.min(u32::MAX as u64) as u32,
                    });
                }
            }
        }
        check("k", step.k, kv.clone(), c.dtype)?;
        let tokens = Tokens {
            k: step.k,
            v: step.v,
            gate: step.gate,
            f: None,
        };
        let (_, counts) = self.check_tokens(&tokens, step.counts)?;
        let rows = vec![c.batch as u64, hq as u64, n as u64];
        if let Some(t) = step.tau {
            check("tau", t, rows.clone(), DType::F32)?;
        }
        if let Some(a) = step.alpha {
            check("alpha", a, vec![hq as u64], DType::F32)?;
        }
        check("o", outputs.o, qs.to_vec(), c.dtype)?;
        if let Some(l) = outputs.lse {
            check("lse", l, rows, DType::F32)?;
        }
        if outputs.f_out.is_some() {
            return Err(Error::InputWithoutUse {
                what: "F_out",
                why: "a decode step keeps the selective state in the cache",
            });
        }
        if let Some(p) = step.positions {
            if p.len() != c.batch as usize {
                return Err(Error::LengthMismatch {
                    what: "positions",
                    expected: c.batch as u64,
                    got: p.len() as u64,
                });
            }
            for (b, (&want, &have)) in p.iter().zip(&self.next_pos).enumerate() {
                if want != have {
                    return Err(Error::StalePosition {
                        batch: b as u32,
                        cache: have,
                        expected: want,
                    });
                }
            }
        }
        Ok(counts)
    }

    /// No output may alias an input, the cache's own buffers, or another output.
    fn check_step_aliases(&self, step: &Step, outputs: &Outputs) -> Result<()> {
        let ins = [
            Some(step.q),
            Some(step.k),
            Some(step.v),
            step.gate,
            step.tau,
            step.alpha,
        ];
        let outs = [Some(outputs.o), outputs.lse];
        self.check_no_alias(&ins)?;
        self.check_no_alias(&outs)?;
        for out in outs.iter().flatten() {
            if ins.iter().flatten().any(|t| t.buffer() == out.buffer()) {
                return Err(Error::BadBuffer {
                    why: "an output buffer aliases an input".into(),
                });
            }
        }
        if let (Some(l), o) = (outputs.lse, outputs.o) {
            if l.buffer() == o.buffer() {
                return Err(Error::BadBuffer {
                    why: "O and LSE share a buffer".into(),
                });
            }
        }
        Ok(())
    }

    /// Records one decode step into an encoder the application owns (no submit), optionally
    /// with GPU timestamps at the beginning and end of its one compute pass.
    ///
    /// The encoder must have been created from the cache's context's device: wgpu 30 offers no
    /// way to ask an encoder for its device, so this can't be checked here (an encoder of
    /// another device is a caller bug that wgpu may report by panicking).
    pub fn encode_step(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        step: &Step,
        options: &DecodeOptions,
        outputs: &Outputs,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        if timestamps.is_some() && !ctx.capabilities().timestamps {
            return Err(Error::FeatureMissing {
                feature: "TIMESTAMP_QUERY",
            });
        }
        let (plan, counts) = self.validate_step(ctx, step, options, outputs)?;
        // A failed recording leaves the checkpoints as they were (their copies were not made).
        let cps = self.checkpoints.clone();
        let r = ctx.scoped("recording a decode step", || {
            let (_, _, ev) = self.plan_append(&counts);
            self.save_before_evictions(ctx, encoder, &ev);
            if self.segmented() {
                let s = (step, outputs, options);
                self.record_step_segments(ctx, encoder, s, &plan, &counts, timestamps)
            } else {
                self.record_step(ctx, encoder, step, outputs, &plan, &counts, timestamps)
            }
        });
        let (lens, ev) = match r {
            Ok(x) => x,
            Err(e) => {
                self.checkpoints = cps;
                return Err(e);
            }
        };
        if plan.score.is_some() {
            // Queries next_pos .. next_pos + count added their scores to F.
            for (b, &cnt) in counts.iter().enumerate() {
                if cnt > 0 {
                    self.f_touched[b] = self.next_pos[b] + cnt as u64;
                }
            }
        }
        self.commit(&counts, lens, ev);
        Ok(())
    }

    /// Records a validated step; returns the lengths and evictions to commit.
    #[allow(clippy::too_many_arguments)]
    fn record_step(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        step: &Step,
        outputs: &Outputs,
        plan: &DecodePlan,
        counts: &[u32],
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<(Vec<u32>, Vec<u64>)> {
        if self.groups.len() > 1 && crate::kernels::knob_on(decode::GROUP_PARTS_ENV) {
            return self.record_step_groups(ctx, encoder, step, outputs, plan, counts, timestamps);
        }
        let p = plan.params;
        let gpu = ctx.gpu();
        let part = gpu.grow(&mut self.part, plan.part_bytes(), "selattn decode partials");
        let fq = match plan.score {
            Some(_) => gpu.grow(&mut self.fq, plan.fq_bytes(), "selattn decode F rows"),
            None => gpu.dummy_out.clone(),
        };
        let (info, lens, ev) = self.plan_append(counts);
        let step_buf = gpu.storage("selattn cache step", bytemuck::cast_slice(&info));
        let tokens = Tokens {
            k: step.k,
            v: step.v,
            gate: step.gate,
            f: None,
        };
        let buffers = decode::StepBuffers {
            q: bound(step.q),
            tau: step.tau.map(bound),
            alpha: step.alpha.map(bound),
            o: bound(outputs.o),
            lse: outputs.lse.map(bound),
            step: &step_buf,
            fq: &fq,
            part: &part,
        };
        let max_len = lens.iter().copied().max().unwrap_or(1);
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("selattn decode"),
                timestamp_writes: timestamps,
            });
            // Append (and evict) the step's tokens, then score, attend and merge.
            self.encode_append_pass(ctx, &mut pass, &tokens, p.n, counts, &step_buf)?;
            for g in &self.groups {
                let mut plan = *plan;
                plan.params.b0 = g.b0;
                plan.params.batch = g.nb;
                let elem = self.cfg.dtype;
                decode::encode_step(
                    &gpu,
                    &mut pass,
                    &plan,
                    elem,
                    max_len,
                    &buffers,
                    &g.buffers(),
                )?;
            }
        }
        Ok((lens, ev))
    }

    /// [`KvCache::record_step`] for an unsegmented cache in several sequence groups with
    /// [`decode::GROUP_PARTS_ENV`] on: the append in a pass of its own, one transition of every
    /// group's K, V, gate and positions to read-only, then every group's attend into a
    /// partials buffer of its own (no barrier between them: they write different buffers),
    /// then each group's merge.
    #[allow(clippy::too_many_arguments)]
    fn record_step_groups(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        step: &Step,
        outputs: &Outputs,
        plan: &DecodePlan,
        counts: &[u32],
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<(Vec<u32>, Vec<u64>)> {
        let p = plan.params;
        let gpu = ctx.gpu();
        let caps = ctx.capabilities();
        let limit = caps.max_storage_binding.min(caps.max_buffer);
        let d4 = self.cfg.head_dim as u64 / 4;
        // Each group's partials: its own sequences' rows (pb0 = b0 in the kernels).
        let mut sizes = vec![];
        for g in &self.groups {
            let part_rows = g.nb as u64 * p.q_heads as u64 * p.n as u64 * p.splits as u64;
            let ml_base = part_rows * d4;
            let bytes = 16 * part_rows * (d4 + 1);
            if bytes > limit || ml_base + part_rows > u32::MAX as u64 {
                return Err(Error::TooLarge {
                    what: "decode partials",
                    bytes,
                    limit,
                });
            }
            sizes.push((bytes, ml_base as u32));
        }
        if self.seg_parts.len() < self.groups.len() {
            self.seg_parts.resize_with(self.groups.len(), || None);
        }
        let parts: Vec<wgpu::Buffer> = self
            .seg_parts
            .iter_mut()
            .zip(&sizes)
            .map(|(slot, &(bytes, _))| gpu.grow(slot, bytes, "selattn decode group partials"))
            .collect();
        let fq = match plan.score {
            Some(_) => Some(gpu.grow(&mut self.fq, plan.fq_bytes(), "selattn decode F rows")),
            None => None,
        };
        let (info, lens, ev) = self.plan_append(counts);
        let step_buf = gpu.storage("selattn cache step", bytemuck::cast_slice(&info));
        let tokens = Tokens {
            k: step.k,
            v: step.v,
            gate: step.gate,
            f: None,
        };
        // Without selective masking the attend binds F rows only nominally: its own partials
        // then (the shared writable dummy would put a barrier between the dispatches).
        let buffers = |part| decode::StepBuffers {
            q: bound(step.q),
            tau: step.tau.map(bound),
            alpha: step.alpha.map(bound),
            o: bound(outputs.o),
            lse: outputs.lse.map(bound),
            step: &step_buf,
            fq: fq.as_ref().unwrap_or(part),
            part,
        };
        let max_len = lens.iter().copied().max().unwrap_or(1);
        let (ts_append, ts_attend) = split_stamps(timestamps);
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("selattn decode append"),
                timestamp_writes: ts_append,
            });
            self.encode_append_pass(ctx, &mut pass, &tokens, p.n, counts, &step_buf)?;
        }
        self.transition_read_only(encoder, 0..self.groups.len());
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("selattn decode"),
            timestamp_writes: ts_attend,
        });
        let mut uniforms = vec![];
        for ((g, part), &(_, ml_base)) in self.groups.iter().zip(&parts).zip(&sizes) {
            let mut gp = *plan;
            gp.params.b0 = g.b0;
            gp.params.batch = g.nb;
            gp.params.pb0 = g.b0;
            gp.params.ml_base = ml_base;
            let params = gpu.uniform("selattn cache params", bytemuck::bytes_of(&gp.params));
            let sb = buffers(part);
            let cb = g.buffers();
            let elem = self.cfg.dtype;
            decode::encode_score_attend(
                &gpu, &mut pass, &gp, elem, max_len, p.splits, &sb, &cb, &params,
            )?;
            uniforms.push((gp, params));
        }
        for ((gp, params), part) in uniforms.iter().zip(&parts) {
            let sb = buffers(part);
            decode::encode_merge(&gpu, &mut pass, gp, self.cfg.dtype, &sb, params)?;
        }
        Ok((lens, ev))
    }

    /// Records one transition of groups `range`'s K, V, gate and positions to read-only
    /// storage: one barrier after an append for all of them, instead of one before each
    /// dispatch that reads some of them.
    fn transition_read_only(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        range: impl IntoIterator<Item = usize>,
    ) {
        let read = wgpu::BufferUses::STORAGE_READ_ONLY;
        let mut transitions = vec![];
        for gi in range {
            let g = &self.groups[gi];
            let gate = g.gate.as_ref().map(|t| t.buffer());
            for buffer in [g.k.buffer(), g.v.buffer(), g.pos.buffer()]
                .into_iter()
                .chain(gate)
            {
                transitions.push(wgpu::BufferTransition {
                    buffer,
                    state: read,
                });
            }
        }
        encoder.transition_resources(
            transitions.into_iter(),
            std::iter::empty::<wgpu::TextureTransition<&wgpu::Texture>>(),
        );
    }
}

/// A step's pass timestamps split over two passes: the beginning on the first, the end on the
/// second.
fn split_stamps(
    timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
) -> (
    Option<wgpu::ComputePassTimestampWrites<'_>>,
    Option<wgpu::ComputePassTimestampWrites<'_>>,
) {
    match timestamps {
        Some(t) => (
            t.beginning_of_pass_write_index
                .map(|i| wgpu::ComputePassTimestampWrites {
                    query_set: t.query_set,
                    beginning_of_pass_write_index: Some(i),
                    end_of_pass_write_index: None,
                }),
            t.end_of_pass_write_index
                .map(|i| wgpu::ComputePassTimestampWrites {
                    query_set: t.query_set,
                    beginning_of_pass_write_index: None,
                    end_of_pass_write_index: Some(i),
                }),
        ),
        None => (None, None),
    }
}

impl KvCache {
    /// [`KvCache::record_step`] for a segmented cache: the append, then per segment the score
    /// and attend kernels for every sequence (the segment's slots as a cache of their own;
    /// slots before the segment are occupied in every sequence that reaches it), each
    /// segment's splits written side by side in one partials buffer, and one merge of all of
    /// them (O and LSE).
    fn record_step_segments(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        (step, outputs, options): (&Step, &Outputs, &DecodeOptions),
        plan: &DecodePlan,
        counts: &[u32],
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<(Vec<u32>, Vec<u64>)> {
        let p = plan.params;
        let c = self.cfg;
        let (info, lens, ev) = self.plan_append(counts);
        let max_len = lens.iter().copied().max().unwrap_or(1).max(1);
        // The segments any sequence reaches, each with its plan, its first split in the
        // partials and its slot plan. Each attend dispatch covers one sequence's segment (a
        // group), so its plan is made for a batch of one (planned for the whole batch, B16 x
        // 16384 in 3 segments ran 16 workgroups per dispatch, 103 GB/s on the H200, with a
        // barrier between every two dispatches).
        // Segments reached; with at most 8, each (sequence, segment) gets partials of its own
        // and the dispatches run side by side (see below), so each gets fewer, longer splits.
        let reached = max_len.div_ceil(self.seg_cap) as usize;
        let gather = reached <= decode::MERGE_SEGMENTS
            && crate::kernels::knob_on(decode::SEGMENT_GATHER_ENV);
        let splits = options.splits.or(gather.then_some(decode::SEGMENT_SPLITS));
        let mut segs = vec![];
        let mut s0 = 0u32;
        let mut total = 0u32;
        while s0 < max_len {
            let cs = self.seg_cap.min(c.capacity - s0);
            let seg_info: Vec<[u32; 4]> = info
                .iter()
                .map(|&[l0, p0, cnt, after]| [l0, p0, cnt, after.saturating_sub(s0).min(cs)])
                .collect();
            let seg_max = seg_info.iter().map(|x| x[3]).max().unwrap_or(1).max(1);
            let sp = decode::plan(
                ctx.capabilities(),
                DecodeShape {
                    batch: 1,
                    q_heads: p.q_heads,
                    kv_heads: c.kv_heads,
                    head_dim: c.head_dim,
                    n: p.n,
                    capacity: cs,
                    max_len: seg_max,
                },
                c.dtype == DType::F16,
                p.scale,
                crate::Switches {
                    selective: plan.score.is_some(),
                    tau: plan.attend.features.tau,
                    alpha: plan.attend.features.alpha,
                    gate: c.gate,
                    lse: plan.merge.features.lse,
                    ..crate::Switches::NONE
                },
                options.selective.unwrap_or(0),
                splits,
                options.threads,
                options.rows,
            )?;
            segs.push((s0, sp, total, seg_max, seg_info));
            total = total.saturating_add(sp.params.splits);
            s0 += cs;
        }
        let gpu = ctx.gpu();
        let caps = ctx.capabilities();
        let limit = caps.max_storage_binding.min(caps.max_buffer);
        let d4 = c.head_dim as u64 / 4;
        let rows = p.q_heads as u64 * p.n as u64;
        let fq = match plan.score {
            Some(_) => Some(gpu.grow(&mut self.fq, plan.fq_bytes(), "selattn decode F rows")),
            None => None,
        };
        let step_buf = gpu.storage("selattn cache step", bytemuck::cast_slice(&info));
        let seg_bufs: Vec<wgpu::Buffer> = segs
            .iter()
            .map(|x| gpu.storage("selattn cache segment step", bytemuck::cast_slice(&x.4)))
            .collect();
        let tokens = Tokens {
            k: step.k,
            v: step.v,
            gate: step.gate,
            f: None,
        };
        // Without selective masking the attend kernel binds F rows only nominally: its own
        // partials buffer then (a buffer every dispatch writes would put a barrier between
        // them).
        let buffers = |sbuf, part| decode::StepBuffers {
            q: bound(step.q),
            tau: step.tau.map(bound),
            alpha: step.alpha.map(bound),
            o: bound(outputs.o),
            lse: outputs.lse.map(bound),
            step: sbuf,
            fq: fq.as_ref().unwrap_or(part),
            part,
        };
        let too_large = |bytes| Error::TooLarge {
            what: "decode partials",
            bytes,
            limit,
        };
        if !gather {
            // Every segment's splits side by side in one buffer, merged once. Every attend
            // dispatch writes it, so wgpu puts a barrier between every two of them.
            let part_rows = c.batch as u64 * rows * total as u64;
            let ml_base = part_rows * d4;
            let part_bytes = 16 * part_rows * (d4 + 1);
            if part_bytes > limit || ml_base + part_rows > u32::MAX as u64 {
                return Err(too_large(part_bytes));
            }
            let part = gpu.grow(&mut self.part, part_bytes, "selattn decode partials");
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("selattn decode"),
                timestamp_writes: timestamps,
            });
            self.encode_append_pass(ctx, &mut pass, &tokens, p.n, counts, &step_buf)?;
            for ((s0, sp, split0, seg_max, _), sbuf) in segs.iter().zip(&seg_bufs) {
                let sb = buffers(sbuf, &part);
                for g in self.groups.iter().filter(|g| g.s0 == *s0) {
                    let mut gp = *sp;
                    gp.params.b0 = g.b0;
                    gp.params.batch = g.nb;
                    gp.params.splits = total;
                    gp.params.split0 = *split0;
                    gp.params.ml_base = ml_base as u32;
                    let cb = g.buffers();
                    let params =
                        gpu.uniform("selattn cache params", bytemuck::bytes_of(&gp.params));
                    let (sm, n_splits) = (*seg_max, sp.params.splits);
                    decode::encode_score_attend(
                        &gpu, &mut pass, &gp, c.dtype, sm, n_splits, &sb, &cb, &params,
                    )?;
                }
            }
            let mut mp = *plan;
            mp.params.b0 = 0;
            mp.params.batch = c.batch;
            mp.params.splits = total;
            mp.params.split0 = 0;
            mp.params.ml_base = ml_base as u32;
            let params = gpu.uniform("selattn cache params", bytemuck::bytes_of(&mp.params));
            let sb = buffers(&step_buf, &part);
            decode::encode_merge(&gpu, &mut pass, &mp, c.dtype, &sb, &params)?;
            return Ok((lens, ev));
        }
        // A partials buffer per (sequence, segment): the attend dispatches write different
        // buffers, so none waits for another (with selective masking they share the F rows, so
        // they do). Dispatches over slots this step's append wrote would each wait behind a K/V
        // transition; the one transition below removes that, and the order spreads them among
        // the others anyway. Then merges over the sequences' segment buffers.
        let nseg_all = self.segments() as usize;
        let mut sizes = vec![];
        for (_, sp, ..) in &segs {
            let part_rows = rows * sp.params.splits as u64;
            let ml_base = part_rows * d4;
            let bytes = 16 * part_rows * (d4 + 1);
            if bytes > limit || ml_base + part_rows > u32::MAX as u64 {
                return Err(too_large(bytes));
            }
            sizes.push((bytes, ml_base as u32));
        }
        if self.seg_parts.len() < self.groups.len() {
            self.seg_parts.resize_with(self.groups.len(), || None);
        }
        // parts[b][k]: groups are stored sequence by sequence, segment by segment.
        let mut parts: Vec<Vec<wgpu::Buffer>> = vec![];
        for b in 0..c.batch as usize {
            let mut row = vec![];
            for (k, (s0, ..)) in segs.iter().enumerate() {
                let gi = b * nseg_all + k;
                let g = &self.groups[gi];
                if g.b0 as usize != b || g.s0 != *s0 {
                    return Err(Error::gpu_msg("segmented cache: groups out of order"));
                }
                let slot = &mut self.seg_parts[gi];
                row.push(gpu.grow(slot, sizes[k].0, "selattn decode segment partials"));
            }
            parts.push(row);
        }
        // Which (sequence, segment) the append writes (see `encode_append_segments`).
        let lim = c.limit();
        let fresh = |b: usize, k: usize| {
            let [l0, _, cnt, _] = info[b];
            let quiet = cnt.min(lim.saturating_sub(l0));
            let (s0, cs) = (segs[k].0, self.groups[b * nseg_all + k].cs);
            (quiet > 0 && s0 < l0 + quiet && l0 < s0 + cs) || (cnt > quiet && s0 < lim)
        };
        let mut fresh_list = vec![];
        let mut other = vec![];
        for k in 0..segs.len() {
            for b in 0..c.batch as usize {
                if fresh(b, k) {
                    fresh_list.push((b, k));
                } else {
                    other.push((b, k));
                }
            }
        }
        let per = other.len().div_ceil(fresh_list.len().max(1));
        let mut order = vec![];
        let mut rest = other.chunks(per.max(1));
        for f in &fresh_list {
            order.push(*f);
            order.extend(rest.next().unwrap_or(&[]));
        }
        for r in rest {
            order.extend(r);
        }
        // The append in a pass of its own, then every group's K, V, gate and positions made
        // read-only at once: one barrier for all the slots the append wrote, instead of one
        // before each attend dispatch that reads some of them.
        let (ts_append, ts_attend) = split_stamps(timestamps);
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("selattn decode append"),
                timestamp_writes: ts_append,
            });
            self.encode_append_pass(ctx, &mut pass, &tokens, p.n, counts, &step_buf)?;
        }
        self.transition_read_only(encoder, order.iter().map(|&(b, k)| b * nseg_all + k));
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("selattn decode"),
            timestamp_writes: ts_attend,
        });
        for (b, k) in order {
            let (_, sp, _, seg_max, _) = &segs[k];
            let g = &self.groups[b * nseg_all + k];
            let mut gp = *sp;
            gp.params.b0 = g.b0;
            gp.params.batch = g.nb;
            gp.params.pb0 = g.b0;
            gp.params.ml_base = sizes[k].1;
            let cb = g.buffers();
            let params = gpu.uniform("selattn cache params", bytemuck::bytes_of(&gp.params));
            let sb = buffers(&seg_bufs[k], &parts[b][k]);
            let n_splits = sp.params.splits;
            decode::encode_score_attend(
                &gpu, &mut pass, &gp, c.dtype, *seg_max, n_splits, &sb, &cb, &params,
            )?;
        }
        // Merges of as many sequences as the kernel's 8 partials bindings take.
        let per_merge = (decode::MERGE_SEGMENTS / segs.len()).max(1);
        for (mi, seqs) in parts.chunks(per_merge).enumerate() {
            let mut mp = decode::MergeSegParams {
                q_heads: p.q_heads,
                n: p.n,
                b0: (mi * per_merge) as u32,
                nseg: segs.len() as u32,
                nseq: seqs.len() as u32,
                ..Default::default()
            };
            for (k, (_, sp, ..)) in segs.iter().enumerate() {
                mp.splits[k] = sp.params.splits;
                mp.ml_base[k] = sizes[k].1;
            }
            let refs: Vec<&wgpu::Buffer> = seqs.iter().flatten().collect();
            let sb = buffers(&step_buf, &seqs[0][0]);
            decode::encode_merge_segments(&gpu, &mut pass, plan.merge, c.dtype, &mp, &refs, &sb)?;
        }
        Ok((lens, ev))
    }
}

/// What a failed call restores (see [`KvCache::restore`]).
struct HostState {
    next_pos: Vec<u64>,
    len: Vec<u32>,
    evictions: Vec<u64>,
    f_touched: Vec<u64>,
    checkpoints: Vec<Option<SeqCheckpoint>>,
    serial: u64,
}

/// `slot`'s buffer, or a new one of `bytes` (copied to and from, never bound) stored in it.
fn copy_buffer(
    ctx: &Context,
    slot: &mut Option<wgpu::Buffer>,
    bytes: u64,
    label: &str,
) -> wgpu::Buffer {
    let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    ctx.gpu().grow_as(slot, bytes, label, usage)
}

/// Records a copy of `size` bytes (nothing when 0; offsets and sizes are multiples of 4: K and
/// V rows hold a multiple of 8 elements).
fn copy(
    encoder: &mut wgpu::CommandEncoder,
    src: &wgpu::Buffer,
    src_off: u64,
    dst: &wgpu::Buffer,
    dst_off: u64,
    size: u64,
) {
    if size > 0 {
        encoder.copy_buffer_to_buffer(src, src_off, dst, dst_off, size);
    }
}

/// A tensor as the kernels bind it: its buffer and its own bytes.
fn bound(t: &Tensor) -> (&wgpu::Buffer, u64) {
    (t.buffer(), t.bytes())
}

/// Checks that each tensor's bytes fit one storage binding (they are bound as their own bytes).
fn check_bindings(ctx: &Context, ts: &[Option<&Tensor>]) -> Result<()> {
    let limit = ctx.capabilities().max_storage_binding;
    for t in ts.iter().flatten() {
        if t.bytes() > limit {
            return Err(Error::TooLarge {
                what: "tensor bound to a decode kernel",
                bytes: t.bytes(),
                limit,
            });
        }
    }
    Ok(())
}

/// Threads of the append kernel: the largest power of two up to 256 the device allows (its
/// reduction is a tree).
pub fn append_threads(max_invocations: u32) -> u32 {
    let m = max_invocations.clamp(1, 256);
    if m.is_power_of_two() {
        m
    } else {
        m.next_power_of_two() / 2
    }
}
