//! Cross-vendor validation: every kernel variant on every adapter wgpu finds, against the f64
//! CPU reference, over small and awkward shapes. Prints a machine header and a table you can
//! paste into a bug report, writes the same as JSON with `--json PATH`, and exits 1 on any
//! failure.
//!
//! ```text
//! cargo run --release --example validate                  # every adapter, full set
//! cargo run --release --example validate -- --quick       # fewer shapes
//! cargo run --release --example validate -- --json out.json
//! WGPU_BACKEND=vulkan cargo run --release --example validate    # one backend
//! SELATTN_ADAPTER=warp cargo run --release --example validate   # adapters by name
//! ```
//!
//! Tolerances (DESIGN.md §4): f32 storage, norm-wise relative error under 1e-5 for O, LSE and
//! F_out, every element within `F32_ELEM_TOL` absolute plus relative. f16 storage: the reference
//! runs on the same f16-rounded Q/K/V; O's norm-wise error must be under 5e-3 and at most twice
//! the error of the reference itself rounded to f16; LSE and F_out (always f32) as for f32.

use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use selattn::reference::HostInputs;
use selattn::{Context, DType, Error, Options, Outputs, Path, Shape};
use selattn_tools::testing::{Cmp, DeviceInputs};
use selattn_tools::validation::{
    self, cases, variants, Case, Variant, F16_ELEM_TOL, F16_NORM_TOL, F32_ELEM_TOL, F32_NORM_TOL,
};

/// One row of the report.
#[derive(Clone, Debug)]
struct Row {
    adapter: String,
    backend: String,
    driver: String,
    dtype: DType,
    variant: String,
    case: String,
    kernel: String,
    o: Option<Cmp>,
    lse: Option<Cmp>,
    f_out: Option<Cmp>,
    /// f16: norm-wise error of the reference rounded to f16 (the "plain f16" baseline).
    baseline: Option<f64>,
    error: Option<String>,
    pass: bool,
    seconds: f64,
}

impl Row {
    /// Largest max-abs error and largest norm-wise error over the outputs compared.
    fn worst(&self) -> (f64, f64) {
        [self.o, self.lse, self.f_out]
            .iter()
            .flatten()
            .fold((0.0f64, 0.0f64), |(m, r), c| {
                (m.max(c.max_abs), r.max(c.rel_norm))
            })
    }
}

/// Runs one (case, variant, dtype) with poisoned outputs, compares it with the reference.
fn run_one(ctx: &Context, case: &Case, var: &Variant, elem: DType, path: Path, seed: u64) -> Row {
    let info = &ctx.capabilities().info;
    let mut row = Row {
        adapter: info.name.clone(),
        backend: format!("{:?}", info.backend),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        dtype: elem,
        variant: validation::variant_name(var, path),
        case: case.name.to_string(),
        kernel: String::new(),
        o: None,
        lse: None,
        f_out: None,
        baseline: None,
        error: None,
        pass: false,
        seconds: 0.0,
    };
    let t = Instant::now();
    let shape = case.shape;
    let prepared = match validation::prepare(case, var, elem, path, seed) {
        Ok(p) => p,
        Err(e) => {
            row.error = Some(e);
            return row;
        }
    };
    let (x, opts) = (&prepared.inputs, &prepared.options);
    let run = catch_unwind(AssertUnwindSafe(|| run_gpu(ctx, &shape, x, opts, elem)));
    row.seconds = t.elapsed().as_secs_f64();
    let (kernel, o, lse, f_out) = match run {
        Ok(Ok(r)) => r,
        // The coop path covers only some head dims: a call it cannot run is skipped, not failed.
        Ok(Err(e @ Error::PathUnavailable { .. })) if path == Path::Coop => {
            row.error = Some(format!("skipped: {e}"));
            row.pass = true;
            return row;
        }
        Ok(Err(e)) => {
            row.error = Some(e.to_string());
            return row;
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            row.error = Some(format!("panicked: {msg}"));
            return row;
        }
    };
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
    row.baseline = c.baseline;
    row.pass = c.pass;
    row
}

type GpuResult = (String, Vec<f32>, Vec<f32>, Vec<f32>);

fn run_gpu(
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
    ctx.attention(&g.inputs(), opts, &outs)?;
    let f_out = if opts.selective.is_some() {
        ctx.download(&f_out)?
    } else {
        vec![]
    };
    Ok((kernel, ctx.download(&o)?, ctx.download(&lse)?, f_out))
}

/// What the machine is, for a bug report.
fn machine_header() -> String {
    let mut s = String::new();
    let _ = writeln!(s, "selattn {} validate", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(
        s,
        "os: {} {} ({})",
        std::env::consts::OS,
        std::env::consts::ARCH,
        os_version()
    );
    for var in [
        "WGPU_BACKEND",
        "WGPU_ADAPTER_NAME",
        "SELATTN_ADAPTER",
        "SELATTN_PATH",
        "VK_ICD_FILENAMES",
        "VK_DRIVER_FILES",
    ] {
        if let Ok(v) = std::env::var(var) {
            let _ = writeln!(s, "env: {var}={v}");
        }
    }
    s
}

fn os_version() -> String {
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    match std::env::consts::OS {
        "linux" => {
            let pretty = std::fs::read_to_string("/etc/os-release")
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                        .map(|v| v.trim_matches('"').to_string())
                })
                .unwrap_or_default();
            let kernel = run("uname", &["-r"]).unwrap_or_default();
            let cpu = std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("model name"))
                        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                })
                .unwrap_or_default();
            format!("{pretty}, kernel {kernel}, cpu {cpu}")
        }
        "macos" => run("sw_vers", &["-productVersion"])
            .map(|v| format!("macOS {v}"))
            .unwrap_or_default(),
        "windows" => run("cmd", &["/C", "ver"]).unwrap_or_default(),
        _ => String::new(),
    }
}

fn describe_adapter(a: &wgpu::Adapter, why: &Option<String>) -> String {
    let i = a.get_info();
    let l = a.limits();
    let d = a.get_downlevel_capabilities();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "adapter: {} ({:?}, {:?})",
        i.name, i.backend, i.device_type
    );
    let _ = writeln!(
        s,
        "  vendor 0x{:04x} device 0x{:04x}; driver: {} {}",
        i.vendor, i.device, i.driver, i.driver_info
    );
    let _ = writeln!(
        s,
        "  subgroup size {}..{}; shader model {:?}; compute shaders: {}",
        i.subgroup_min_size,
        i.subgroup_max_size,
        d.shader_model,
        d.flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
    );
    let _ = writeln!(
        s,
        "  limits: workgroup memory {} B, invocations {}, workgroup size {}x{}x{}, \
         storage buffers/stage {}, storage binding {} B, buffer {} B, workgroups/dim {}",
        l.max_compute_workgroup_storage_size,
        l.max_compute_invocations_per_workgroup,
        l.max_compute_workgroup_size_x,
        l.max_compute_workgroup_size_y,
        l.max_compute_workgroup_size_z,
        l.max_storage_buffers_per_shader_stage,
        l.max_storage_buffer_binding_size,
        l.max_buffer_size,
        l.max_compute_workgroups_per_dimension
    );
    let f = a.features();
    let wanted = [
        ("SHADER_F16", wgpu::Features::SHADER_F16),
        ("SUBGROUP", wgpu::Features::SUBGROUP),
        ("TIMESTAMP_QUERY", wgpu::Features::TIMESTAMP_QUERY),
        (
            "EXPERIMENTAL_COOPERATIVE_MATRIX",
            wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
        ),
    ];
    let has: Vec<String> = wanted
        .iter()
        .map(|(n, x)| format!("{n}={}", f.contains(*x)))
        .collect();
    let _ = writeln!(s, "  features used by selattn: {}", has.join(" "));
    if f.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
        for p in a.cooperative_matrix_properties() {
            let _ = writeln!(
                s,
                "  coop matrix {}x{}x{} {:?}->{:?}",
                p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type
            );
        }
    }
    let _ = writeln!(s, "  all features: {f:?}");
    match why {
        Some(r) => {
            let _ = writeln!(s, "  UNUSABLE: {r}");
        }
        None => {
            let _ = writeln!(s, "  usable");
        }
    }
    s
}

/// A number for the report; JSON has no infinity or NaN, so those become a string saying which.
fn json_num(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::json!(x.to_string())
    }
}

fn json_cmp(c: &Option<Cmp>) -> serde_json::Value {
    match c {
        None => serde_json::Value::Null,
        Some(c) => serde_json::json!({
            "max_abs": json_num(c.max_abs),
            "at": c.at,
            "rel_norm": json_num(c.rel_norm),
            "bad": c.bad,
            "nan": c.nan,
        }),
    }
}

fn write_json(path: &str, header: &str, adapters: &[String], rows: &[Row]) -> std::io::Result<()> {
    let results: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "adapter": r.adapter,
                "backend": r.backend,
                "driver": r.driver,
                "dtype": format!("{:?}", r.dtype),
                "variant": r.variant,
                "case": r.case,
                "kernel": r.kernel,
                "o": json_cmp(&r.o),
                "lse": json_cmp(&r.lse),
                "f_out": json_cmp(&r.f_out),
                "f16_baseline": r.baseline.map(json_num),
                "error": r.error,
                "pass": r.pass,
                "seconds": json_num(r.seconds),
            })
        })
        .collect();
    let report = serde_json::json!({
        "machine": header,
        "adapters": adapters,
        "tolerances": {
            "f32_elem": F32_ELEM_TOL,
            "f32_norm": F32_NORM_TOL,
            "f16_elem": F16_ELEM_TOL,
            "f16_norm": F16_NORM_TOL,
        },
        "results": results,
        "summary": {
            "runs": rows.len(),
            "failed": rows.iter().filter(|r| !r.pass).count(),
        },
    });
    std::fs::write(path, format!("{report:#}\n"))
}

/// Every kernel variant on every adapter wgpu finds, against the f64 CPU reference; exits 1 on
/// any failure.
#[derive(clap::Parser)]
#[command(name = "validate")]
struct Cli {
    /// Fewer shapes.
    #[arg(long)]
    quick: bool,
    /// Also write the report as JSON.
    #[arg(long, value_name = "PATH")]
    json: Option<String>,
}

/// A context on every adapter the filter (`SELATTN_ADAPTER`) lets through that gives a device;
/// each adapter's description is printed, and returned, with the reason where it gives none.
fn open_contexts() -> (Vec<Context>, Vec<String>) {
    let filter = std::env::var(selattn::ADAPTER_ENV)
        .ok()
        .map(|s| s.to_lowercase());
    let mut contexts = vec![];
    let mut adapter_text = vec![];
    for (a, why) in selattn::adapters() {
        let name = a.get_info().name;
        if let Some(f) = &filter {
            if !name.to_lowercase().contains(f.as_str()) {
                continue;
            }
        }
        // An adapter that looks usable may still refuse a device: list it with the reason.
        let (ctx, why) = match why {
            Some(r) => (None, Some(r)),
            None => match Context::from_adapter(&a) {
                Ok(c) => (Some(c), None),
                Err(e) => (None, Some(format!("requesting a device failed: {e}"))),
            },
        };
        let text = describe_adapter(&a, &why);
        print!("{text}");
        adapter_text.push(text);
        contexts.extend(ctx);
    }
    (contexts, adapter_text)
}

/// One result line of the table.
fn print_row(r: &Row, elem: DType) {
    let (m, rel) = r.worst();
    let short = |s: &str, n: usize| s.chars().take(n).collect::<String>();
    println!(
        "{:<28} {:<7} {:<26} {:<4} {:<22} {:<27} {:<17} {:>9.2e} {:>9.2e}  {}",
        short(&r.adapter, 28),
        r.backend,
        short(&r.driver, 26),
        if elem == DType::F16 { "f16" } else { "f32" },
        r.variant,
        r.case,
        r.kernel,
        m,
        rel,
        match (&r.error, r.pass) {
            (Some(e), true) => e.clone(),
            (Some(e), false) => format!("FAIL: {e}"),
            (None, true) => "pass".into(),
            (None, false) => format!(
                "FAIL: O {:?} LSE {:?} F_out {:?} f16 baseline {:?}",
                r.o, r.lse, r.f_out, r.baseline
            ),
        }
    );
}

/// The per-adapter summary; true when any row failed.
fn print_summary(contexts: &[Context], rows: &[Row]) -> bool {
    println!();
    println!("summary:");
    let mut any_fail = false;
    for ctx in contexts {
        let i = &ctx.capabilities().info;
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|r| r.adapter == i.name && r.backend == format!("{:?}", i.backend))
            .collect();
        let failed = mine.iter().filter(|r| !r.pass).count();
        any_fail |= failed > 0;
        let worst = |dt: DType| {
            mine.iter()
                .filter(|r| r.dtype == dt && r.error.is_none())
                .map(|r| r.worst())
                .fold((0.0f64, 0.0f64), |(a, b), (m, r)| (a.max(m), b.max(r)))
        };
        let worst_text = |dt: DType| {
            if mine.iter().any(|r| r.dtype == dt) {
                let (m, r) = worst(dt);
                format!("max {m:.2e} rel {r:.2e}")
            } else {
                "not run".to_string()
            }
        };
        println!(
            "  {} ({:?}): {} runs, {} failed; worst f32 {}; worst f16 {}; {:.1} s",
            i.name,
            i.backend,
            mine.len(),
            failed,
            worst_text(DType::F32),
            worst_text(DType::F16),
            mine.iter().map(|r| r.seconds).sum::<f64>()
        );
    }
    any_fail
}

fn main() {
    let Cli { quick, json } = <Cli as clap::Parser>::parse();

    let header = machine_header();
    print!("{header}");
    let (contexts, adapter_text) = open_contexts();
    println!();

    println!(
        "max err / rel err: worst over O, LSE and F_out of max |gpu - ref| and of the \
         norm-wise relative error; tiles: forward kernel D BRxBC/TR"
    );
    let cases = cases(quick);
    let vars = variants();
    let mut rows = vec![];
    println!(
        "{:<28} {:<7} {:<26} {:<4} {:<22} {:<27} {:<17} {:>9} {:>9}  result",
        "adapter", "backend", "driver", "type", "variant", "shape", "tiles", "max err", "rel err"
    );
    for ctx in &contexts {
        let mut elems = vec![DType::F32];
        if ctx.capabilities().f16 {
            elems.push(DType::F16);
        }
        // Every call on the scalar path; f16 also on the cooperative-matrix path where the
        // adapter has it.
        let mut runs = vec![];
        for &elem in &elems {
            runs.push((elem, Path::Scalar));
            if elem == DType::F16 && ctx.capabilities().coop_16x16_f16() {
                runs.push((elem, Path::Coop));
            }
        }
        for &(elem, path) in &runs {
            for (ci, case) in cases.iter().enumerate() {
                for (vi, var) in vars.iter().enumerate() {
                    let seed = 1000 * ci as u64 + vi as u64;
                    let r = run_one(ctx, case, var, elem, path, seed);
                    print_row(&r, elem);
                    rows.push(r);
                }
            }
        }
    }

    let mut any_fail = print_summary(&contexts, &rows);
    if contexts.is_empty() {
        println!("  no adapter could run the kernels (see the reasons above)");
        any_fail = true;
    }
    if let Some(path) = json {
        match write_json(&path, &header, &adapter_text, &rows) {
            Ok(()) => println!("wrote {path}"),
            Err(e) => {
                eprintln!("writing {path}: {e}");
                any_fail = true;
            }
        }
    }
    if any_fail {
        println!("FAILED");
        std::process::exit(1);
    }
    println!("all passed");
}
