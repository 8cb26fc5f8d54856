//! Generates a long sequence over a KV cache with synthetic projections, without and with a
//! pruning budget, and prints memory in use, tokens per second, evictions and KV bandwidth.
//!
//! ```text
//! cargo run --release --example decode -- [--prompt 64] [--len 256] [--batch 2] [--heads 8]
//!     [--kv-heads 2] [--dim 64] [--queries 1] [--budget N] [--f16] [--selective]
//!     [--splits N] [--threads N] [--rows N] [--check 8] [--warmup N] [--json PATH] [--no-prune]
//!     [--trace N] [--sync-steps] [--heat-ms 500] [--sweep "splits=4;threads=128,rows=2;..."]
//!     [--max-buffer-bytes N]
//! ```
//!
//! Each sequence is first filled with `--prompt` tokens (K and V appended without attention),
//! then decoded for `--len` steps of `--queries` tokens. The run is repeated with a budget
//! (default a quarter of the final length). The first `--check` steps are checked against the
//! CPU reference (`selattn::reference_cache`) when the sequence is short enough for it.
//! For decode speed at a fixed length use a long prompt and a short `--len`, e.g.
//! `--prompt 131072 --len 64 --batch 1`.

use std::time::Instant;

use selattn::reference_cache::{HostQueries, HostTokens, RefCache};
use selattn::{
    Context, DType, DecodeOptions, KvCache, KvCacheConfig, Outputs, Result, Step, Tensor, Tokens,
};

/// Decode steps over a KV cache, with and without context pruning, checked against the reference.
#[derive(Clone, Debug, clap::Parser)]
struct Args {
    /// Prompt tokens appended before the first step (at least 1).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    prompt: u32,
    /// Decode steps.
    #[arg(long, default_value_t = 256)]
    len: u32,
    /// Sequences.
    #[arg(long, default_value_t = 2)]
    batch: u32,
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    heads: u32,
    /// KV heads.
    #[arg(long, default_value_t = 2)]
    kv_heads: u32,
    /// Head dim.
    #[arg(long, default_value_t = 64)]
    dim: u32,
    /// Queries per sequence per step.
    #[arg(long, default_value_t = 1)]
    queries: u32,
    /// Pruning budget in slots (default: a quarter of the final length, at least 3).
    #[arg(long)]
    budget: Option<u32>,
    /// Store K, V, queries and outputs as f16.
    #[arg(long)]
    f16: bool,
    /// Selective masking (selection head 0).
    #[arg(long)]
    selective: bool,
    /// Slot splits of the attend kernel.
    #[arg(long)]
    splits: Option<u32>,
    /// Threads per workgroup of the attend kernel (tuning).
    #[arg(long)]
    threads: Option<u32>,
    /// Query rows per workgroup of the attend kernel, at most (tuning).
    #[arg(long)]
    rows: Option<u32>,
    /// Untimed steps after the checked ones, before the timed ones (the first step builds the
    /// pipelines on the host; the GPU's clock is taken care of by `--heat-ms`).
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// Steps checked against the reference.
    #[arg(long, default_value_t = 8)]
    check: u32,
    /// Print the timed steps in chunks of this many: GPU ms per step (timestamps) and host ms
    /// per step spent recording and submitting (diagnostics of slow starts).
    #[arg(long)]
    trace: Option<u32>,
    /// Wait for the GPU after every step (the GPU then idles between steps).
    #[arg(long)]
    sync_steps: bool,
    /// Keep the GPU busy (buffer copies) this many ms right before the timed steps. An idle GPU
    /// runs at a low clock and takes a few hundred ms of load to reach its full clock (H200:
    /// 345 MHz to 1980 MHz, 2026-12-03, BENCHMARKS.md); without this the first timed steps of a
    /// large batch run at up to 5x their steady time. 0: no heating.
    #[arg(long, default_value_t = 500)]
    heat_ms: u32,
    /// Tuning sweep over one cache: variants separated by `;`, each `default` or a comma list of
    /// `splits=N`, `threads=N`, `rows=N`, `parts=0/1` (`SELATTN_DECODE_GROUP_PARTS`),
    /// `prefetch=0/1` (`SELATTN_DECODE_PREFETCH`). Each variant runs `--len` steps (the first
    /// untimed), after heating, then every sequence is truncated back to the prompt. No budget,
    /// no selective masking, no checks; prints GPU ms per step (mean, median) and KV GB/s each.
    #[arg(long)]
    sweep: Option<String>,
    /// Largest buffer of the cache in bytes (`KvCacheConfig::max_buffer_bytes`): below one
    /// sequence's K, sequences are stored in segments (compare with the same run without it).
    #[arg(long)]
    max_buffer_bytes: Option<u64>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<String>,
    /// Only the run without a budget.
    #[arg(long)]
    no_prune: bool,
}

impl Args {
    /// `(B, Hq, Hkv, D, queries per step)`, as tensor dimensions.
    fn dims(&self) -> (u64, u64, u64, u64, u64) {
        let u = |v: u32| v as u64;
        (
            u(self.batch),
            u(self.heads),
            u(self.kv_heads),
            u(self.dim),
            u(self.queries),
        )
    }

    /// The element type of K, V, queries and outputs.
    fn dtype(&self) -> DType {
        if self.f16 {
            DType::F16
        } else {
            DType::F32
        }
    }
}

/// Reproducible synthetic projections from the shared seeded generator.
struct Rng(selattn_tools::testing::Rng);
impl Rng {
    fn normals(&mut self, n: usize, f16: bool) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let x = self.0.normal();
                if f16 {
                    half::f16::from_f32(x).to_f32()
                } else {
                    x
                }
            })
            .collect()
    }
}

/// Host and GPU copies of one step's synthetic Q, K and V.
struct StepData {
    host_q: Vec<f32>,
    host_kv: HostTokens,
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

struct Report {
    budget: Option<u32>,
    final_len: u64,
    bytes_allocated: u64,
    bytes_in_use: u64,
    evictions: u64,
    /// None when every step was a checked one (`--len` <= `--check`): nothing was timed.
    tokens_per_s: Option<f64>,
    ms_per_step_wall: Option<f64>,
    ms_per_step_gpu: Option<f64>,
    ms_per_step_gpu_median: Option<f64>,
    kv_gb_per_s: Option<f64>,
    checked_steps: u32,
    max_err: f64,
    /// Per chunk of `--trace` timed steps: (GPU ms per step, host ms per step).
    trace: Vec<(f64, f64)>,
}

fn upload(ctx: &Context, dims: &[u64], x: &[f32], f16: bool) -> Result<Tensor> {
    if f16 {
        ctx.upload_f16(dims, x)
    } else {
        ctx.upload(dims, x)
    }
}

/// The timestamp writes of the `t`-th timed pass: a pair of queries in `qs`.
fn pass_stamps(qs: &wgpu::QuerySet, t: u32) -> wgpu::ComputePassTimestampWrites<'_> {
    wgpu::ComputePassTimestampWrites {
        query_set: qs,
        beginning_of_pass_write_index: Some(2 * t),
        end_of_pass_write_index: Some(2 * t + 1),
    }
}

/// GPU nanoseconds of each of the first `n` passes timed with [`pass_stamps`] into `qs`, once
/// the work is submitted.
fn pass_times_ns(ctx: &Context, qs: &wgpu::QuerySet, n: u32) -> Result<Vec<f64>> {
    let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16 * n as u64,
        usage: wgpu::BufferUsages::QUERY_RESOLVE
            | wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let mut enc = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    enc.resolve_query_set(qs, 0..2 * n, &resolve, 0);
    ctx.queue.submit([enc.finish()]);
    // Timestamps are u64: read them as 2 u32 words each.
    let t = Tensor::from_buffer(ctx, resolve, &[4 * n as u64], DType::U32)?;
    let raw: Vec<u64> = bytemuck::pod_collect_to_vec(&ctx.download_bytes(&t)?);
    let period = ctx.queue.get_timestamp_period() as f64;
    Ok(raw
        .chunks(2)
        .map(|c| c[1].saturating_sub(c[0]) as f64 * period)
        .collect())
}

/// Keeps the GPU busy with buffer copies for `ms` milliseconds of wall time (nothing when 0).
fn heat(ctx: &Context, ms: u32) -> Result<()> {
    if ms == 0 {
        return Ok(());
    }
    let size = 64u64 << 20;
    let buf = |label| {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    };
    let (x, y) = (buf("heat a"), buf("heat b"));
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() * 1e3 < ms as f64 {
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        for _ in 0..16 {
            enc.copy_buffer_to_buffer(&x, 0, &y, 0, size);
            enc.copy_buffer_to_buffer(&y, 0, &x, 0, size);
        }
        ctx.queue.submit([enc.finish()]);
        ctx.sync()?;
    }
    Ok(())
}

/// The median of `xs` (None when empty).
fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}

fn run(ctx: &Context, a: &Args, budget: Option<u32>) -> Result<Report> {
    let total = a.prompt + a.len * a.queries;
    let dtype = a.dtype();
    let capacity = budget.unwrap_or(total);
    let mut cfg = KvCacheConfig::new(a.batch, a.kv_heads, a.dim, capacity).dtype(dtype);
    if let Some(b) = budget {
        cfg = cfg.budget(b);
    }
    if let Some(m) = a.max_buffer_bytes {
        cfg = cfg.max_buffer_bytes(m);
    }
    let mut cache = KvCache::new(ctx, cfg)?;
    if cache.segments() > 1 {
        println!(
            "  cache in {} segments of {} slots per sequence",
            cache.segments(),
            cache.segment_slots()
        );
    }
    let (b, hq, hkv, d, n) = a.dims();
    let mut rng = Rng(selattn_tools::testing::Rng::from_state(7));
    let check = a.check > 0 && (total as u64) * b * hq * d <= 1 << 24;
    let mut reference = if check {
        Some(RefCache::new(cfg)?)
    } else {
        None
    };

    // 1. The prompt, appended in chunks of at most 4096 tokens (one chunk reused).
    let chunk = a.prompt.min(4096) as u64;
    let kv_n = (b * hkv * chunk * d) as usize;
    let host = HostTokens {
        n: chunk as usize,
        k: rng.normals(kv_n, a.f16),
        v: rng.normals(kv_n, a.f16),
        gate: None,
        f: None,
    };
    let kc = upload(ctx, &[b, hkv, chunk, d], &host.k, a.f16)?;
    let vc = upload(ctx, &[b, hkv, chunk, d], &host.v, a.f16)?;
    let mut left = a.prompt;
    while left > 0 {
        let c = left.min(chunk as u32);
        let counts = vec![c; a.batch as usize];
        cache.append(ctx, &Tokens::new(&kc, &vc), Some(&counts))?;
        if let Some(r) = reference.as_mut() {
            r.append(&host, Some(&counts))?;
        }
        left -= c;
    }
    ctx.sync()?;

    // 2. A pool of synthetic steps, reused round robin.
    let pool: Vec<StepData> = (0..16)
        .map(|_| -> Result<StepData> {
            let host_q = rng.normals((b * hq * n * d) as usize, a.f16);
            let kv_n = (b * hkv * n * d) as usize;
            let host_kv = HostTokens {
                n: n as usize,
                k: rng.normals(kv_n, a.f16),
                v: rng.normals(kv_n, a.f16),
                gate: None,
                f: None,
            };
            Ok(StepData {
                q: upload(ctx, &[b, hq, n, d], &host_q, a.f16)?,
                k: upload(ctx, &[b, hkv, n, d], &host_kv.k, a.f16)?,
                v: upload(ctx, &[b, hkv, n, d], &host_kv.v, a.f16)?,
                host_q,
                host_kv,
            })
        })
        .collect::<Result<_>>()?;
    let o = ctx.empty(&[b, hq, n, d], dtype)?;
    let lse = ctx.empty(&[b, hq, n], DType::F32)?;
    let mut opts = DecodeOptions::new();
    if a.selective {
        opts = opts.selective(0);
    }
    opts.splits = a.splits;
    opts.threads = a.threads;
    opts.rows = a.rows;

    // 3. Checked steps first (each waits for the GPU), then timed steps.
    let mut max_err = 0.0f64;
    let mut checked = 0;
    let mut kv_bytes_read = 0u64;
    let per_slot_bytes = hkv * d * dtype.size() * 2 + 4 + if a.selective { 4 } else { 0 };
    let n_check = if reference.is_some() {
        a.check.min(a.len)
    } else {
        0
    };
    // Checked steps, then warm-up steps, then timed ones.
    let untimed = n_check + a.warmup.min(a.len - n_check);
    let timed_steps = a.len - untimed;
    let timed = ctx.capabilities().timestamps;
    let n_ts = timed_steps.min(1024);
    // No query set when no step is timed (wgpu refuses an empty one).
    let qs = (timed && n_ts > 0).then(|| {
        ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("decode timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * n_ts,
        })
    });
    let mut start = Instant::now();
    // Host seconds spent recording and submitting each timed step.
    let mut host_s: Vec<f64> = Vec::with_capacity(n_ts as usize);
    for s in 0..a.len {
        if s == untimed {
            heat(ctx, a.heat_ms)?;
            ctx.sync()?;
            start = Instant::now();
        }
        let t0 = Instant::now();
        // Index of this step among the timed ones, if it is one.
        let ti = s.checked_sub(untimed).filter(|&t| t < n_ts);
        let p = &pool[s as usize % pool.len()];
        let step = Step::new(&p.q, &p.k, &p.v);
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        let ts = match (&qs, ti) {
            (Some(qs), Some(t)) => Some(pass_stamps(qs, t)),
            _ => None,
        };
        cache.encode_step(ctx, &mut enc, &step, &opts, &Outputs::new(&o).lse(&lse), ts)?;
        ctx.queue.submit([enc.finish()]);
        if ti.is_some() {
            host_s.push(t0.elapsed().as_secs_f64());
        }
        if a.sync_steps {
            ctx.sync()?;
        }
        if ti.is_some() {
            kv_bytes_read += cache.lens().iter().map(|&l| l as u64).sum::<u64>() * per_slot_bytes;
        }
        if let Some(r) = reference.as_mut() {
            if s < n_check {
                let x = HostQueries {
                    q_heads: hq as usize,
                    q: p.host_q.clone(),
                    tau: None,
                    alpha: None,
                };
                let want = r.step(&x, &p.host_kv, None, opts.selective)?;
                let got = ctx.download(&o)?;
                for (g, w) in got.iter().zip(&want.o) {
                    let e = (*g as f64 - w).abs();
                    max_err = if e.is_nan() {
                        f64::INFINITY
                    } else {
                        max_err.max(e)
                    };
                }
                checked += 1;
            }
        }
    }
    ctx.sync()?;
    let wall = start.elapsed().as_secs_f64();
    let mut gpu_step_ns: Vec<f64> = vec![];
    let gpu_s = match &qs {
        Some(qs) => {
            gpu_step_ns = pass_times_ns(ctx, qs, n_ts)?;
            Some(gpu_step_ns.iter().sum::<f64>() * 1e-9)
        }
        None => None,
    };
    let trace = match a.trace {
        Some(k) if k > 0 => gpu_step_ns
            .chunks(k as usize)
            .zip(host_s.chunks(k as usize))
            .map(|(g, h)| {
                (
                    g.iter().sum::<f64>() * 1e-6 / g.len() as f64,
                    h.iter().sum::<f64>() * 1e3 / h.len() as f64,
                )
            })
            .collect(),
        _ => vec![],
    };
    let final_len = cache.lens().iter().copied().max().unwrap_or(0) as u64;
    Ok(Report {
        budget,
        final_len,
        bytes_allocated: cache.bytes(),
        bytes_in_use: cache.bytes_in_use(),
        evictions: cache.evictions().iter().sum(),
        tokens_per_s: (timed_steps > 0)
            .then(|| (timed_steps as f64 * a.queries as f64 * a.batch as f64) / wall),
        ms_per_step_wall: (timed_steps > 0).then(|| wall * 1e3 / timed_steps as f64),
        ms_per_step_gpu: gpu_s.map(|g| g * 1e3 / n_ts.max(1) as f64),
        ms_per_step_gpu_median: median(&gpu_step_ns).map(|ns| ns * 1e-6),
        kv_gb_per_s: gpu_s
            .filter(|&g| g > 0.0)
            .map(|g| kv_bytes_read as f64 / g / 1e9),
        checked_steps: checked,
        max_err,
        trace,
    })
}

/// Parses one `--sweep` variant into decode options.
fn variant(spec: &str) -> std::result::Result<DecodeOptions, String> {
    let mut o = DecodeOptions::new();
    // `parts=1` and `prefetch=1` turn on the off-by-default knobs SELATTN_DECODE_GROUP_PARTS and
    // SELATTN_DECODE_PREFETCH for this variant (every other variant runs with them as the
    // environment set them).
    use selattn::kernels::decode::{ATTEND_PREFETCH_ENV, GROUP_PARTS_ENV};
    static OUTER: std::sync::OnceLock<[Option<String>; 2]> = std::sync::OnceLock::new();
    let knobs = [GROUP_PARTS_ENV, ATTEND_PREFETCH_ENV];
    let outer = OUTER.get_or_init(|| knobs.map(|k| std::env::var(k).ok()));
    for (k, v) in knobs.iter().zip(outer) {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
    for kv in spec
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty() && *x != "default")
    {
        let (k, v) = kv.split_once('=').ok_or(format!("{kv}: key=value"))?;
        let v: u32 = v.parse().map_err(|e| format!("{kv}: {e}"))?;
        match k {
            "splits" => o.splits = Some(v),
            "threads" => o.threads = Some(v),
            "rows" => o.rows = Some(v),
            "parts" => std::env::set_var(GROUP_PARTS_ENV, v.to_string()),
            "prefetch" => std::env::set_var(ATTEND_PREFETCH_ENV, v.to_string()),
            _ => return Err(format!("{k}: splits, threads, rows, parts or prefetch")),
        }
    }
    Ok(o)
}

/// `--sweep`: every variant over one cache filled once (see [`Args::sweep`]).
fn sweep(
    ctx: &Context,
    a: &Args,
    spec: &str,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let dtype = a.dtype();
    let mut cfg =
        KvCacheConfig::new(a.batch, a.kv_heads, a.dim, a.prompt + a.len * a.queries).dtype(dtype);
    if let Some(m) = a.max_buffer_bytes {
        cfg = cfg.max_buffer_bytes(m);
    }
    let mut cache = KvCache::new(ctx, cfg)?;
    let (b, hq, hkv, d, n) = a.dims();
    let mut rng = Rng(selattn_tools::testing::Rng::from_state(7));
    let mut random = |dims: [u64; 4]| {
        let x = rng.normals(dims.iter().product::<u64>() as usize, a.f16);
        upload(ctx, &dims, &x, a.f16)
    };
    let chunk = a.prompt.min(4096) as u64;
    let kc = random([b, hkv, chunk, d])?;
    let vc = random([b, hkv, chunk, d])?;
    let mut left = a.prompt;
    while left > 0 {
        let c = left.min(chunk as u32);
        cache.append(
            ctx,
            &Tokens::new(&kc, &vc),
            Some(&vec![c; a.batch as usize]),
        )?;
        left -= c;
    }
    let q = random([b, hq, n, d])?;
    let k = random([b, hkv, n, d])?;
    let v = random([b, hkv, n, d])?;
    let o = ctx.empty(&[b, hq, n, d], dtype)?;
    let per_slot = hkv * d * dtype.size() * 2 + 4;
    let timed = a.len.saturating_sub(1).clamp(1, 1024);
    let qs = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("sweep timestamps"),
        ty: wgpu::QueryType::Timestamp,
        count: 2 * timed,
    });
    for spec in spec.split(';') {
        let opts = variant(spec)?;
        let plan = cache.plan_step(ctx, &Step::new(&q, &k, &v), &opts, &Outputs::new(&o))?;
        let mut bytes = 0u64;
        for s in 0..a.len {
            if s == 1 {
                heat(ctx, a.heat_ms)?;
                ctx.sync()?;
            }
            let mut enc = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            let t = s.checked_sub(1).filter(|&t| t < timed);
            let ts = t.map(|t| pass_stamps(&qs, t));
            let step = Step::new(&q, &k, &v);
            cache.encode_step(ctx, &mut enc, &step, &opts, &Outputs::new(&o), ts)?;
            ctx.queue.submit([enc.finish()]);
            if t.is_some() {
                bytes += cache.lens().iter().map(|&l| l as u64).sum::<u64>() * per_slot;
            }
        }
        let ns = pass_times_ns(ctx, &qs, timed)?;
        let total: f64 = ns.iter().sum();
        println!(
            "sweep {spec:>24}: splits {:>3} threads {:>3} rows {:>2}: {:.4} ms/step GPU (median {:.4}), KV read {:.0} GB/s",
            plan.params.splits,
            plan.attend.wg,
            plan.attend.rb,
            total * 1e-6 / ns.len() as f64,
            median(&ns).unwrap_or(0.0) * 1e-6,
            bytes as f64 / total
        );
        for bi in 0..a.batch {
            cache.truncate_sequence(bi, a.prompt as u64)?;
        }
    }
    Ok(())
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let a = <Args as clap::Parser>::parse();
    let ctx = Context::new()?;
    println!("adapter: {}", ctx.describe());
    if let Some(spec) = &a.sweep {
        return sweep(&ctx, &a, spec);
    }
    println!(
        "B {} Hq {} Hkv {} D {} prompt {} + {} steps x {} tokens, {}{}",
        a.batch,
        a.heads,
        a.kv_heads,
        a.dim,
        a.prompt,
        a.len,
        a.queries,
        if a.f16 { "f16" } else { "f32" },
        if a.selective { ", selective" } else { "" }
    );
    let total = a.prompt + a.len * a.queries;
    let budget = a.budget.unwrap_or((total / 4).max(3));
    let mut rows = vec![];
    let runs: &[Option<u32>] = if a.no_prune {
        &[None]
    } else {
        &[None, Some(budget)]
    };
    for &b in runs {
        let r = run(&ctx, &a, b)?;
        println!(
            "budget {:>8}: final length {:>7}, memory {:>8.2} MiB allocated, {:>8.2} MiB in use, \
             evictions {:>8}, {}{}{}{}",
            b.map_or("none".into(), |x| x.to_string()),
            r.final_len,
            r.bytes_allocated as f64 / 1048576.0,
            r.bytes_in_use as f64 / 1048576.0,
            r.evictions,
            match (r.tokens_per_s, r.ms_per_step_wall) {
                (Some(t), Some(w)) => format!("{t:>9.1} tokens/s, {w:.3} ms/step wall"),
                _ => "no timed steps (--len <= --check + --warmup)".to_string(),
            },
            match (r.ms_per_step_gpu, r.ms_per_step_gpu_median) {
                (Some(g), Some(m)) => format!(", {g:.3} ms/step GPU (median {m:.3})"),
                (Some(g), None) => format!(", {g:.3} ms/step GPU"),
                _ => String::new(),
            },
            r.kv_gb_per_s
                .map_or(String::new(), |g| format!(", KV read {g:.3} GB/s")),
            if r.checked_steps > 0 {
                format!(
                    ", first {} steps vs reference: max |err| {:.2e}",
                    r.checked_steps, r.max_err
                )
            } else {
                String::new()
            }
        );
        if let Some(k) = a.trace.filter(|_| !r.trace.is_empty()) {
            let line: Vec<String> = r
                .trace
                .iter()
                .map(|(g, h)| format!("{g:.3}/{h:.3}"))
                .collect();
            println!(
                "  per {k} timed steps, GPU ms/step / host ms/step: {}",
                line.join(" ")
            );
        }
        let tol = if a.f16 { 1e-2 } else { 1e-4 };
        if r.checked_steps > 0 && (r.max_err.is_nan() || r.max_err > tol) {
            return Err(format!(
                "decode disagrees with the reference: max error {:.3e}",
                r.max_err
            )
            .into());
        }
        rows.push(r);
    }
    if let Some(path) = &a.json {
        let runs: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "budget": r.budget,
                    "final_len": r.final_len,
                    "bytes_allocated": r.bytes_allocated,
                    "bytes_in_use": r.bytes_in_use,
                    "evictions": r.evictions,
                    "tokens_per_s": r.tokens_per_s,
                    "ms_per_step_wall": r.ms_per_step_wall,
                    "ms_per_step_gpu": r.ms_per_step_gpu,
                    "ms_per_step_gpu_median": r.ms_per_step_gpu_median,
                    "kv_gb_per_s": r.kv_gb_per_s,
                    "checked_steps": r.checked_steps,
                    "max_err": r.max_err,
                    "trace_gpu_host_ms": r.trace,
                })
            })
            .collect();
        let json = serde_json::json!({
            "adapter": ctx.describe(),
            "batch": a.batch,
            "heads": a.heads,
            "kv_heads": a.kv_heads,
            "dim": a.dim,
            "prompt": a.prompt,
            "len": a.len,
            "warmup": a.warmup,
            "heat_ms": a.heat_ms,
            "queries": a.queries,
            "f16": a.f16,
            "selective": a.selective,
            "runs": runs,
        });
        let json = format!("{json}\n");
        std::fs::write(path, json).map_err(|e| format!("{path}: {e}"))?;
        println!("wrote {path}");
    }
    Ok(())
}
