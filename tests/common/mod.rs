//! Shared test support: seeded inputs, the adapters to run on, and comparison against the
//! reference with max error, its position and the norm-wise relative error.
#![allow(dead_code)]

pub mod backward;
pub mod chunks;

use std::sync::OnceLock;

use selattn::reference::{HostInputs, HostOutputs};
use selattn::{Context, DType, Inputs, Options, Outputs, Shape, Spec, Tensor};

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use selattn::Switches;
#[allow(unused_imports)]
pub use selattn_tools::testing::{compare, inputs_name, random_inputs, Cmp, Rng};

/// Every adapter that can run compute, one context each, built once per test binary.
pub fn contexts() -> &'static [Context] {
    static CTX: OnceLock<Vec<Context>> = OnceLock::new();
    CTX.get_or_init(|| {
        let mut v = Vec::new();
        for (a, why) in selattn::adapters() {
            let info = a.get_info();
            match why {
                Some(r) => eprintln!("skipping adapter: {r}"),
                None => match Context::from_adapter(&a) {
                    Ok(c) => v.push(c),
                    Err(e) => eprintln!("skipping adapter {} ({:?}): {e}", info.name, info.backend),
                },
            }
        }
        assert!(
            !v.is_empty(),
            "no adapter can run compute: install mesa-vulkan-drivers"
        );
        v
    })
}

/// GPU tensors of a case.
pub struct Gpu {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub tau: Option<Tensor>,
    pub alpha: Option<Tensor>,
    pub gate: Option<Tensor>,
    pub kv_len: Option<Tensor>,
    pub f0: Option<Tensor>,
}

impl Gpu {
    pub fn upload(ctx: &Context, shape: &Shape, x: &HostInputs, elem: DType) -> Gpu {
        let up = |dims: Vec<u64>, d: &[f32]| match elem {
            DType::F16 => ctx.upload_f16(&dims, d).unwrap(),
            _ => ctx.upload(&dims, d).unwrap(),
        };
        Gpu {
            q: up(shape.q_dims(), &x.q),
            k: up(shape.kv_dims(), &x.k),
            v: up(shape.kv_dims(), &x.v),
            tau: x
                .tau
                .as_ref()
                .map(|t| ctx.upload(&shape.row_dims(), t).unwrap()),
            alpha: x
                .alpha
                .as_ref()
                .map(|t| ctx.upload(&shape.alpha_dims(), t).unwrap()),
            gate: x
                .gate
                .as_ref()
                .map(|t| ctx.upload(&shape.gate_dims(), t).unwrap()),
            kv_len: x
                .kv_len
                .as_ref()
                .map(|t| ctx.upload_u32(&shape.kv_len_dims(), t).unwrap()),
            f0: x
                .f0
                .as_ref()
                .map(|t| ctx.upload(&shape.f_dims(), t).unwrap()),
        }
    }

    pub fn inputs(&self) -> Inputs<'_> {
        Inputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            tau: self.tau.as_ref(),
            alpha: self.alpha.as_ref(),
            gate: self.gate.as_ref(),
            kv_len: self.kv_len.as_ref(),
            f0: self.f0.as_ref(),
        }
    }
}

/// GPU outputs read back.
pub struct GpuOut {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
    pub f_out: Vec<f32>,
}

/// Runs one case on the GPU with poisoned outputs and reads everything back.
pub fn run_gpu(
    ctx: &Context,
    shape: &Shape,
    x: &HostInputs,
    opts: &Options,
    elem: DType,
) -> GpuOut {
    // wgpu's GL backend shares one EGL context per adapter and gives up (panics) when it waits
    // more than 6 s for it; with several test threads compiling large shaders on llvmpipe that
    // happened on a loaded 2-core machine (2026-12-03). Cases on a GL adapter take turns here.
    static GL_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = (ctx.capabilities().info.backend == wgpu::Backend::Gl)
        .then(|| GL_TURN.lock().unwrap_or_else(|e| e.into_inner()));
    let g = Gpu::upload(ctx, shape, x, elem);
    let o = ctx.empty(&shape.q_dims(), elem).unwrap();
    let lse = ctx.empty(&shape.row_dims(), DType::F32).unwrap();
    let f_out = ctx.empty(&shape.f_dims(), DType::F32).unwrap();
    ctx.poison(&o).unwrap();
    ctx.poison(&lse).unwrap();
    ctx.poison(&f_out).unwrap();
    let mut outs = Outputs::new(&o).lse(&lse);
    if opts.selective.is_some() {
        outs = outs.f_out(&f_out);
    }
    ctx.attention(&g.inputs(), opts, &outs)
        .unwrap_or_else(|e| panic!("{}: attention failed: {e}", ctx.describe()));
    GpuOut {
        o: ctx.download(&o).unwrap(),
        lse: ctx.download(&lse).unwrap(),
        f_out: if opts.selective.is_some() {
            ctx.download(&f_out).unwrap()
        } else {
            vec![]
        },
    }
}

/// The reference for a case.
pub fn run_ref(shape: &Shape, x: &HostInputs, opts: &Options) -> HostOutputs {
    let spec = Spec {
        shape: *shape,
        options: *opts,
        present: x.present(opts.selective.is_some()),
    };
    selattn::reference::attention(&spec, x).unwrap()
}

/// Checks a GPU run against the reference at f32 tolerances; returns a failure line or None.
pub fn check_case(
    name: &str,
    ctx: &Context,
    gpu: &GpuOut,
    r: &HostOutputs,
    tol: f64,
) -> Option<String> {
    let mut msgs = vec![];
    let co = compare(&gpu.o, &r.o, tol, tol);
    let cl = compare(&gpu.lse, &r.lse, tol, tol);
    if co.bad > 0 || co.rel_norm > tol {
        msgs.push(format!("O: {co:?}"));
    }
    if cl.bad > 0 || cl.rel_norm > tol {
        msgs.push(format!("LSE: {cl:?}"));
    }
    if !r.f_out.is_empty() {
        let cf = compare(&gpu.f_out, &r.f_out, tol, tol);
        if cf.bad > 0 || cf.rel_norm > tol {
            msgs.push(format!("F_out: {cf:?}"));
        }
    }
    if msgs.is_empty() {
        None
    } else {
        Some(format!("[{}] {name}: {}", ctx.describe(), msgs.join("; ")))
    }
}

/// One named case: shape, options and host inputs.
pub struct Case {
    pub name: String,
    pub shape: Shape,
    pub opts: Options,
    pub x: HostInputs,
}

impl Case {
    /// A case with seeded random inputs for `c`; `name` is prefixed to the shape and options.
    pub fn random(name: &str, shape: Shape, opts: Options, c: Switches, seed: u64) -> Case {
        Case {
            name: case_name(name, &shape, &opts, &c),
            shape,
            opts,
            x: random_inputs(&shape, c, seed),
        }
    }
}

/// A case's name: `name`, then its shape, options and inputs
/// (`name B2 Hq4 Hkv2 Nq7 Nk12 D16 causal sel1 tau+alpha`).
pub fn case_name(name: &str, shape: &Shape, opts: &Options, c: &Switches) -> String {
    format!(
        "{name} B{} Hq{} Hkv{} Nq{} Nk{} D{} {} {}",
        shape.batch,
        shape.q_heads,
        shape.kv_heads,
        shape.q_len,
        shape.k_len,
        shape.head_dim,
        opts_name(opts),
        inputs_name(c)
    )
}

/// A short name for options: `causal sel1 start7 scale0.3`.
pub fn opts_name(o: &Options) -> String {
    let mut v = vec![if o.causal { "causal" } else { "full" }.to_string()];
    if let Some(h) = o.selective {
        v.push(format!("sel{h}"));
    }
    if let Some(s) = o.start {
        v.push(format!("start{s}"));
    }
    if let Some(s) = o.scale {
        v.push(format!("scale{s}"));
    }
    v.join(" ")
}

/// Runs every case on every adapter against the reference at f32 tolerance `tol`, prints the
/// max errors of each (visible with `--nocapture`) and fails with every failing case listed.
pub fn check_cases(cases: &[Case], tol: f64) {
    let mut failures = vec![];
    let mut worst = (0.0f64, String::new());
    for ctx in contexts() {
        for c in cases {
            let gpu = run_gpu(ctx, &c.shape, &c.x, &c.opts, DType::F32);
            let r = run_ref(&c.shape, &c.x, &c.opts);
            let co = compare(&gpu.o, &r.o, 0.0, 0.0);
            let cl = compare(&gpu.lse, &r.lse, 0.0, 0.0);
            let cf = compare(&gpu.f_out, &r.f_out, 0.0, 0.0);
            eprintln!(
                "[{}] {}: O max {:.2e} rel {:.2e} | LSE max {:.2e} | F max {:.2e} rel {:.2e}",
                ctx.describe(),
                c.name,
                co.max_abs,
                co.rel_norm,
                cl.max_abs,
                cf.max_abs,
                cf.rel_norm
            );
            if co.rel_norm > worst.0 {
                worst = (co.rel_norm, c.name.clone());
            }
            if let Some(f) = check_case(&c.name, ctx, &gpu, &r, tol) {
                failures.push(f);
            }
        }
    }
    eprintln!(
        "worst O norm-wise relative error {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The bit patterns of f32 values, to compare runs exactly (NaN payloads included).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Whether two runs of the same kernel, one built with naga's bounds checks and one without,
/// agree. On software adapters (lavapipe, llvmpipe) they must agree bit for bit. A hardware
/// driver compiles the two modules separately and may contract `a * b + c` into a fused
/// multiply-add in one and not the other; measured on an H100: 1 ulp in the forward kernel's
/// F_out, up to 1.6e-5 relative on small elements of the decode kernel's O (sums with
/// cancellation). There every element must agree within 1e-5 of the output's largest
/// magnitude: far below any error an out-of-bounds read (which the checks would clamp) causes.
pub fn same_up_to_contraction(ctx: &Context, a: &[f32], b: &[f32]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let scale = a
        .iter()
        .chain(b)
        .filter(|x| x.is_finite())
        .fold(0.0f32, |m, x| m.max(x.abs())) as f64;
    let mut worst = 0.0f64;
    let mut exact = true;
    for (x, y) in a.iter().zip(b) {
        if x.to_bits() == y.to_bits() {
            continue;
        }
        exact = false;
        if !(x.is_finite() && y.is_finite()) {
            return false;
        }
        worst = worst.max((*x as f64 - *y as f64).abs());
    }
    if exact {
        return true;
    }
    eprintln!(
        "[{}] checked vs unchecked: largest difference {worst:.2e} (output scale {scale:.2e})",
        ctx.describe()
    );
    ctx.capabilities().info.device_type != wgpu::DeviceType::Cpu && worst <= 1e-5 * scale
}

/// Set in a child process started by [`rerun_with_env`].
pub const CHILD_RERUN_ENV: &str = "SELATTN_TEST_RERUN_CHILD";

/// Runs the named tests of this test binary again in a child process with `env` set (the
/// library reads its knobs from the environment at each plan, and tests in one process share
/// it, so a fallback form is tested in a process of its own) and asserts that every one of them
/// passed. Does nothing inside such a child.
pub fn rerun_with_env(tests: &[&str], env: &[(&str, &str)]) {
    if std::env::var(CHILD_RERUN_ENV).is_ok() {
        return;
    }
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(tests)
        .args(["--exact", "--nocapture", "--test-threads", "1"]);
    cmd.env(CHILD_RERUN_ENV, "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let passed = format!("{} passed; 0 failed", tests.len());
    assert!(
        out.status.success() && text.contains(&passed),
        "child with {env:?} failed:\n{text}"
    );
}

/// The labels a profiled call returned on `ctx`, or `None` after checking that an adapter
/// without TIMESTAMP_QUERY_INSIDE_PASSES refused it with `FeatureMissing`. Panics on any
/// other error.
pub fn profile_labels(ctx: &Context, labels: selattn::Result<Vec<String>>) -> Option<Vec<String>> {
    let inside = ctx
        .device
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);
    if !inside {
        assert!(
            matches!(labels, Err(selattn::Error::FeatureMissing { .. })),
            "[{}] {labels:?}",
            ctx.describe()
        );
        return None;
    }
    Some(labels.unwrap_or_else(|e| panic!("[{}] {e}", ctx.describe())))
}
