//! Criterion benches: the GPU forward variants at a size a laptop GPU (or lavapipe) handles, and
//! the f64 CPU reference at a tiny size.
//!
//! ```text
//! cargo bench --bench attention                 # best adapter (SELATTN_ADAPTER filters by name)
//! cargo bench --bench attention -- --quick      # short run, e.g. on lavapipe
//! cargo bench --bench attention -- full         # benches whose name contains "full"
//! SELATTN_BENCH_SHAPE=2,16,1024,128 cargo bench --bench attention -- gpu
//! ```
//!
//! The GPU shape is B=1, H=8, N=512, D=64 on a hardware adapter and B=1, H=2, N=128, D=64 on a
//! software one (lavapipe, llvmpipe); `SELATTN_BENCH_SHAPE` overrides it.
//!
//! GPU times are wall clock around one submission of `iters` calls and the wait for the device to
//! finish, divided by `iters`; the throughput Criterion prints as elem/s is FLOP/s
//! (`4·B·H·Nq·Nk·D`, halved when causal). For GPU timestamps, the full shape matrix and JSON output
//! use `examples/bench.rs`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use selattn::reference::{self, HostInputs};
use selattn::{Context, Inputs, Options, Outputs, Shape, Spec, Tensor};

/// Timing inputs from the shared seeded generator.
struct Rng(selattn_tools::testing::Rng);

impl Rng {
    /// Approximately standard normal (sum of 4 uniforms, rescaled): plenty for timing inputs.
    fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (0..4).map(|_| self.0.uniform_f32()).sum::<f32>() * 1.732 - 3.464)
            .collect()
    }
    fn range(&mut self, lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| lo + (hi - lo) * self.0.uniform_f32())
            .collect()
    }
}

fn count(d: Vec<u64>) -> usize {
    d.iter().product::<u64>() as usize
}

/// Inputs with every control: tau in [0.5, 1.5), alpha in [0, 0.1), gate in (0, 1).
fn host_inputs(s: &Shape, with_controls: bool) -> HostInputs {
    let mut r = Rng(selattn_tools::testing::Rng::from_state(42));
    HostInputs {
        q: r.normals(count(s.q_dims())),
        k: r.normals(count(s.kv_dims())),
        v: r.normals(count(s.kv_dims())),
        tau: with_controls.then(|| r.range(0.5, 1.5, count(s.row_dims()))),
        alpha: with_controls.then(|| r.range(0.0, 0.1, count(s.alpha_dims()))),
        gate: with_controls.then(|| r.range(1e-3, 1.0, count(s.gate_dims()))),
        kv_len: None,
        f0: None,
    }
}

fn flops(s: &Shape, causal: bool) -> u64 {
    let f =
        4 * s.batch as u64 * s.q_heads as u64 * s.q_len as u64 * s.k_len as u64 * s.head_dim as u64;
    if causal {
        f / 2
    } else {
        f
    }
}

/// (name, temperature, gate, selective, causal)
const VARIANTS: [(&str, bool, bool, bool, bool); 6] = [
    ("plain", false, false, false, false),
    ("plain_causal", false, false, false, true),
    ("temp_causal", true, false, false, true),
    ("gate_causal", false, true, false, true),
    ("selective", false, false, true, true),
    ("full", true, true, true, true),
];

struct Gpu {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau: Tensor,
    alpha: Tensor,
    gate: Tensor,
    o: Tensor,
    lse: Tensor,
}

fn upload(ctx: &Context, s: &Shape, x: &HostInputs) -> selattn::Result<Gpu> {
    let or_empty = |t: &Option<Vec<f32>>| t.clone().unwrap_or_default();
    Ok(Gpu {
        q: ctx.upload(&s.q_dims(), &x.q)?,
        k: ctx.upload(&s.kv_dims(), &x.k)?,
        v: ctx.upload(&s.kv_dims(), &x.v)?,
        tau: ctx.upload(&s.row_dims(), &or_empty(&x.tau))?,
        alpha: ctx.upload(&s.alpha_dims(), &or_empty(&x.alpha))?,
        gate: ctx.upload(&s.gate_dims(), &or_empty(&x.gate))?,
        o: ctx.empty(&s.q_dims(), selattn::DType::F32)?,
        lse: ctx.empty(&s.row_dims(), selattn::DType::F32)?,
    })
}

/// Environment variable `B,H,N,D` that overrides the GPU bench shape.
const SHAPE_ENV: &str = "SELATTN_BENCH_SHAPE";

/// B=1, H=8, N=512, D=64 on a hardware GPU (a laptop's takes milliseconds); B=1, H=2, N=128,
/// D=64 on a software adapter, where the larger shape takes seconds per call.
fn gpu_shape(ctx: &Context) -> Shape {
    if let Ok(v) = std::env::var(SHAPE_ENV) {
        let n: Vec<u32> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        if let [b, h, l, d] = n[..] {
            return Shape::new(b, h, l, d);
        }
        eprintln!("{SHAPE_ENV}={v} is not B,H,N,D; using the default");
    }
    if ctx.capabilities().info.device_type == wgpu::DeviceType::Cpu {
        Shape::new(1, 2, 128, 64)
    } else {
        Shape::new(1, 8, 512, 64)
    }
}

fn gpu_benches(c: &mut Criterion) {
    let ctx = match Context::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpu benches skipped: {e}");
            return;
        }
    };
    let s = gpu_shape(&ctx);
    eprintln!("gpu benches on {} at {s:?}", ctx.describe());
    let g = match upload(&ctx, &s, &host_inputs(&s, true)) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gpu benches skipped: {e}");
            return;
        }
    };
    let info = &ctx.capabilities().info;
    let adapter = info.name.split(" (").next().unwrap_or("adapter").trim();
    let mut group = c.benchmark_group(format!(
        "gpu/{adapter}/B{}_H{}_N{}_D{}",
        s.batch, s.q_heads, s.q_len, s.head_dim
    ));
    // Each sample is one submission; keep the counts small so a software adapter finishes.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (name, temp, gate, sel, causal) in VARIANTS {
        let mut inputs = Inputs::new(&g.q, &g.k, &g.v);
        if temp {
            inputs = inputs.tau(&g.tau).alpha(&g.alpha);
        }
        if gate {
            inputs = inputs.gate(&g.gate);
        }
        let mut opts = if causal {
            Options::causal()
        } else {
            Options::new()
        };
        if sel {
            opts = opts.selective(0);
        }
        let outputs = Outputs::new(&g.o).lse(&g.lse);
        // Runs once outside the timer: builds the pipelines and surfaces any error here, not
        // inside Criterion's loop.
        if let Err(e) = ctx
            .attention(&inputs, &opts, &outputs)
            .and_then(|_| ctx.sync())
        {
            eprintln!("gpu/{name} skipped: {e}");
            continue;
        }
        group.throughput(Throughput::Elements(flops(&s, causal)));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                for _ in 0..iters {
                    // Validated once above; the same call cannot fail differently here.
                    if let Err(e) = ctx.encode_attention(&mut enc, &inputs, &opts, &outputs) {
                        panic!("encode failed after a successful run: {e}");
                    }
                }
                let cmd = enc.finish();
                let t = Instant::now();
                ctx.queue.submit([cmd]);
                if let Err(e) = ctx.sync() {
                    panic!("device lost during the bench: {e}");
                }
                t.elapsed()
            })
        });
    }
    group.finish();
}

fn cpu_reference(c: &mut Criterion) {
    let s = Shape::new(1, 2, 64, 32);
    let mut group = c.benchmark_group("cpu_reference/B1_H2_N64_D32");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (name, controls, sel) in [("plain_causal", false, false), ("full", true, true)] {
        let x = host_inputs(&s, controls);
        let mut options = Options::causal();
        if sel {
            options = options.selective(0);
        }
        let spec = Spec {
            shape: s,
            options,
            present: x.present(sel),
        };
        group.throughput(Throughput::Elements(flops(&s, true)));
        group.bench_function(name, |b| {
            b.iter(|| reference::attention(&spec, std::hint::black_box(&x)))
        });
    }
    group.finish();
}

criterion_group!(benches, gpu_benches, cpu_reference);
criterion_main!(benches);
