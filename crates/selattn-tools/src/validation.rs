//! The cross-adapter validation suite shared by `examples/validate.rs` (native, every adapter)
//! and `web/` (the browser): its tolerances, call variants, shapes, the preparation of one
//! (case, variant, dtype) against the f64 reference, and the comparison of the GPU outputs.
//! Each front keeps only its own run loop (blocking or async) and report.

use selattn::kernels::forward::Plan;
use selattn::reference::{self, HostInputs, HostOutputs};
use selattn::{DType, Options, Path, Shape, Spec, Switches};

use crate::testing::{compare, random_inputs, round_f16, Cmp};

/// f32: every element within this, absolute plus relative. Measured over the full set on
/// llvmpipe (Vulkan and GL): max abs error O 9.9e-7, LSE 8.5e-7, F_out 2.9e-6; norm-wise at
/// most 2.8e-7. The bound leaves 3-10x for other hardware's exp2 and summation order.
pub const F32_ELEM_TOL: f64 = 1e-5;
/// f32: norm-wise relative error bound (DESIGN.md §4).
pub const F32_NORM_TOL: f64 = 1e-5;
/// f16 O: element-wise bound, absolute plus relative. Measured on llvmpipe (Vulkan): max abs
/// 9.7e-4, norm-wise 2.3e-4, never above the reference's own f16 rounding error.
pub const F16_ELEM_TOL: f64 = 5e-3;
/// f16 O: norm-wise relative error bound (DESIGN.md §4).
pub const F16_NORM_TOL: f64 = 5e-3;

/// One call variant: its name and its switches (causal, selective, optional inputs).
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    /// Name in reports.
    pub name: &'static str,
    /// Which options and optional inputs are on.
    pub switches: Switches,
}

/// Plain, tau, alpha, gate, kv_len, non-causal and causal, selective, and everything at once.
pub fn variants() -> Vec<Variant> {
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

/// The variant's name in a report: `coop ` for the cooperative-matrix path, `causal `, the name.
pub fn variant_name(var: &Variant, path: Path) -> String {
    format!(
        "{}{}{}",
        if path == Path::Coop { "coop " } else { "" },
        if var.switches.causal { "causal " } else { "" },
        var.name
    )
}

/// One shape, with an explicit first-query position and whether batch element 0 gets
/// kv_len = 0 (rows with no allowed key: zeros and LSE = -inf).
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// Name in reports.
    pub name: &'static str,
    /// The shape.
    pub shape: Shape,
    /// First query position (default: Nk - Nq).
    pub start: Option<u32>,
    /// Batch element 0 has kv_len = 0 (when kv_len is given).
    pub empty_batch: bool,
}

/// The shapes (`quick`: the first four).
pub fn cases(quick: bool) -> Vec<Case> {
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

/// One (case, variant, dtype, path) ready to run: options, seeded inputs (f16-rounded Q, K, V
/// for f16 storage) and the f64 reference's outputs for them.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The options of the call (the last head selects, so the selection head is not always 0).
    pub options: Options,
    /// The inputs, as the GPU will see them.
    pub inputs: HostInputs,
    /// The reference's outputs for `inputs`.
    pub reference: HostOutputs,
}

/// Builds the call and runs the reference; an error (as text) if the reference rejects it.
pub fn prepare(
    case: &Case,
    var: &Variant,
    elem: DType,
    path: Path,
    seed: u64,
) -> Result<Prepared, String> {
    let shape = case.shape;
    let mut options = if var.switches.causal {
        Options::causal()
    } else {
        Options::new()
    }
    .path(path);
    if var.switches.selective {
        options = options.selective(shape.q_heads - 1);
    }
    if let Some(s) = case.start {
        options = options.start(s);
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
        options,
        present: x.present(var.switches.selective),
    };
    let reference =
        reference::attention(&spec, &x).map_err(|e| format!("reference rejected the case: {e}"))?;
    Ok(Prepared {
        options,
        inputs: x,
        reference,
    })
}

/// The forward kernel a plan runs, for reports: `coop D64 64x64` or `D64 16x32/dn4`.
pub fn kernel_name(plan: &Plan) -> String {
    let f = plan.forward;
    match plan.coop {
        Some(c) => format!("coop D{} {}x{}", c.d, c.br, c.bc),
        None => format!("D{} {}x{}/dn{}", f.d, f.br, f.bc, f.dn),
    }
}

/// The comparison of one run's outputs with the reference.
#[derive(Clone, Copy, Debug)]
pub struct Checked {
    /// O.
    pub o: Cmp,
    /// LSE.
    pub lse: Cmp,
    /// F_out (selective masking only).
    pub f_out: Option<Cmp>,
    /// f16: norm-wise error of the reference rounded to f16 (the "plain f16" baseline).
    pub baseline: Option<f64>,
    /// Every output within its bounds.
    pub pass: bool,
}

fn ok(c: &Cmp, norm: f64) -> bool {
    c.bad == 0 && c.nan == 0 && c.rel_norm < norm
}

/// Compares O, LSE and (with `selective`) F_out with the reference at the suite's tolerances.
/// f16 O must also be no worse than twice the error of the reference rounded to f16 (an output
/// that is exact in f16, baseline 0, must be exact).
pub fn check(
    elem: DType,
    r: &HostOutputs,
    o: &[f32],
    lse: &[f32],
    f_out: &[f32],
    selective: bool,
) -> Checked {
    let mut pass = true;
    let mut baseline = None;
    let co = if elem == DType::F16 {
        let rounded: Vec<f32> = round_f16(&r.o.iter().map(|&v| v as f32).collect::<Vec<_>>());
        let b = compare(&rounded, &r.o, 0.0, 0.0).rel_norm;
        baseline = Some(b);
        let c = compare(o, &r.o, F16_ELEM_TOL, F16_ELEM_TOL);
        pass &= ok(&c, F16_NORM_TOL) && c.rel_norm <= 2.0 * b;
        c
    } else {
        let c = compare(o, &r.o, F32_ELEM_TOL, F32_ELEM_TOL);
        pass &= ok(&c, F32_NORM_TOL);
        c
    };
    let cl = compare(lse, &r.lse, F32_ELEM_TOL, F32_ELEM_TOL);
    pass &= ok(&cl, F32_NORM_TOL);
    let cf = selective.then(|| compare(f_out, &r.f_out, F32_ELEM_TOL, F32_ELEM_TOL));
    if let Some(c) = &cf {
        pass &= ok(c, F32_NORM_TOL);
    }
    Checked {
        o: co,
        lse: cl,
        f_out: cf,
        baseline,
        pass,
    }
}
