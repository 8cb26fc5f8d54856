//! selattn in the browser: the validation suite of `examples/validate` (every variant the
//! adapter can run, small and awkward shapes, against the f64 CPU reference compiled into this
//! module) and a short benchmark, exported to JavaScript with wasm-bindgen for `index.html`.
//!
//! Everything that waits is async (`Context::new_async`, `attention_async`,
//! `download_async`, `sync_async`): a browser's main thread cannot block.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::rc::Rc;

use selattn::reference::HostInputs;
use selattn::Switches;
use selattn::{Context, DType, Error, Options, Outputs, Path, Shape};
use selattn_tools::testing::{random_inputs, Cmp, DeviceInputs};
use selattn_tools::validation;
use wasm_bindgen::prelude::*;

pub use selattn_tools::validation::{
    cases, variants, Case, Variant, F16_ELEM_TOL, F16_NORM_TOL, F32_ELEM_TOL, F32_NORM_TOL,
};

/// One row of the report.
#[derive(Clone, Debug)]
pub struct Row {
    /// f32 or f16 storage.
    pub dtype: DType,
    /// Variant name (with "coop " for the cooperative-matrix path).
    pub variant: String,
    /// Case name.
    pub case: String,
    /// Kernel tile description.
    pub kernel: String,
    /// O vs the reference.
    pub o: Option<Cmp>,
    /// LSE vs the reference.
    pub lse: Option<Cmp>,
    /// F_out vs the reference (selective).
    pub f_out: Option<Cmp>,
    /// Error or skip reason.
    pub error: Option<String>,
    /// Passed (or skipped because the path cannot run the call).
    pub pass: bool,
    /// Wall time of the GPU call with upload and download, ms.
    pub ms: f64,
}

impl Row {
    /// Largest max-abs error and largest norm-wise error over the outputs compared.
    pub fn worst(&self) -> (f64, f64) {
        [self.o, self.lse, self.f_out]
            .iter()
            .flatten()
            .fold((0.0f64, 0.0f64), |(m, r), c| {
                (m.max(c.max_abs), r.max(c.rel_norm))
            })
    }

    /// The row as a JSON object.
    pub fn json(&self) -> String {
        let (max_abs, rel) = self.worst();
        let cmp = |c: &Option<Cmp>| match c {
            Some(c) => format!(
                "{{\"max_abs\": {}, \"rel_norm\": {}, \"bad\": {}, \"nan\": {}}}",
                num(c.max_abs),
                num(c.rel_norm),
                c.bad,
                c.nan
            ),
            None => "null".into(),
        };
        format!(
            "{{\"dtype\": {}, \"variant\": {}, \"case\": {}, \"kernel\": {}, \"max_abs\": {}, \
             \"rel_norm\": {}, \"o\": {}, \"lse\": {}, \"f_out\": {}, \"pass\": {}, \"ms\": {}, \
             \"error\": {}}}",
            json_string(&format!("{:?}", self.dtype).to_lowercase()),
            json_string(&self.variant),
            json_string(&self.case),
            json_string(&self.kernel),
            num(max_abs),
            num(rel),
            cmp(&self.o),
            cmp(&self.lse),
            cmp(&self.f_out),
            self.pass,
            num(self.ms),
            self.error
                .as_deref()
                .map_or("null".to_string(), json_string)
        )
    }
}

/// A finite number as JSON, anything else as null.
fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:e}")
    } else {
        "null".into()
    }
}

/// Milliseconds since the page started (`performance.now()`), or 0 outside a browser window.
pub fn now_ms() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map_or(0.0, |p| p.now())
}

/// Runs one (case, variant, dtype, path) with poisoned outputs and compares it with the
/// reference.
pub async fn run_one(
    ctx: &Context,
    case: &Case,
    var: &Variant,
    elem: DType,
    path: Path,
    seed: u64,
) -> Row {
    let mut row = Row {
        dtype: elem,
        variant: validation::variant_name(var, path),
        case: case.name.to_string(),
        kernel: String::new(),
        o: None,
        lse: None,
        f_out: None,
        error: None,
        pass: false,
        ms: 0.0,
    };
    let shape = case.shape;
    let prepared = match validation::prepare(case, var, elem, path, seed) {
        Ok(p) => p,
        Err(e) => {
            row.error = Some(e);
            return row;
        }
    };
    let t = now_ms();
    let run = run_gpu(ctx, &shape, &prepared.inputs, &prepared.options, elem).await;
    row.ms = now_ms() - t;
    match run {
        Ok((kernel, o, lse, f_out)) => {
            row.kernel = kernel;
            let c = validation::check(
                elem,
                &prepared.reference,
                &o,
                &lse,
                &f_out,
                var.switches.selective,
            );
            row.o = Some(c.o);
            row.lse = Some(c.lse);
            row.f_out = c.f_out;
            row.pass = c.pass;
        }
        Err(e @ Error::PathUnavailable { .. }) if path == Path::Coop => {
            row.error = Some(format!("skipped: {e}"));
            row.pass = true;
        }
        Err(e) => row.error = Some(e.to_string()),
    }
    row
}

type GpuResult = (String, Vec<f32>, Vec<f32>, Vec<f32>);

async fn run_gpu(
    ctx: &Context,
    shape: &Shape,
    x: &HostInputs,
    opts: &Options,
    elem: DType,
) -> selattn::Result<GpuResult> {
    let g = DeviceInputs::upload(ctx, shape, x, elem)?;
    let o = ctx.empty(&shape.q_dims(), elem)?;
    let lse = ctx.empty(&shape.row_dims(), DType::F32)?;
    let f_out = ctx.empty(&shape.f_dims(), DType::F32)?;
    for t in [&o, &lse, &f_out] {
        ctx.poison(t)?;
    }
    let mut outs = Outputs::new(&o).lse(&lse);
    if opts.selective.is_some() {
        outs = outs.f_out(&f_out);
    }
    let kernel = validation::kernel_name(&ctx.plan(&g.inputs(), opts, &outs)?);
    ctx.attention_async(&g.inputs(), opts, &outs).await?;
    let f_out = if opts.selective.is_some() {
        ctx.download_async(&f_out).await?
    } else {
        vec![]
    };
    Ok((
        kernel,
        ctx.download_async(&o).await?,
        ctx.download_async(&lse).await?,
        f_out,
    ))
}

thread_local! {
    static CONTEXT: RefCell<Option<Rc<Context>>> = const { RefCell::new(None) };
}

/// The page's context, created on first use.
pub async fn context() -> selattn::Result<Rc<Context>> {
    if let Some(c) = CONTEXT.with(|c| c.borrow().clone()) {
        return Ok(c);
    }
    let ctx = Rc::new(Context::new_async().await?);
    CONTEXT.with(|c| *c.borrow_mut() = Some(ctx.clone()));
    Ok(ctx)
}

fn js_err(e: Error) -> JsValue {
    JsValue::from_str(&e.to_string())
}

/// The adapter and what selattn can use on it, as JSON.
#[wasm_bindgen]
pub async fn adapter_json() -> Result<String, JsValue> {
    let ctx = context().await.map_err(js_err)?;
    let c = ctx.capabilities();
    let i = &c.info;
    let mut features: Vec<String> = ctx
        .device
        .features()
        .iter_names()
        .map(|(n, _)| n.to_string())
        .collect();
    features.sort();
    let features: Vec<String> = features.iter().map(|f| json_string(f)).collect();
    Ok(format!(
        "{{\"selattn\": {}, \"name\": {}, \"backend\": {}, \"vendor\": {}, \"device\": {}, \
         \"driver\": {}, \"f16\": {}, \"subgroups\": {}, \"subgroup_sizes\": [{}, {}], \
         \"workgroup_memory\": {}, \"max_invocations\": {}, \"max_storage_buffers\": {}, \
         \"max_storage_binding\": {}, \"coop\": {}, \"features\": [{}]}}",
        json_string(env!("CARGO_PKG_VERSION")),
        json_string(&i.name),
        json_string(&format!("{:?}", i.backend)),
        i.vendor,
        i.device,
        json_string(format!("{} {}", i.driver, i.driver_info).trim()),
        c.f16,
        c.subgroups,
        c.subgroup_min_size,
        c.subgroup_max_size,
        c.workgroup_memory,
        c.max_invocations,
        c.max_storage_buffers,
        c.max_storage_binding,
        c.coop_16x16_f16(),
        features.join(", ")
    ))
}

/// Runs the validation suite on every variant the adapter can run (f32, and f16 where the
/// adapter has it; the scalar path, and the cooperative-matrix path where it exists). `level`
/// 2: every shape of `examples/validate`; 1: its `--quick` shapes; 0 (a smoke test): two
/// shapes (one with GQA and an empty row), plain and everything-at-once. Calls `on_row` with
/// each row's JSON as it finishes; returns every row as a JSON array.
#[wasm_bindgen]
pub async fn validate(level: u32, on_row: js_sys::Function) -> Result<String, JsValue> {
    let ctx = context().await.map_err(js_err)?;
    let mut elems = vec![DType::F32];
    if ctx.capabilities().f16 {
        elems.push(DType::F16);
    }
    let mut paths = vec![Path::Scalar];
    if ctx.capabilities().coop_16x16_f16() {
        paths.push(Path::Coop);
    }
    let mut rows = Vec::new();
    let mut seed = 1u64;
    let (cases, variants) = if level == 0 {
        let cases: Vec<Case> = cases(true)
            .into_iter()
            .filter(|c| c.name == "N=37 D=24" || c.name == "GQA 4:1")
            .collect();
        let variants: Vec<Variant> = variants()
            .into_iter()
            .filter(|v| {
                (!v.switches.causal && v.name == "plain") || (v.switches.causal && v.name == "full")
            })
            .collect();
        (cases, variants)
    } else {
        (cases(level < 2), variants())
    };
    for case in cases {
        for &var in &variants {
            for &elem in &elems {
                for &path in &paths {
                    if path == Path::Coop && elem != DType::F16 {
                        continue;
                    }
                    let row = run_one(&ctx, &case, &var, elem, path, seed).await;
                    seed += 1;
                    let json = row.json();
                    let _ = on_row.call1(&JsValue::NULL, &JsValue::from_str(&json));
                    rows.push(json);
                }
            }
        }
    }
    Ok(format!("[{}]", rows.join(",\n")))
}

/// One benchmark shape.
#[derive(Clone, Copy, Debug)]
pub struct BenchCase {
    /// Name in the report.
    pub name: &'static str,
    /// The shape.
    pub shape: Shape,
    /// Causal.
    pub causal: bool,
    /// Selective masking.
    pub selective: bool,
}

/// A short benchmark: a few prefill shapes in f32 (and f16 where the adapter has it), each
/// timed over `iters` calls after one warm-up, from submit to `on_submitted_work_done`.
/// TFLOP/s counts 4·B·Hq·Nq·Nk·D, halved when causal. Returns a JSON array; calls `on_row`
/// with each row.
#[wasm_bindgen]
pub async fn bench(iters: u32, on_row: js_sys::Function) -> Result<String, JsValue> {
    let ctx = context().await.map_err(js_err)?;
    let cases = [
        BenchCase {
            name: "B1 H8 N512 D64",
            shape: Shape::new(1, 8, 512, 64),
            causal: false,
            selective: false,
        },
        BenchCase {
            name: "B1 H8 N512 D64 causal",
            shape: Shape::new(1, 8, 512, 64),
            causal: true,
            selective: false,
        },
        BenchCase {
            name: "B1 H8 N512 D64 selective",
            shape: Shape::new(1, 8, 512, 64),
            causal: true,
            selective: true,
        },
        BenchCase {
            name: "B1 H8 N256 D128 causal",
            shape: Shape::new(1, 8, 256, 128),
            causal: true,
            selective: false,
        },
    ];
    let mut elems = vec![DType::F32];
    if ctx.capabilities().f16 {
        elems.push(DType::F16);
    }
    let mut rows = Vec::new();
    for case in cases {
        for &elem in &elems {
            let json = match bench_one(&ctx, &case, elem, iters.max(1)).await {
                Ok((ms, tflops)) => format!(
                    "{{\"case\": {}, \"dtype\": {}, \"ms\": {}, \"tflops\": {}, \"error\": null}}",
                    json_string(case.name),
                    json_string(&format!("{elem:?}").to_lowercase()),
                    num(ms),
                    num(tflops)
                ),
                Err(e) => format!(
                    "{{\"case\": {}, \"dtype\": {}, \"ms\": null, \"tflops\": null, \"error\": {}}}",
                    json_string(case.name),
                    json_string(&format!("{elem:?}").to_lowercase()),
                    json_string(&e.to_string())
                ),
            };
            let _ = on_row.call1(&JsValue::NULL, &JsValue::from_str(&json));
            rows.push(json);
        }
    }
    Ok(format!("[{}]", rows.join(",\n")))
}

async fn bench_one(
    ctx: &Context,
    case: &BenchCase,
    elem: DType,
    iters: u32,
) -> selattn::Result<(f64, f64)> {
    let shape = case.shape;
    let x = random_inputs(&shape, Switches::NONE, 7);
    let g = DeviceInputs::upload(ctx, &shape, &x, elem)?;
    let o = ctx.empty(&shape.q_dims(), elem)?;
    let mut opts = if case.causal {
        Options::causal()
    } else {
        Options::new()
    };
    if case.selective {
        opts = opts.selective(0);
    }
    let outs = Outputs::new(&o);
    ctx.attention_async(&g.inputs(), &opts, &outs).await?;
    ctx.sync_async().await?;
    let t = now_ms();
    for _ in 0..iters {
        ctx.attention(&g.inputs(), &opts, &outs)?;
    }
    ctx.sync_async().await?;
    let ms = (now_ms() - t) / iters as f64;
    let s = shape;
    let mut flops = 4.0
        * s.batch as f64
        * s.q_heads as f64
        * s.q_len as f64
        * s.k_len as f64
        * s.head_dim as f64;
    if case.causal {
        flops /= 2.0;
    }
    Ok((ms, flops / (ms * 1e-3) / 1e12))
}

/// The crate version, for the page header.
#[wasm_bindgen]
pub fn version() -> String {
    let mut s = String::new();
    let _ = write!(s, "selattn {}", env!("CARGO_PKG_VERSION"));
    s
}

/// A JSON string literal for `s`.
fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}
