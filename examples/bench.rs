//! Benchmarks selattn's attention forward on any GPU wgpu can reach.
//!
//! ```text
//! cargo run --release --example bench                      # the peer script's shapes, every variant
//! cargo run --release --example bench -- --quick           # tiny shapes: software adapters, CI smoke
//! cargo run --release --example bench -- --shape 4,16,4096,128 --variant full --dtype f16 --json out.json
//! cargo run --release --example bench -- --backward --variant plain --variant full --causal yes
//! ```
//!
//! For each shape × dtype × variant × causal × path it
//! 1. validates the variant once against the f64 CPU reference at a small slice of the shape
//!    (same D and head grouping), so a wrong kernel is never timed as if it were right;
//! 2. warms up (pipeline build, caches, clocks);
//! 3. times many runs and reports the median and the minimum: GPU timestamps around the one
//!    compute pass of each call when the adapter has TIMESTAMP_QUERY, otherwise wall clock around
//!    a submission and the wait for it to finish (`--wall` forces this);
//! 4. checks that the timed run's LSE is finite everywhere.
//!
//! FLOPs are `4·B·Hq·Nq·Nk·D`, halved when causal — the same count as the PyTorch peer script, no
//! credit for the selective passes. Bytes are Q, K, V read once, O and LSE written once, plus the
//! optional inputs the variant uses (tau, alpha, gate); the selective scratch is not counted.
//! With `--backward` each row times a forward and a backward call recorded together (every
//! gradient of the variant's inputs: dQ, dK, dV, and dtau, dalpha, dgate, dF0 where the variant
//! has them), wall clock around a submission of both, FLOPs counted as 3.5× the forward's (the
//! peer script's `--backward` count); the check compares every gradient with the f64 reference
//! backward at a small slice of the shape.
//! A configuration the device cannot run (f16 without SHADER_F16, a path it lacks, a size over a
//! limit) becomes a row carrying the error, not a crash.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use selattn::reference::{self, HostInputs};
use selattn::{
    Context, DType, Error, Inputs, Options, Outputs, Path, Shape, Spec, Switches, Tensor,
};

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    Plain,
    Temp,
    Gate,
    Selective,
    Full,
}

impl Variant {
    const ALL: [Variant; 5] = [
        Variant::Plain,
        Variant::Temp,
        Variant::Gate,
        Variant::Selective,
        Variant::Full,
    ];
    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Temp => "temp",
            Variant::Gate => "gate",
            Variant::Selective => "selective",
            Variant::Full => "full",
        }
    }
    /// The switches this named variant turns on (`causal` is a separate bench option).
    fn switches(self, causal: bool) -> Switches {
        let temp = matches!(self, Variant::Temp | Variant::Full);
        let selective = matches!(self, Variant::Selective | Variant::Full);
        Switches {
            causal,
            selective,
            tau: temp,
            alpha: temp,
            gate: matches!(self, Variant::Gate | Variant::Full),
            lse: true,
            ..Switches::NONE
        }
    }
    fn temperature(self) -> bool {
        self.switches(true).tau
    }
    fn gate(self) -> bool {
        self.switches(true).gate
    }
    fn selective(self) -> bool {
        self.switches(true).selective
    }
}

fn path_name(p: Path) -> &'static str {
    match p {
        Path::Auto => "auto",
        Path::Scalar => "scalar",
        Path::Coop => "coop",
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::U32 => "u32",
    }
}

struct Args {
    shapes: Vec<Shape>,
    variants: Vec<Variant>,
    causal: Vec<bool>,
    dtypes: Vec<DType>,
    paths: Vec<Path>,
    warmup: u32,
    heat: Duration,
    iters: u32,
    budget: f64,
    wall: bool,
    check: bool,
    json: Option<String>,
    backward: bool,
    profile: bool,
}

/// Untimed runs before a row is timed: at least `a.warmup` of them and at least `a.heat` of
/// load, so the GPU's clock is up; a run slower than half the row's budget ends the warm-up.
fn warm_up(a: &Args, mut run: impl FnMut() -> selattn::Result<f64>) -> selattn::Result<()> {
    let started = Instant::now();
    let mut n = 0;
    loop {
        let ms = run()?;
        n += 1;
        if ms * 1e-3 > a.budget / 2.0 || (n >= a.warmup.max(1) && started.elapsed() >= a.heat) {
            return Ok(());
        }
    }
}

fn parse_shape(s: &str) -> Result<Shape, String> {
    let v: Vec<u32> = s
        .split(',')
        .map(|x| x.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{s}: {e}"))?;
    match v[..] {
        [b, h, n, d] => Ok(Shape::new(b, h, n, d)),
        [b, hq, hkv, nq, nk, d] => Ok(Shape {
            batch: b,
            q_heads: hq,
            kv_heads: hkv,
            q_len: nq,
            k_len: nk,
            head_dim: d,
        }),
        _ => Err(format!("{s}: want B,H,N,D or B,Hq,Hkv,Nq,Nk,D")),
    }
}

/// Benchmarks selattn's attention forward (or forward + backward) on any GPU wgpu can reach.
#[derive(clap::Parser)]
#[command(name = "bench")]
struct Cli {
    /// B,H,N,D or B,Hq,Hkv,Nq,Nk,D; repeatable. Default: 4,16,4096,64 4,16,4096,128
    /// 1,16,16384,64 4,32,8,4096,4096,128 (GQA).
    #[arg(long = "shape", value_name = "SHAPE", value_parser = parse_shape)]
    shapes: Vec<Shape>,
    /// Repeatable (default all). plain: no controls; temp: tau + alpha; gate: value gate;
    /// selective (or sel): selective masking (selection head 0); full: tau + alpha + gate +
    /// selective.
    #[arg(long = "variant", value_enum)]
    variants: Vec<VariantArg>,
    /// Selective and full run causal only.
    #[arg(long, value_enum, default_value = "both")]
    causal: CausalArg,
    /// Element type.
    #[arg(long, value_enum, default_value = "both")]
    dtype: DTypeArg,
    /// Kernel path; repeatable (default auto).
    #[arg(long = "path", value_enum)]
    paths: Vec<PathArg>,
    /// Untimed runs before timing (default 3; 1 with --quick).
    #[arg(long, value_name = "N")]
    warmup: Option<u32>,
    /// Keep warming up each row for at least this long (default 300; 0 with --quick). An idle
    /// GPU runs at a low clock and needs a few hundred ms of load to reach its full clock (H200:
    /// 345 MHz to 1980 MHz, BENCHMARKS.md); a row timed right after building its pipelines or
    /// checking against the CPU reference otherwise starts slow and its median lies.
    #[arg(long, value_name = "MS")]
    heat_ms: Option<u64>,
    /// Timed runs, median reported (default 30; 3 with --quick).
    #[arg(long, value_name = "N")]
    iters: Option<u32>,
    /// Stop timing a row after this long, but never before 3 runs (default 3; 0.5 with --quick).
    #[arg(long, value_name = "SECONDS")]
    budget: Option<f64>,
    /// Wall clock even where GPU timestamps exist.
    #[arg(long)]
    wall: bool,
    /// Skip the small-shape check against the CPU reference.
    #[arg(long)]
    no_check: bool,
    /// Use the adapter whose name contains NAME (same as SELATTN_ADAPTER).
    #[arg(long, value_name = "NAME")]
    adapter: Option<String>,
    /// Also write the rows as a JSON array.
    #[arg(long, value_name = "PATH")]
    json: Option<String>,
    /// Tiny shapes, 1 warm-up, 3 runs: software adapters and CI smoke tests.
    #[arg(long)]
    quick: bool,
    /// Time forward + backward (all gradients; FLOPs 3.5x the forward's).
    #[arg(long)]
    backward: bool,
    /// Also a per-kernel GPU profile of each row (timestamps before every dispatch of the
    /// forward call, or with --backward of the backward call and around the forward's pass;
    /// needs TIMESTAMP_QUERY_INSIDE_PASSES), median of 5 runs per dispatch.
    #[arg(long)]
    profile: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum VariantArg {
    Plain,
    Temp,
    Gate,
    #[value(alias = "sel")]
    Selective,
    Full,
    All,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CausalArg {
    Yes,
    No,
    Both,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Both,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PathArg {
    Auto,
    Scalar,
    Coop,
    All,
}

fn parse_args() -> Args {
    let c = <Cli as clap::Parser>::parse();
    if let Some(name) = &c.adapter {
        // Context::new reads the filter from the environment; setting it here, before any
        // thread exists, is the same as the user setting it.
        std::env::set_var(selattn::ADAPTER_ENV, name);
    }
    let mut a = Args {
        shapes: c.shapes,
        variants: vec![],
        causal: match c.causal {
            CausalArg::Yes => vec![true],
            CausalArg::No => vec![false],
            CausalArg::Both => vec![false, true],
        },
        dtypes: match c.dtype {
            DTypeArg::F32 => vec![DType::F32],
            DTypeArg::F16 => vec![DType::F16],
            DTypeArg::Both => vec![DType::F32, DType::F16],
        },
        paths: vec![],
        warmup: 3,
        heat: Duration::from_millis(300),
        iters: 30,
        budget: 3.0,
        wall: c.wall,
        check: !c.no_check,
        json: c.json,
        backward: c.backward,
        profile: c.profile,
    };
    for v in c.variants {
        match v {
            VariantArg::Plain => a.variants.push(Variant::Plain),
            VariantArg::Temp => a.variants.push(Variant::Temp),
            VariantArg::Gate => a.variants.push(Variant::Gate),
            VariantArg::Selective => a.variants.push(Variant::Selective),
            VariantArg::Full => a.variants.push(Variant::Full),
            VariantArg::All => a.variants.extend(Variant::ALL),
        }
    }
    for p in c.paths {
        match p {
            PathArg::Auto => a.paths.push(Path::Auto),
            PathArg::Scalar => a.paths.push(Path::Scalar),
            PathArg::Coop => a.paths.push(Path::Coop),
            PathArg::All => a.paths.extend([Path::Auto, Path::Scalar, Path::Coop]),
        }
    }
    if c.quick {
        a.warmup = 1;
        a.heat = Duration::ZERO;
        a.iters = 3;
        a.budget = 0.5;
        if a.shapes.is_empty() {
            // One self-attention shape and one with GQA, Nq < Nk and lengths off every tile size.
            a.shapes = vec![Shape::new(1, 2, 128, 64), gqa(1, 4, 2, 50, 80, 32)];
        }
    }
    if a.shapes.is_empty() {
        a.shapes = vec![
            Shape::new(4, 16, 4096, 64),
            Shape::new(4, 16, 4096, 128),
            Shape::new(1, 16, 16384, 64),
            gqa(4, 32, 8, 4096, 4096, 128),
        ];
    }
    a.warmup = c.warmup.unwrap_or(a.warmup);
    a.heat = c.heat_ms.map(Duration::from_millis).unwrap_or(a.heat);
    a.iters = c.iters.map(|n| n.max(1)).unwrap_or(a.iters);
    a.budget = c.budget.unwrap_or(a.budget);
    if a.variants.is_empty() {
        a.variants = Variant::ALL.to_vec();
    }
    if a.paths.is_empty() {
        a.paths = vec![Path::Auto];
    }
    a
}

fn gqa(batch: u32, q_heads: u32, kv_heads: u32, q_len: u32, k_len: u32, head_dim: u32) -> Shape {
    Shape {
        batch,
        q_heads,
        kv_heads,
        q_len,
        k_len,
        head_dim,
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs

/// Box-Muller normals in pairs (cos and sin) from the shared seeded generator.
struct Rng(selattn_tools::testing::Rng);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(selattn_tools::testing::Rng::new(seed))
    }
    fn uniform(&mut self) -> f64 {
        self.0.uniform()
    }
    fn normals(&mut self, n: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(n + 1);
        while v.len() < n {
            let r = (-2.0 * self.uniform().max(1e-300).ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * self.uniform();
            v.push((r * t.cos()) as f32);
            v.push((r * t.sin()) as f32);
        }
        v.truncate(n);
        v
    }
    fn range(&mut self, lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| lo + (hi - lo) * self.uniform() as f32)
            .collect()
    }
}

fn count(d: Vec<u64>) -> usize {
    d.iter().product::<u64>() as usize
}

/// Seeded host inputs with every control present: Q, K, V standard normal, tau in [0.5, 1.5),
/// alpha in [0, 0.1) (small: it multiplies ln(position + 1)), gate in (0, 1).
fn host_inputs(s: &Shape, seed: u64) -> HostInputs {
    let mut rng = Rng::new(seed);
    HostInputs {
        q: rng.normals(count(s.q_dims())),
        k: rng.normals(count(s.kv_dims())),
        v: rng.normals(count(s.kv_dims())),
        tau: Some(rng.range(0.5, 1.5, count(s.row_dims()))),
        alpha: Some(rng.range(0.0, 0.1, count(s.alpha_dims()))),
        gate: Some(rng.range(1e-3, 1.0, count(s.gate_dims()))),
        kv_len: None,
        f0: None,
    }
}

/// The host inputs on the GPU, Q/K/V in `dtype`, the rest f32, with O and LSE to write.
struct Device {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau: Tensor,
    alpha: Tensor,
    gate: Tensor,
    o: Tensor,
    lse: Tensor,
}

impl Device {
    fn upload(ctx: &Context, s: &Shape, x: &HostInputs, dtype: DType) -> selattn::Result<Self> {
        let up = |dims: Vec<u64>, data: &[f32]| match dtype {
            DType::F16 => ctx.upload_f16(&dims, data),
            _ => ctx.upload(&dims, data),
        };
        Ok(Device {
            q: up(s.q_dims(), &x.q)?,
            k: up(s.kv_dims(), &x.k)?,
            v: up(s.kv_dims(), &x.v)?,
            tau: ctx.upload(&s.row_dims(), x.tau.as_deref().unwrap_or_default())?,
            alpha: ctx.upload(&s.alpha_dims(), x.alpha.as_deref().unwrap_or_default())?,
            gate: ctx.upload(&s.gate_dims(), x.gate.as_deref().unwrap_or_default())?,
            o: ctx.empty(&s.q_dims(), dtype)?,
            lse: ctx.empty(&s.row_dims(), DType::F32)?,
        })
    }

    fn inputs(&self, v: Variant) -> Inputs<'_> {
        let mut i = Inputs::new(&self.q, &self.k, &self.v);
        if v.temperature() {
            i = i.tau(&self.tau).alpha(&self.alpha);
        }
        if v.gate() {
            i = i.gate(&self.gate);
        }
        i
    }

    fn outputs(&self) -> Outputs<'_> {
        Outputs::new(&self.o).lse(&self.lse)
    }
}

fn options(v: Variant, causal: bool, path: Path) -> Options {
    let o = if causal {
        Options::causal()
    } else {
        Options::new()
    };
    let o = o.path(path);
    if v.selective() {
        o.selective(0)
    } else {
        o
    }
}

/// Bytes one call moves at the least: every input read once, every output written once.
fn moved_bytes(i: &Inputs, o: &Outputs) -> u64 {
    let opt = |t: Option<&Tensor>| t.map_or(0, |t| t.bytes());
    i.q.bytes()
        + i.k.bytes()
        + i.v.bytes()
        + opt(i.tau)
        + opt(i.alpha)
        + opt(i.gate)
        + o.o.bytes()
        + opt(o.lse)
        + opt(o.f_out)
}

fn flops(s: &Shape, causal: bool) -> f64 {
    let f = 4.0
        * s.batch as f64
        * s.q_heads as f64
        * s.q_len as f64
        * s.k_len as f64
        * s.head_dim as f64;
    if causal {
        f / 2.0
    } else {
        f
    }
}

// ---------------------------------------------------------------------------------------------
// Check against the reference

/// A small slice of `s` with the same head dim and head grouping, lengths off every tile size.
fn small_shape(s: &Shape) -> Shape {
    let kv_heads = s.kv_heads.min(2);
    let q_len = s.q_len.min(67);
    Shape {
        batch: s.batch.min(2),
        q_heads: kv_heads * s.group(),
        kv_heads,
        q_len,
        k_len: q_len + (s.k_len - s.q_len.min(s.k_len)).min(13),
        head_dim: s.head_dim,
    }
}

/// What the reference sees of variant `v`'s call: `x` loses the inputs the variant leaves out;
/// returns the call's spec.
fn reference_spec(x: &mut HostInputs, shape: Shape, v: Variant, opts: &Options) -> Spec {
    if !v.temperature() {
        x.tau = None;
        x.alpha = None;
    }
    if !v.gate() {
        x.gate = None;
    }
    Spec {
        shape,
        options: *opts,
        present: x.present(v.selective()),
    }
}

/// Norm-wise relative error of O against the f64 reference on a small slice of the shape.
fn check_small(
    ctx: &Context,
    s: &Shape,
    v: Variant,
    opts: &Options,
    dtype: DType,
) -> Result<f64, Error> {
    let small = small_shape(s);
    let mut x = host_inputs(&small, 7);
    if dtype == DType::F16 {
        // The reference sees what the GPU sees: Q, K, V rounded to f16.
        for t in [&mut x.q, &mut x.k, &mut x.v] {
            t.iter_mut()
                .for_each(|e| *e = half::f16::from_f32(*e).to_f32());
        }
    }
    let dev = Device::upload(ctx, &small, &x, dtype)?;
    ctx.poison(&dev.o)?;
    let inputs = dev.inputs(v);
    ctx.attention(&inputs, opts, &dev.outputs())?;
    let got = ctx.download(&dev.o)?;
    let spec = reference_spec(&mut x, small, v, opts);
    let want = reference::attention(&spec, &x)?;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &r) in got.iter().zip(&want.o) {
        let g = g as f64;
        // NaN must not vanish from the sum: count it as an infinite error.
        let e = if g.is_finite() { g - r } else { f64::INFINITY };
        num += e * e;
        den += r * r;
    }
    Ok((num / den.max(f64::MIN_POSITIVE)).sqrt())
}

// ---------------------------------------------------------------------------------------------
// Timing

/// Timestamp pairs per query set and per submission.
const BATCH: u32 = 16;

/// Where resolved timestamps go: a resolve buffer and the readback it is copied to.
struct Stamps {
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    bytes: u64,
}

impl Stamps {
    /// Both buffers, `bytes` long, labelled `"{label} resolve"` and `"{label} readback"`.
    fn new(ctx: &Context, label: &str, bytes: u64) -> Self {
        let buffer = |what: &str, usage| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&format!("{label} {what}")),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        use wgpu::BufferUsages as U;
        Stamps {
            resolve: buffer("resolve", U::QUERY_RESOLVE | U::COPY_SRC),
            read: buffer("readback", U::MAP_READ | U::COPY_DST),
            bytes,
        }
    }

    /// Copies the resolved timestamps (`enc` resolved them) to the readback, submits `enc`,
    /// waits for the GPU and returns the ticks.
    fn submit_and_read(
        &self,
        ctx: &Context,
        mut enc: wgpu::CommandEncoder,
    ) -> selattn::Result<Vec<u64>> {
        enc.copy_buffer_to_buffer(&self.resolve, 0, &self.read, 0, self.bytes);
        ctx.queue.submit([enc.finish()]);
        let slice = self.read.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        ctx.sync()?;
        rx.recv()
            .map_err(|e| Error::gpu("waiting for timestamps", e))?
            .map_err(|e| Error::gpu("mapping timestamps", e))?;
        let ticks: Vec<u64> = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| Error::gpu("reading timestamps", e))?;
            bytemuck::pod_collect_to_vec(&view)
        };
        self.read.unmap();
        Ok(ticks)
    }
}

/// Runs one call per pass, `n` times, and returns each run's GPU time in milliseconds, from
/// timestamps written at the beginning and end of the call's compute pass.
fn time_gpu(
    ctx: &Context,
    inputs: &Inputs,
    opts: &Options,
    outputs: &Outputs,
    n: u32,
) -> selattn::Result<Vec<f64>> {
    let dev = &ctx.device;
    let qs = dev.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("bench timestamps"),
        ty: wgpu::QueryType::Timestamp,
        count: 2 * BATCH,
    });
    let stamps = Stamps::new(ctx, "bench timestamp", 2 * BATCH as u64 * 8);
    let period = ctx.queue.get_timestamp_period() as f64;
    let mut out = Vec::with_capacity(n as usize);
    while (out.len() as u32) < n {
        let m = (n - out.len() as u32).min(BATCH);
        let mut enc = dev.create_command_encoder(&Default::default());
        for i in 0..m {
            let ts = wgpu::ComputePassTimestampWrites {
                query_set: &qs,
                beginning_of_pass_write_index: Some(2 * i),
                end_of_pass_write_index: Some(2 * i + 1),
            };
            ctx.encode_attention_timed(&mut enc, inputs, opts, outputs, ts)?;
        }
        enc.resolve_query_set(&qs, 0..2 * m, &stamps.resolve, 0);
        let ticks = stamps.submit_and_read(ctx, enc)?;
        for i in 0..m as usize {
            let dt = ticks[2 * i + 1].wrapping_sub(ticks[2 * i]) as f64 * period;
            out.push(dt * 1e-6);
        }
    }
    Ok(out)
}

/// One run, wall clock from submit until the GPU reports it finished, in milliseconds.
fn time_wall(
    ctx: &Context,
    inputs: &Inputs,
    opts: &Options,
    outputs: &Outputs,
) -> selattn::Result<f64> {
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    ctx.encode_attention(&mut enc, inputs, opts, outputs)?;
    let cmd = enc.finish();
    let t = Instant::now();
    ctx.queue.submit([cmd]);
    ctx.sync()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------------------------------------
// Rows

struct Row {
    /// Forward and backward timed together.
    backward: bool,
    shape: Shape,
    variant: Variant,
    causal: bool,
    dtype: DType,
    path: Path,
    /// The path the plan chose (never auto).
    path_used: Option<Path>,
    result: Result<Measured, String>,
}

struct Measured {
    ms: f64,
    min_ms: f64,
    runs: usize,
    tflops: f64,
    gbps: f64,
    flops: f64,
    bytes: u64,
    scratch: u64,
    alloc: u64,
    check: Option<f64>,
    check_ok: bool,
    finite: bool,
    /// Per-kernel GPU times (ms, medians): the forward pass, then each backward dispatch.
    profile: Vec<(String, f64)>,
}

fn tolerance(d: DType) -> f64 {
    match d {
        DType::F16 => 5e-3,
        _ => 2e-5,
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Runs `f` inside validation and out-of-memory error scopes; a GPU error either caught is
/// returned as an error of `what`. The scopes are popped whether or not `f` succeeds; an
/// error of `f` itself comes first.
fn error_scoped<T>(
    ctx: &Context,
    what: &'static str,
    f: impl FnOnce() -> selattn::Result<T>,
) -> selattn::Result<T> {
    let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let val = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let r = f();
    let caught = [pollster::block_on(val.pop()), pollster::block_on(oom.pop())];
    let t = r?;
    match caught.into_iter().flatten().next() {
        Some(e) => Err(Error::gpu(what, e)),
        None => Ok(t),
    }
}

/// Everything one row does, GPU errors caught by error scopes and returned as errors.
fn measure(
    ctx: &Context,
    a: &Args,
    dev: &Device,
    row: &mut Row,
    timestamps: bool,
) -> selattn::Result<Measured> {
    let s = row.shape;
    let opts = options(row.variant, row.causal, row.path);
    let inputs = dev.inputs(row.variant);
    let outputs = dev.outputs();
    let plan = ctx.plan(&inputs, &opts, &outputs)?;
    row.path_used = Some(plan.path);
    if a.backward {
        return measure_backward(ctx, a, dev, row, plan.scratch_bytes());
    }
    let scratch = plan.scratch_bytes();

    let (check, check_ok) = if a.check {
        let e = check_small(ctx, &s, row.variant, &opts, row.dtype)?;
        (Some(e), e <= tolerance(row.dtype))
    } else {
        (None, true)
    };

    let mut times = error_scoped(ctx, "timing the call", || {
        let budget = Duration::from_secs_f64(a.budget);
        warm_up(a, || time_wall(ctx, &inputs, &opts, &outputs))?;
        let started = Instant::now();
        let mut times = Vec::with_capacity(a.iters as usize);
        while (times.len() as u32) < a.iters {
            if times.len() >= 3 && started.elapsed() > budget {
                break;
            }
            if timestamps {
                // A batch of at most 4 before looking at the clock again, so slow rows stop early.
                let m = (a.iters - times.len() as u32).min(if times.is_empty() { 3 } else { 4 });
                times.extend(time_gpu(ctx, &inputs, &opts, &outputs, m)?);
            } else {
                times.push(time_wall(ctx, &inputs, &opts, &outputs)?);
            }
        }
        Ok(times)
    })?;
    let profile = if a.profile {
        error_scoped(ctx, "profiling the call", || {
            profile_forward(ctx, &inputs, &opts, &outputs)
        })?
    } else {
        Vec::new()
    };
    let finite = ctx.download(&dev.lse)?.iter().all(|x| x.is_finite());

    let runs = times.len();
    let min_ms = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let ms = median(&mut times);
    let fl = flops(&s, row.causal);
    let bytes = moved_bytes(&inputs, &outputs);
    let used = |t: Option<&Tensor>| t.map_or(0, |t| t.bytes());
    let alloc = inputs.q.bytes()
        + inputs.k.bytes()
        + inputs.v.bytes()
        + used(inputs.tau)
        + used(inputs.alpha)
        + used(inputs.gate)
        + outputs.o.bytes()
        + used(outputs.lse)
        + scratch;
    Ok(Measured {
        ms,
        min_ms,
        runs,
        tflops: fl / (ms * 1e-3) / 1e12,
        gbps: bytes as f64 / (ms * 1e-3) / 1e9,
        flops: fl,
        bytes,
        scratch,
        alloc,
        check,
        check_ok,
        finite,
        profile,
    })
}

/// Per-dispatch GPU times of one forward call (selective masking's column sums and scan, then
/// the attention kernel): a timestamp before every dispatch and one after the last, median of
/// 5 runs per dispatch.
fn profile_forward(
    ctx: &Context,
    inputs: &Inputs,
    opts: &Options,
    outputs: &Outputs,
) -> selattn::Result<Vec<(String, f64)>> {
    const CAP: u32 = 8;
    let dev = &ctx.device;
    let qs = dev.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("bench profile forward"),
        ty: wgpu::QueryType::Timestamp,
        count: CAP,
    });
    let stamps = Stamps::new(ctx, "bench profile forward", CAP as u64 * 8);
    let period = ctx.queue.get_timestamp_period() as f64;
    let mut labels = Vec::new();
    let mut samples: Vec<Vec<f64>> = Vec::new();
    for _ in 0..5 {
        let mut enc = dev.create_command_encoder(&Default::default());
        labels = ctx.encode_attention_profiled(&mut enc, inputs, opts, outputs, &qs, CAP)?;
        let n = labels.len() as u32 + 1;
        enc.resolve_query_set(&qs, 0..n, &stamps.resolve, 0);
        let ticks = stamps.submit_and_read(ctx, enc)?;
        let ms = |a: u64, b: u64| b.wrapping_sub(a) as f64 * period * 1e-6;
        samples.push(
            (0..labels.len())
                .map(|i| ms(ticks[i], ticks[i + 1]))
                .collect(),
        );
    }
    Ok(labels
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let mut v: Vec<f64> = samples.iter().map(|r| r[i]).collect();
            (name, median(&mut v))
        })
        .collect())
}

fn shape_text(s: &Shape) -> String {
    if s.q_heads == s.kv_heads && s.q_len == s.k_len {
        format!("{},{},{},{}", s.batch, s.q_heads, s.q_len, s.head_dim)
    } else {
        format!(
            "{},{},{},{},{},{}",
            s.batch, s.q_heads, s.kv_heads, s.q_len, s.k_len, s.head_dim
        )
    }
}

fn human_bytes(b: u64) -> String {
    let b = b as f64;
    match b {
        b if b >= (1u64 << 30) as f64 => format!("{:.2}G", b / (1u64 << 30) as f64),
        b if b >= (1u64 << 20) as f64 => format!("{:.1}M", b / (1u64 << 20) as f64),
        b if b >= 1024.0 => format!("{:.1}K", b / 1024.0),
        b => format!("{b}"),
    }
}

/// Three significant digits however small (software adapters run at MFLOP/s).
fn sig3(x: f64) -> String {
    match x.abs() {
        a if a >= 100.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.1}"),
        a if a >= 0.01 => format!("{x:.2}"),
        _ => format!("{x:.1e}"),
    }
}

const HEADER: &str = "shape                 variant   causal dtype path         ms        min  TFLOP/s     GB/s  scratch    alloc  check";

fn print_row(r: &Row) {
    let path = match r.path_used {
        Some(u) if u != r.path => format!("{}>{}", path_name(r.path), path_name(u)),
        _ => path_name(r.path).to_string(),
    };
    let head = format!(
        "{:21} {:9} {:6} {:5} {:11}",
        shape_text(&r.shape),
        if r.backward {
            format!("{}+bwd", r.variant.name())
        } else {
            r.variant.name().to_string()
        },
        if r.causal { "yes" } else { "no" },
        dtype_name(r.dtype),
        path
    );
    match &r.result {
        Ok(m) => {
            let check = match m.check {
                Some(e) if m.check_ok => format!("ok {e:.1e}"),
                Some(e) => format!("FAIL {e:.1e}"),
                None => "-".into(),
            };
            let finite = if m.finite { "" } else { "  NON-FINITE LSE" };
            println!(
                "{head} {:9.3} {:9.3} {:>8} {:>8} {:>8} {:>8}  {check}{finite}",
                m.ms,
                m.min_ms,
                sig3(m.tflops),
                sig3(m.gbps),
                human_bytes(m.scratch),
                human_bytes(m.alloc)
            );
        }
        Err(e) => println!("{head}  error: {e}"),
    }
    if let Ok(m) = &r.result {
        if !m.profile.is_empty() {
            let total: f64 = m.profile.iter().map(|(_, t)| t).sum();
            let parts: Vec<String> = m
                .profile
                .iter()
                .map(|(k, t)| format!("{k} {t:.2}"))
                .collect();
            println!("  profile ms (GPU, total {total:.2}): {}", parts.join(", "));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON

/// A number for the report; JSON has no infinity or NaN, so those are null.
fn json_num(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::Value::Null
    }
}

fn json_rows(ctx: &Context, timer: &str, rows: &[Row]) -> String {
    let i = &ctx.capabilities().info;
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let s = r.shape;
            let mut o = serde_json::json!({
                "adapter": i.name,
                "backend": format!("{:?}", i.backend),
                "driver": i.driver,
                "driver_info": i.driver_info,
                "timer": if r.backward { "wall-clock" } else { timer },
                "pass": if r.backward { "fwd+bwd" } else { "fwd" },
                "shape": [s.batch, s.q_heads, s.kv_heads, s.q_len, s.k_len, s.head_dim],
                "variant": r.variant.name(),
                "causal": r.causal,
                "dtype": dtype_name(r.dtype),
                "path": path_name(r.path),
                "path_used": r.path_used.map(path_name),
                "error": r.result.as_ref().err(),
            });
            if let Ok(m) = &r.result {
                let measured = serde_json::json!({
                    "ms": json_num(m.ms),
                    "min_ms": json_num(m.min_ms),
                    "runs": m.runs,
                    "tflops": json_num(m.tflops),
                    "gbps": json_num(m.gbps),
                    "flops": json_num(m.flops),
                    "bytes": m.bytes,
                    "scratch_bytes": m.scratch,
                    "alloc_bytes": m.alloc,
                    "check_rel_err": m.check.map(json_num),
                    "check_ok": m.check_ok,
                    "lse_finite": m.finite,
                    "profile_ms": m.profile.iter().map(|(k, t)| serde_json::json!([k, json_num(*t)])).collect::<Vec<_>>(),
                });
                if let (Some(o), serde_json::Value::Object(m)) = (o.as_object_mut(), measured) {
                    o.extend(m);
                }
            }
            o
        })
        .collect();
    format!("{:#}\n", serde_json::Value::Array(rows))
}

// ---------------------------------------------------------------------------------------------

/// What the table measures and how: adapter, features, timer, the FLOP and byte counts.
fn print_header(ctx: &Context, a: &Args, timestamps: bool, timer: &str) {
    let caps = ctx.capabilities();
    println!("adapter: {}", ctx.describe());
    println!(
        "features: f16 {}, subgroups {} ({}..{}), cooperative matrix 16x16 f16 {}, timestamps {}",
        caps.f16,
        caps.subgroups,
        caps.subgroup_min_size,
        caps.subgroup_max_size,
        caps.coop_16x16_f16(),
        caps.timestamps
    );
    println!(
        "timer: {} ({}), warm-up {} runs and {} ms, median of up to {} runs (at least {}, about {} s per row)",
        timer,
        if timestamps {
            "begin/end of the call's compute pass"
        } else {
            "submit until the device is idle"
        },
        a.warmup,
        a.heat.as_millis(),
        a.iters,
        a.iters.min(3),
        a.budget
    );
    println!("TFLOP/s counts 4*B*Hq*Nq*Nk*D, halved when causal; GB/s counts Q,K,V,O,LSE and the variant's inputs once");
    if a.backward {
        println!("--backward: each row is a forward and a backward call timed together by wall clock; TFLOP/s counts 3.5x the forward");
    }
    println!("{HEADER}");
}

fn main() {
    let a = parse_args();
    let ctx = match Context::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(1);
        }
    };
    // wgpu panics on a GPU error no error scope caught (an allocation outside `measure`, say);
    // count them instead, so the row it happened in reports an error and the others still run.
    static UNCAPTURED: AtomicUsize = AtomicUsize::new(0);
    ctx.device.on_uncaptured_error(Arc::new(|e| {
        UNCAPTURED.fetch_add(1, Ordering::SeqCst);
        eprintln!("bench: GPU error outside an error scope: {e}");
    }));
    let caps = ctx.capabilities();
    let timestamps = caps.timestamps && !a.wall;
    let timer = if timestamps {
        "gpu-timestamps"
    } else {
        "wall-clock"
    };
    print_header(&ctx, &a, timestamps, timer);

    let mut rows = Vec::new();
    for (si, shape) in a.shapes.iter().enumerate() {
        let x = host_inputs(shape, 1000 + si as u64);
        for &dtype in &a.dtypes {
            let before = UNCAPTURED.load(Ordering::SeqCst);
            let mut dev = Device::upload(&ctx, shape, &x, dtype);
            if dev.is_ok() && UNCAPTURED.load(Ordering::SeqCst) != before {
                dev = Err(Error::gpu_msg("uploading the inputs (see stderr)"));
            }
            for &variant in &a.variants {
                for &causal in &a.causal {
                    if variant.selective() && !causal {
                        continue;
                    }
                    for &path in &a.paths {
                        let mut row = Row {
                            backward: a.backward,
                            shape: *shape,
                            variant,
                            causal,
                            dtype,
                            path,
                            path_used: None,
                            result: Err(String::new()),
                        };
                        let before = UNCAPTURED.load(Ordering::SeqCst);
                        row.result = match &dev {
                            Ok(d) => measure(&ctx, &a, d, &mut row, timestamps)
                                .map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        };
                        if UNCAPTURED.load(Ordering::SeqCst) != before {
                            row.result =
                                Err("GPU error outside an error scope (see stderr)".into());
                        }
                        print_row(&row);
                        rows.push(row);
                    }
                }
            }
        }
    }

    if let Some(p) = &a.json {
        if let Err(e) = std::fs::write(p, json_rows(&ctx, timer, &rows)) {
            eprintln!("bench: writing {p}: {e}");
            std::process::exit(1);
        }
        println!("wrote {p}");
    }
    let bad = rows
        .iter()
        .filter(|r| matches!(&r.result, Ok(m) if !m.check_ok || !m.finite))
        .count();
    if bad > 0 {
        eprintln!("bench: {bad} rows failed the reference check or gave non-finite LSE");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Forward + backward

/// Gradient tensors of one variant: dQ, dK, dV always, the rest where the variant has the input.
struct GradTensors {
    d_o: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    dtau: Option<Tensor>,
    dalpha: Option<Tensor>,
    dgate: Option<Tensor>,
    df0: Option<Tensor>,
}

impl GradTensors {
    fn new(
        ctx: &Context,
        s: &Shape,
        v: Variant,
        dtype: DType,
        d_o: &[f32],
    ) -> selattn::Result<Self> {
        let f32t = |on: bool, dims: Vec<u64>| on.then(|| ctx.empty(&dims, DType::F32)).transpose();
        Ok(GradTensors {
            d_o: match dtype {
                DType::F16 => ctx.upload_f16(&s.q_dims(), d_o)?,
                _ => ctx.upload(&s.q_dims(), d_o)?,
            },
            dq: ctx.empty(&s.q_dims(), dtype)?,
            dk: ctx.empty(&s.kv_dims(), dtype)?,
            dv: ctx.empty(&s.kv_dims(), dtype)?,
            dtau: f32t(v.temperature(), s.row_dims())?,
            dalpha: f32t(v.temperature(), s.alpha_dims())?,
            dgate: f32t(v.gate(), s.gate_dims())?,
            df0: f32t(v.selective(), s.f_dims())?,
        })
    }

    fn grads(&self) -> selattn::Grads<'_> {
        selattn::Grads {
            dq: Some(&self.dq),
            dk: Some(&self.dk),
            dv: Some(&self.dv),
            dtau: self.dtau.as_ref(),
            dalpha: self.dalpha.as_ref(),
            dgate: self.dgate.as_ref(),
            df0: self.df0.as_ref(),
        }
    }

    fn bytes(&self) -> u64 {
        let opt = |t: &Option<Tensor>| t.as_ref().map_or(0, |t| t.bytes());
        self.d_o.bytes()
            + self.dq.bytes()
            + self.dk.bytes()
            + self.dv.bytes()
            + opt(&self.dtau)
            + opt(&self.dalpha)
            + opt(&self.dgate)
            + opt(&self.df0)
    }
}

/// Largest norm-wise relative error over the gradients, against the f64 reference backward on
/// a small slice of the shape.
fn check_small_backward(
    ctx: &Context,
    s: &Shape,
    v: Variant,
    opts: &Options,
    dtype: DType,
) -> Result<f64, Error> {
    let small = small_shape(s);
    let mut x = host_inputs(&small, 7);
    let mut d_o = Rng::new(8).normals(count(small.q_dims()));
    if dtype == DType::F16 {
        for t in [&mut x.q, &mut x.k, &mut x.v, &mut d_o] {
            t.iter_mut()
                .for_each(|e| *e = half::f16::from_f32(*e).to_f32());
        }
    }
    let dev = Device::upload(ctx, &small, &x, dtype)?;
    let g = GradTensors::new(ctx, &small, v, dtype, &d_o)?;
    let inputs = dev.inputs(v);
    ctx.attention(&inputs, opts, &dev.outputs())?;
    let up = selattn::Upstream::new(&dev.o, &dev.lse, &g.d_o);
    ctx.backward(&inputs, opts, &up, &g.grads())?;
    let spec = reference_spec(&mut x, small, v, opts);
    let want = selattn::reference_backward::backward(&spec, &x, &d_o, None)?;
    let mut worst = 0.0f64;
    for (t, r) in [
        (Some(&g.dq), &want.dq),
        (Some(&g.dk), &want.dk),
        (Some(&g.dv), &want.dv),
        (g.dtau.as_ref(), &want.dtau),
        (g.dalpha.as_ref(), &want.dalpha),
        (g.dgate.as_ref(), &want.dgate),
        (g.df0.as_ref(), &want.df0),
    ] {
        let Some(t) = t else { continue };
        let got = ctx.download(t)?;
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (&a, &b) in got.iter().zip(r) {
            let a = a as f64;
            let e = if a.is_finite() { a - b } else { f64::INFINITY };
            num += e * e;
            den += b * b;
        }
        worst = worst.max((num / den.max(f64::MIN_POSITIVE)).sqrt());
    }
    Ok(worst)
}

/// One forward + backward row: wall clock around one submission of both calls.
fn measure_backward(
    ctx: &Context,
    a: &Args,
    dev: &Device,
    row: &mut Row,
    fwd_scratch: u64,
) -> selattn::Result<Measured> {
    let s = row.shape;
    let opts = options(row.variant, row.causal, row.path);
    let inputs = dev.inputs(row.variant);
    let outputs = dev.outputs();
    let d_o = Rng::new(99).normals(count(s.q_dims()));
    let g = GradTensors::new(ctx, &s, row.variant, row.dtype, &d_o)?;
    let up = selattn::Upstream::new(&dev.o, &dev.lse, &g.d_o);
    let grads = g.grads();
    let scratch = fwd_scratch + ctx.backward_scratch_bytes(&inputs, &opts, &up, &grads)?;
    let (check, check_ok) = if a.check {
        let e = check_small_backward(ctx, &s, row.variant, &opts, row.dtype)?;
        let tol = match row.dtype {
            DType::F16 => 1e-2,
            _ => 1e-4,
        };
        (Some(e), e <= tol)
    } else {
        (None, true)
    };
    let once = || -> selattn::Result<f64> {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        ctx.encode_attention(&mut enc, &inputs, &opts, &outputs)?;
        ctx.encode_backward(&mut enc, &inputs, &opts, &up, &grads)?;
        let cmd = enc.finish();
        let t = Instant::now();
        ctx.queue.submit([cmd]);
        ctx.sync()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let mut times = error_scoped(ctx, "timing forward + backward", || {
        warm_up(a, once)?;
        let budget = Duration::from_secs_f64(a.budget);
        let started = Instant::now();
        let mut times = Vec::new();
        while (times.len() as u32) < a.iters && (times.len() < 3 || started.elapsed() <= budget) {
            times.push(once()?);
        }
        Ok(times)
    })?;
    let profile = if a.profile {
        error_scoped(ctx, "profiling forward + backward", || {
            profile_backward(ctx, &inputs, &opts, &outputs, &up, &grads)
        })?
    } else {
        Vec::new()
    };
    let finite = ctx.download(&g.dq)?.iter().all(|x| x.is_finite());
    let runs = times.len();
    let min_ms = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let ms = median(&mut times);
    let fl = 3.5 * flops(&s, row.causal);
    let bytes = moved_bytes(&inputs, &outputs) + g.bytes();
    Ok(Measured {
        ms,
        min_ms,
        runs,
        tflops: fl / (ms * 1e-3) / 1e12,
        gbps: bytes as f64 / (ms * 1e-3) / 1e9,
        flops: fl,
        bytes,
        scratch,
        alloc: bytes + scratch,
        check,
        check_ok,
        finite,
        profile,
    })
}

/// Per-kernel GPU times of one forward + backward: timestamps around the forward's pass and
/// before every backward dispatch (plus one after the last), median of 5 runs per entry.
fn profile_backward(
    ctx: &Context,
    inputs: &Inputs,
    opts: &Options,
    outputs: &Outputs,
    up: &selattn::Upstream,
    grads: &selattn::Grads,
) -> selattn::Result<Vec<(String, f64)>> {
    const CAP: u32 = 64;
    let dev = &ctx.device;
    let qs = dev.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("bench profile"),
        ty: wgpu::QueryType::Timestamp,
        count: CAP,
    });
    let fq = dev.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("bench profile forward"),
        ty: wgpu::QueryType::Timestamp,
        count: 2,
    });
    // The forward's pair at 0, the backward's stamps from byte 256 (resolve offsets are
    // multiples of 256).
    let stamps = Stamps::new(ctx, "bench profile", 256 + CAP as u64 * 8);
    let period = ctx.queue.get_timestamp_period() as f64;
    let mut labels = Vec::new();
    let mut samples: Vec<Vec<f64>> = Vec::new();
    for _ in 0..5 {
        let mut enc = dev.create_command_encoder(&Default::default());
        let ts = wgpu::ComputePassTimestampWrites {
            query_set: &fq,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        };
        ctx.encode_attention_timed(&mut enc, inputs, opts, outputs, ts)?;
        labels = ctx.encode_backward_profiled(&mut enc, inputs, opts, up, grads, &qs, CAP)?;
        let n = labels.len() as u32 + 1;
        enc.resolve_query_set(&fq, 0..2, &stamps.resolve, 0);
        enc.resolve_query_set(&qs, 0..n, &stamps.resolve, 256);
        let ticks = stamps.submit_and_read(ctx, enc)?;
        let ms = |a: u64, b: u64| b.wrapping_sub(a) as f64 * period * 1e-6;
        let mut row = vec![ms(ticks[0], ticks[1])];
        for i in 0..labels.len() {
            row.push(ms(ticks[32 + i], ticks[32 + i + 1]));
        }
        samples.push(row);
    }
    let names = std::iter::once("forward".to_string()).chain(labels);
    Ok(names
        .enumerate()
        .map(|(i, name)| {
            let mut v: Vec<f64> = samples.iter().map(|r| r[i]).collect();
            (name, median(&mut v))
        })
        .collect())
}
