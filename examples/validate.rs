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

use selattn::reference::{self, HostInputs, HostOutputs};
use selattn::Switches;
use selattn::{Context, DType, Error, Options, Outputs, Path, Shape, Spec};
use selattn_tools::testing::{compare, random_inputs, round_f16, Cmp, DeviceInputs};

/// f32: every element within this, absolute plus relative. Measured over the full set on
/// llvmpipe (Vulkan and GL): max abs error O 9.9e-7, LSE 8.5e-7, F_out 2.9e-6; norm-wise at
/// most 2.8e-7. The bound leaves 3-10x for other hardware's exp2 and summation order.
const F32_ELEM_TOL: f64 = 1e-5;
/// f32: norm-wise relative error bound (DESIGN.md §4).
const F32_NORM_TOL: f64 = 1e-5;
/// f16 O: element-wise bound, absolute plus relative. Measured on llvmpipe (Vulkan): max abs
/// 9.7e-4, norm-wise 2.3e-4, never above the reference's own f16 rounding error.
const F16_ELEM_TOL: f64 = 5e-3;
/// f16 O: norm-wise relative error bound (DESIGN.md §4).
const F16_NORM_TOL: f64 = 5e-3;

/// One call variant: its name and its switches (causal, selective, optional inputs).
#[derive(Clone, Copy, Debug)]
struct Variant {
    /// Name in reports.
    name: &'static str,
    /// Which options and optional inputs are on.
    switches: Switches,
}

fn variants() -> Vec<Variant> {
    let c = |tau, alpha, gate, kv_len| Switches {
        tau,
        alpha,
        gate,
        kv_len,
        ..Switches::NONE
    };
    let mut v = vec![];
    for causal in [false, true] {
        let mut add = |name, selective, inputs: Switches| {
            v.push(Variant {
                name,
                switches: Switches {
                    causal,
                    selective,
                    ..inputs.inputs()
                },
            })
        };
        add("plain", false, Switches::NONE);
        add("tau", false, c(true, false, false, false));
        add("alpha", false, c(false, true, false, false));
        add("gate", false, c(false, false, true, false));
        add("kv_len", false, c(false, false, false, true));
        if causal {
            add("selective", true, Switches::NONE);
        }
        // Everything at once; selective masking only exists with causal.
        add("full", causal, Switches::ALL);
    }
    v
}

/// One shape, with an explicit first-query position and whether batch element 0 gets
/// kv_len = 0 (rows with no allowed key: zeros and LSE = -inf).
#[derive(Clone, Copy, Debug)]
struct Case {
    name: &'static str,
    shape: Shape,
    start: Option<u32>,
    empty_batch: bool,
}

fn cases(quick: bool) -> Vec<Case> {
    let case = |name, shape, start, empty_batch| Case {
        name,
        shape,
        start,
        empty_batch,
    };
    let mut v = vec![
        case(
            "Nq=1 (decode)",
            Shape::new(1, 2, 37, 64).with_q_len(1),
            None,
            false,
        ),
        case("N=37 D=24", Shape::new(1, 2, 37, 24), None, false),
        case(
            "Nq<Nk start=3",
            Shape::new(1, 2, 29, 8).with_q_len(5),
            Some(3),
            false,
        ),
        case(
            "GQA 4:1",
            Shape::new(2, 4, 19, 32).with_kv_heads(1),
            None,
            true,
        ),
    ];
    if !quick {
        v.extend([
            case(
                "N=70 D=16 (3+ query tiles)",
                Shape::new(1, 2, 70, 16),
                None,
                false,
            ),
            case("D=128", Shape::new(1, 2, 13, 128), None, false),
            case("D=256", Shape::new(1, 2, 9, 256), None, false),
            case(
                "Nq<Nk default start, B=2",
                Shape::new(2, 2, 33, 64).with_q_len(7),
                None,
                true,
            ),
        ]);
    }
    v
}

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

fn ok(c: &Cmp, norm: f64) -> bool {
    c.bad == 0 && c.nan == 0 && c.rel_norm < norm
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
        variant: format!(
            "{}{}{}",
            if path == Path::Coop { "coop " } else { "" },
            if var.switches.causal { "causal " } else { "" },
            var.name
        ),
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
    let mut opts = if var.switches.causal {
        Options::causal()
    } else {
        Options::new()
    }
    .path(path);
    if var.switches.selective {
        // The last head selects, so the selection head is not always head 0.
        opts = opts.selective(shape.q_heads - 1);
    }
    if let Some(s) = case.start {
        opts = opts.start(s);
    }
    let mut x: HostInputs = random_inputs(&shape, var.switches, seed);
    if case.empty_batch {
        if let Some(k) = x.kv_len.as_mut() {
            k[0] = 0;
        }
    }
    if elem == DType::F16 {
        // The GPU sees f16-rounded Q, K, V: the reference must see the same values.
        x.q = round_f16(&x.q);
        x.k = round_f16(&x.k);
        x.v = round_f16(&x.v);
    }
    let spec = Spec {
        shape,
        options: opts,
        present: x.present(var.switches.selective),
    };
    let reference = match reference::attention(&spec, &x) {
        Ok(r) => r,
        Err(e) => {
            row.error = Some(format!("reference rejected the case: {e}"));
            return row;
        }
    };
    let run = catch_unwind(AssertUnwindSafe(|| run_gpu(ctx, &shape, &x, &opts, elem)));
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
    compare_all(
        &mut row,
        &reference,
        &o,
        &lse,
        &f_out,
        var.switches.selective,
    );
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
    let plan = ctx.plan(&g.inputs(), opts, &outs)?;
    let f = plan.forward;
    let kernel = match plan.coop {
        Some(c) => format!("coop D{} {}x{}", c.d, c.br, c.bc),
        None => format!("D{} {}x{}/dn{}", f.d, f.br, f.bc, f.dn),
    };
    ctx.attention(&g.inputs(), opts, &outs)?;
    let f_out = if opts.selective.is_some() {
        ctx.download(&f_out)?
    } else {
        vec![]
    };
    Ok((kernel, ctx.download(&o)?, ctx.download(&lse)?, f_out))
}

fn compare_all(row: &mut Row, r: &HostOutputs, o: &[f32], lse: &[f32], f: &[f32], sel: bool) {
    let mut pass = true;
    let co = if row.dtype == DType::F16 {
        let rounded: Vec<f32> = round_f16(&r.o.iter().map(|&v| v as f32).collect::<Vec<_>>());
        let baseline = compare(&rounded, &r.o, 0.0, 0.0).rel_norm;
        row.baseline = Some(baseline);
        let c = compare(o, &r.o, F16_ELEM_TOL, F16_ELEM_TOL);
        // No worse than twice the error of the reference rounded to f16; an output that is
        // exact in f16 (baseline 0, e.g. all rows empty) must be exact.
        pass &= ok(&c, F16_NORM_TOL) && c.rel_norm <= 2.0 * baseline;
        c
    } else {
        let c = compare(o, &r.o, F32_ELEM_TOL, F32_ELEM_TOL);
        pass &= ok(&c, F32_NORM_TOL);
        c
    };
    row.o = Some(co);
    let cl = compare(lse, &r.lse, F32_ELEM_TOL, F32_ELEM_TOL);
    pass &= ok(&cl, F32_NORM_TOL);
    row.lse = Some(cl);
    if sel {
        let cf = compare(f, &r.f_out, F32_ELEM_TOL, F32_ELEM_TOL);
        pass &= ok(&cf, F32_NORM_TOL);
        row.f_out = Some(cf);
    }
    row.pass = pass;
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

fn main() {
    let Cli { quick, json } = <Cli as clap::Parser>::parse();

    let header = machine_header();
    print!("{header}");
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
                    rows.push(r);
                }
            }
        }
    }

    println!();
    println!("summary:");
    let mut any_fail = false;
    for ctx in &contexts {
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
