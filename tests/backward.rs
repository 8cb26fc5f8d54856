//! The backward pass on every adapter against the f64 reference backward
//! (`selattn::reference_backward`): every option on and off, GQA and MQA, kv_len padding (and
//! rows with no allowed key), selection head != 0 with F0 and dF_out, Nq < Nk with `start`, odd
//! sizes, head dims across the supported range; only the requested gradients; repeat runs bit
//! identical; bounds-checked and unchecked shaders agree; f16 storage; typed errors; the scratch
//! bound. O and LSE come from the GPU forward, as in training. The cooperative-matrix backward
//! (f16, where the adapter has it) against the reference and against the forced scalar path; on
//! adapters without it, a forced coop call is a typed error; its path choice on reference devices.

mod common;
use std::sync::OnceLock;

use common::backward::backward_data;
use common::chunks::{chunks_backward, chunks_forward};
use common::*;
use selattn::kernels::backward::Wanted;
use selattn::kernels::Kernel;
use selattn::reference::HostInputs;
use selattn::reference_backward::{backward, HostGrads};
use selattn::{
    BackwardPlan, Context, DType, Error, Grads, Options, Path, Shape, Spec, Switches, Upstream,
};

/// f32 storage: norm-wise relative error per gradient (DESIGN.md §4 asks under 1e-5 of the
/// forward; the backward sums over both axes, so its f32 rounding is a few times larger).
const TOL: f64 = 1e-5;

struct BCase {
    name: String,
    shape: Shape,
    opts: Options,
    x: HostInputs,
    d_o: Vec<f32>,
    df_out: Option<Vec<f32>>,
}

#[allow(clippy::too_many_arguments)]
fn bcase(
    name: &str,
    shape: Shape,
    opts: Options,
    c: Switches,
    f0: bool,
    df_out: bool,
    kv_len: Option<Vec<u32>>,
    seed: u64,
) -> BCase {
    let (mut x, d_o, df_out) = backward_data(&shape, c, f0, df_out, seed, seed ^ 0xabcdef);
    if kv_len.is_some() {
        x.kv_len = kv_len;
    }
    BCase {
        name: format!(
            "{}{}{}",
            case_name(name, &shape, &opts, &c),
            if f0 { " +F0" } else { "" },
            if df_out.is_some() { " +dF_out" } else { "" },
        ),
        shape,
        opts,
        x,
        d_o,
        df_out,
    }
}

// Long on purpose: a table of cases, one per line group, each named by what it covers.
/// The cases share feature sets and head dims where they can: every distinct (head dim, options)
/// is a set of pipelines to compile, which dominates the run time on software adapters.
fn cases() -> Vec<BCase> {
    let all = Switches::ALL;
    let none = Switches::NONE;
    let sel = |h| Options::causal().selective(h);
    vec![
        // 0
        bcase(
            "full plain, D8",
            Shape::new(1, 2, 17, 8),
            Options::new(),
            none,
            false,
            false,
            None,
            1,
        ),
        // 1
        bcase(
            "full, every control, GQA, Nq < Nk",
            Shape::new(2, 4, 29, 32).with_kv_heads(2).with_q_len(13),
            Options::new(),
            all,
            false,
            false,
            None,
            2,
        ),
        // 2
        bcase(
            "causal, every control",
            Shape::new(2, 2, 33, 32),
            Options::causal(),
            all,
            false,
            false,
            None,
            3,
        ),
        // 3
        bcase(
            "causal plain, start, scale",
            Shape::new(1, 2, 40, 32).with_q_len(7),
            Options::causal().start(20).scale(0.3),
            none,
            false,
            false,
            None,
            4,
        ),
        // 4
        bcase(
            "selective head 0",
            Shape::new(1, 2, 37, 32),
            sel(0),
            none,
            false,
            true,
            None,
            5,
        ),
        // 5
        bcase(
            "selective head 3 of GQA, kv_len padding",
            Shape::new(2, 4, 41, 32).with_kv_heads(2),
            sel(3),
            all,
            true,
            true,
            Some(vec![30, 5]),
            6,
        ),
        // 6
        bcase(
            "selective MQA, chunk in the middle",
            Shape::new(1, 3, 45, 32).with_kv_heads(1).with_q_len(10),
            sel(1).start(23),
            all,
            true,
            true,
            Some(vec![45]),
            7,
        ),
        // 7
        bcase(
            "selective decode Nq=1",
            Shape::new(2, 2, 30, 32).with_q_len(1),
            sel(1),
            all,
            true,
            true,
            None,
            8,
        ),
        // 8
        bcase(
            "causal D128",
            Shape::new(1, 2, 20, 128),
            Options::causal(),
            all,
            false,
            false,
            None,
            9,
        ),
        // 9
        bcase(
            "full D256",
            Shape::new(1, 1, 9, 256),
            Options::new(),
            none,
            false,
            false,
            None,
            10,
        ),
        // 10
        bcase(
            "full, kv_len [0, 7]: rows with no allowed key",
            Shape::new(2, 2, 11, 32),
            Options::new(),
            all,
            false,
            false,
            Some(vec![0, 7]),
            11,
        ),
        // 11
        bcase(
            "selective, 3 query tiles, no dF_out",
            Shape::new(1, 2, 50, 32),
            sel(1),
            all,
            false,
            false,
            None,
            12,
        ),
    ]
}

#[derive(Debug, Default)]
struct GpuGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dtau: Vec<f32>,
    dalpha: Vec<f32>,
    dgate: Vec<f32>,
    df0: Vec<f32>,
}

impl GpuGrads {
    /// The same values in f64, as the reference gives them.
    fn widened(self) -> HostGrads {
        let w = |v: Vec<f32>| v.into_iter().map(f64::from).collect();
        HostGrads {
            dq: w(self.dq),
            dk: w(self.dk),
            dv: w(self.dv),
            dtau: w(self.dtau),
            dalpha: w(self.dalpha),
            dgate: w(self.dgate),
            df0: w(self.df0),
        }
    }

    /// `g` rounded to f32 (a sum of chunk gradients, checked like one call's).
    fn rounded(g: &HostGrads) -> Self {
        let r = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
        GpuGrads {
            dq: r(&g.dq),
            dk: r(&g.dk),
            dv: r(&g.dv),
            dtau: r(&g.dtau),
            dalpha: r(&g.dalpha),
            dgate: r(&g.dgate),
            df0: r(&g.df0),
        }
    }
}

/// Runs the GPU forward (O, LSE) and backward for `want`, poisoned outputs first.
fn run_gpu_backward(ctx: &Context, c: &BCase, elem: DType, want: Wanted) -> GpuGrads {
    run_gpu_backward_with(ctx, c, elem, want, None).0
}

/// [`run_gpu_backward`]; with `profile` (a query set's capacity), through
/// `encode_backward_profiled` instead, also returning its dispatch labels or error.
fn run_gpu_backward_with(
    ctx: &Context,
    c: &BCase,
    elem: DType,
    want: Wanted,
    profile: Option<u32>,
) -> (GpuGrads, Option<selattn::Result<Vec<String>>>) {
    let s = c.shape;
    let g = Gpu::upload(ctx, &s, &c.x, elem);
    let o = ctx.empty(&s.q_dims(), elem).unwrap();
    let lse = ctx.empty(&s.row_dims(), DType::F32).unwrap();
    ctx.attention(&g.inputs(), &c.opts, &selattn::Outputs::new(&o).lse(&lse))
        .unwrap();
    let up16 = |dims: Vec<u64>, d: &[f32]| match elem {
        DType::F16 => ctx.upload_f16(&dims, d).unwrap(),
        _ => ctx.upload(&dims, d).unwrap(),
    };
    let d_o = up16(s.q_dims(), &c.d_o);
    let df_out = c
        .df_out
        .as_ref()
        .map(|d| ctx.upload(&s.f_dims(), d).unwrap());
    let out = |on: bool, dims: Vec<u64>, dt: DType| {
        on.then(|| {
            let t = ctx.empty(&dims, dt).unwrap();
            ctx.poison(&t).unwrap();
            t
        })
    };
    let dq = out(want.dq, s.q_dims(), elem);
    let dk = out(want.dk, s.kv_dims(), elem);
    let dv = out(want.dv, s.kv_dims(), elem);
    let dtau = out(want.dtau, s.row_dims(), DType::F32);
    let dalpha = out(want.dalpha, s.alpha_dims(), DType::F32);
    let dgate = out(want.dgate, s.gate_dims(), DType::F32);
    let df0 = out(want.df0, s.f_dims(), DType::F32);
    let mut up = Upstream::new(&o, &lse, &d_o);
    if let Some(t) = &df_out {
        up = up.df_out(t);
    }
    let grads = Grads {
        dq: dq.as_ref(),
        dk: dk.as_ref(),
        dv: dv.as_ref(),
        dtau: dtau.as_ref(),
        dalpha: dalpha.as_ref(),
        dgate: dgate.as_ref(),
        df0: df0.as_ref(),
    };
    let mut labels = None;
    if let Some(cap) = profile {
        let qs = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("test profile"),
            ty: wgpu::QueryType::Timestamp,
            count: cap.max(1),
        });
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let r = ctx.encode_backward_profiled(&mut enc, &g.inputs(), &c.opts, &up, &grads, &qs, cap);
        ctx.queue.submit([enc.finish()]);
        labels = Some(r);
    } else {
        ctx.backward(&g.inputs(), &c.opts, &up, &grads)
            .unwrap_or_else(|e| panic!("[{}] {}: backward failed: {e}", ctx.describe(), c.name));
    }
    let get = |t: &Option<selattn::Tensor>| t.as_ref().map_or(vec![], |t| ctx.download(t).unwrap());
    let grads = GpuGrads {
        dq: get(&dq),
        dk: get(&dk),
        dv: get(&dv),
        dtau: get(&dtau),
        dalpha: get(&dalpha),
        dgate: get(&dgate),
        df0: get(&df0),
    };
    (grads, labels)
}

/// `encode_backward_profiled` where the device has TIMESTAMP_QUERY_INSIDE_PASSES: the same
/// gradients bit for bit as `backward`, one label per dispatch; a query set too small is a typed
/// error that writes no gradient (they keep their poison). Without the feature: FeatureMissing.
#[test]
fn profiled_backward_matches_and_labels() {
    let c = cases()
        .into_iter()
        .find(|c| c.opts.selective.is_some() && c.x.tau.is_some())
        .expect("a selective case with tau");
    let want = want_all(&c);
    for ctx in contexts() {
        let plain = run_gpu_backward(ctx, &c, DType::F32, want);
        let (g, labels) = run_gpu_backward_with(ctx, &c, DType::F32, want, Some(64));
        let Some(labels) = profile_labels(ctx, labels.expect("profiled run")) else {
            continue;
        };
        assert!(labels.len() >= 4, "[{}] {labels:?}", ctx.describe());
        assert!(labels.iter().any(|l| l.contains("dkv")), "{labels:?}");
        assert_eq!(all_bits(&g), all_bits(&plain), "[{}]", ctx.describe());
        let (g, small) = run_gpu_backward_with(ctx, &c, DType::F32, want, Some(2));
        assert!(
            matches!(small, Some(Err(_))),
            "[{}] {small:?}",
            ctx.describe()
        );
        assert!(
            g.dq.iter().all(|x| x.is_nan()),
            "[{}] a refused profiled call wrote dq",
            ctx.describe()
        );
    }
}

fn reference(c: &BCase) -> HostGrads {
    let spec = Spec {
        shape: c.shape,
        options: c.opts,
        present: c.x.present(c.opts.selective.is_some()),
    };
    backward(&spec, &c.x, &c.d_o, c.df_out.as_deref()).unwrap()
}

fn want_all(c: &BCase) -> Wanted {
    Wanted::all(c.opts.selective.is_some())
}

/// Compares every requested gradient; returns failure lines. `tol` bounds the norm-wise
/// relative error; each element must be within `tol` of the gradient's largest magnitude
/// times 20 plus 20 `tol` of its own.
fn check_grads(name: &str, g: &GpuGrads, r: &HostGrads, want: Wanted, tol: f64) -> Vec<String> {
    let mut fails = vec![];
    for (what, on, got, exp) in [
        ("dq", want.dq, &g.dq, &r.dq),
        ("dk", want.dk, &g.dk, &r.dk),
        ("dv", want.dv, &g.dv, &r.dv),
        ("dtau", want.dtau, &g.dtau, &r.dtau),
        ("dalpha", want.dalpha, &g.dalpha, &r.dalpha),
        ("dgate", want.dgate, &g.dgate, &r.dgate),
        ("df0", want.df0, &g.df0, &r.df0),
    ] {
        if !on {
            continue;
        }
        // dalpha sums B·Nq values of dt of either sign: its f32 rounding is relative to the
        // summands, which can be several times the sum.
        let tol = if what == "dalpha" { 10.0 * tol } else { tol };
        let scale = exp.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let c = compare(got, exp, 20.0 * tol * scale, 20.0 * tol);
        eprintln!(
            "  {name} {what}: max err {:.2e} at {} (scale {scale:.2e}), rel {:.2e}",
            c.max_abs, c.at, c.rel_norm
        );
        if c.bad > 0 || c.nan > 0 || c.rel_norm > tol || got.len() != exp.len() {
            fails.push(format!("{name} {what}: {c:?}"));
        }
    }
    fails
}

#[test]
fn gradients_match_reference() {
    let mut failures = vec![];
    for ctx in contexts() {
        for c in cases() {
            let t = std::time::Instant::now();
            let r = reference(&c);
            let g = run_gpu_backward(ctx, &c, DType::F32, want_all(&c));
            eprintln!(
                "[{}] {} in {:.1} s",
                ctx.describe(),
                c.name,
                t.elapsed().as_secs_f64()
            );
            let name = format!("[{}] {}", ctx.describe(), c.name);
            failures.extend(check_grads(&name, &g, &r, want_all(&c), TOL));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Each gradient asked for alone (and tau with the gate, as a temperature-only trainer would)
/// comes out as in the full call.
#[test]
fn only_requested_gradients() {
    let none = Wanted::default();
    let requests = [
        ("dq", Wanted { dq: true, ..none }),
        ("dk", Wanted { dk: true, ..none }),
        ("dv", Wanted { dv: true, ..none }),
        (
            "dtau+dgate",
            Wanted {
                dtau: true,
                dgate: true,
                ..none
            },
        ),
        (
            "dalpha",
            Wanted {
                dalpha: true,
                ..none
            },
        ),
        ("df0", Wanted { df0: true, ..none }),
    ];
    let all = cases();
    let picked = [&all[1], &all[5]];
    let mut failures = vec![];
    for ctx in contexts() {
        for c in picked {
            let r = reference(c);
            for (what, want) in requests {
                if want.df0 && c.opts.selective.is_none() {
                    continue;
                }
                let g = run_gpu_backward(ctx, c, DType::F32, want);
                let name = format!("[{}] {} only {what}", ctx.describe(), c.name);
                failures.extend(check_grads(&name, &g, &r, want, TOL));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn all_bits(g: &GpuGrads) -> Vec<u32> {
    [&g.dq, &g.dk, &g.dv, &g.dtau, &g.dalpha, &g.dgate, &g.df0]
        .into_iter()
        .flat_map(|v| bits(v))
        .collect()
}

#[test]
fn repeat_runs_bit_identical() {
    let all = cases();
    for ctx in contexts() {
        for c in [&all[2], &all[5]] {
            let a = run_gpu_backward(ctx, c, DType::F32, want_all(c));
            let b = run_gpu_backward(ctx, c, DType::F32, want_all(c));
            assert_eq!(
                all_bits(&a),
                all_bits(&b),
                "[{}] {}",
                ctx.describe(),
                c.name
            );
            // With the kept scratch dropped (forward and backward), the next call allocates
            // it again and gives the same bits.
            ctx.release_scratch();
            let r = run_gpu_backward(ctx, c, DType::F32, want_all(c));
            assert_eq!(
                all_bits(&a),
                all_bits(&r),
                "[{}] {} after release_scratch",
                ctx.describe(),
                c.name
            );
        }
    }
}

/// For every context of `contexts()`, one on the same adapter with naga's bounds checks on.
fn checked_contexts() -> &'static [Context] {
    static CHECKED: OnceLock<Vec<Context>> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let mut v = vec![];
        for ctx in contexts() {
            let found = selattn::adapters()
                .into_iter()
                .find(|(a, why)| why.is_none() && a.get_info() == ctx.capabilities().info);
            let (a, _) = found.expect("adapter of a context disappeared");
            v.push(Context::from_adapter(&a).unwrap().with_bounds_checks(true));
        }
        v
    })
}

#[test]
fn bounds_checks_on_and_off_agree() {
    let all = cases();
    for (ctx, checked) in contexts().iter().zip(checked_contexts()) {
        assert!(!ctx.bounds_checks() && checked.bounds_checks());
        for c in [&all[1], &all[5], &all[6]] {
            let a = run_gpu_backward(ctx, c, DType::F32, want_all(c));
            let b = run_gpu_backward(checked, c, DType::F32, want_all(c));
            assert!(
                same_up_to_contraction(ctx, &all_bits_f(&a), &all_bits_f(&b)),
                "[{}] {}: checked and unchecked differ",
                ctx.describe(),
                c.name
            );
        }
    }
}

fn all_bits_f(g: &GpuGrads) -> Vec<f32> {
    [&g.dq, &g.dk, &g.dv, &g.dtau, &g.dalpha, &g.dgate, &g.df0]
        .into_iter()
        .flat_map(|v| v.iter().copied())
        .collect()
}

/// f16 storage of Q, K, V, O, dO, dQ, dK, dV: against the reference on the f16-rounded inputs,
/// norm-wise error under 5e-3 and, for the f16 gradients, no worse than twice the f16 rounding
/// of the exact gradient (with a floor of 1e-3: O is stored in f16 too, which moves Delta).
/// The f16 rounded copy of a case (Q, K, V, dO rounded to f16, as the GPU sees them), with
/// options `opts`.
fn f16_case(c: &BCase, opts: Options) -> BCase {
    let round = selattn_tools::testing::round_f16;
    let mut c16 = BCase {
        name: c.name.clone(),
        shape: c.shape,
        opts,
        x: c.x.clone(),
        d_o: round(&c.d_o),
        df_out: c.df_out.clone(),
    };
    c16.x.q = round(&c.x.q);
    c16.x.k = round(&c.x.k);
    c16.x.v = round(&c.x.v);
    c16
}

/// f16 gradients against the reference on f16-rounded inputs (DESIGN.md §4): norm-wise error
/// under 5e-3 and, for dQ, dK, dV, no worse than twice the f16 rounding of the exact gradient
/// (with a floor of 1e-3: O is stored in f16 too, which moves Delta); failure lines.
fn check_f16(name: &str, g: &GpuGrads, r: &HostGrads) -> Vec<String> {
    let mut failures = vec![];
    for (what, got, exp) in [
        ("dq", &g.dq, &r.dq),
        ("dk", &g.dk, &r.dk),
        ("dv", &g.dv, &r.dv),
        ("dtau", &g.dtau, &r.dtau),
        ("dgate", &g.dgate, &r.dgate),
        ("df0", &g.df0, &r.df0),
    ] {
        if exp.is_empty() {
            continue;
        }
        let rounded: Vec<f32> = exp.iter().map(|&v| v as f32).collect();
        let floor = compare(&selattn_tools::testing::round_f16(&rounded), exp, 0.0, 0.0).rel_norm;
        let cmp = compare(got, exp, 0.0, 0.0);
        // dtau, dgate and dF0 are stored in f32: their error comes from the f16 inputs (O and
        // dO among them, through Delta), bounded by DESIGN.md §4's 5e-3.
        let limit = if matches!(what, "dtau" | "dgate" | "df0") {
            5e-3
        } else {
            (2.0 * floor).clamp(1e-3, 5e-3)
        };
        eprintln!(
            "{name} {what}: rel {:.2e} (f16 rounding {floor:.2e}, limit {limit:.2e})",
            cmp.rel_norm
        );
        if cmp.nan > 0 || cmp.rel_norm > limit || got.len() != exp.len() {
            failures.push(format!("{name} {what}: {cmp:?} limit {limit:.2e}"));
        }
    }
    failures
}

#[test]
fn f16_storage() {
    let all = cases();
    let mut failures = vec![];
    let mut ran = 0;
    for ctx in contexts() {
        if !ctx.capabilities().f16 {
            eprintln!(
                "[{}] no SHADER_F16: f16 storage not offered",
                ctx.describe()
            );
            continue;
        }
        for c in [&all[2], &all[5], &all[6]] {
            let c16 = f16_case(c, c.opts);
            let r = reference(&c16);
            let g = run_gpu_backward(ctx, &c16, DType::F16, want_all(c));
            ran += 1;
            let name = format!("[{}] f16 {}", ctx.describe(), c.name);
            failures.extend(check_f16(&name, &g, &r));
        }
    }
    eprintln!("{ran} f16 runs");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// Long on purpose: one bad call per block, each with the typed error it must give.
#[test]
fn invalid_calls_return_typed_errors() {
    let ctx = &contexts()[0];
    // Nq != Nk, so Q-shaped and K-shaped tensors differ.
    let s = Shape::new(1, 2, 9, 8).with_q_len(5);
    let x = random_inputs(&s, Switches::NONE, 1);
    let g = Gpu::upload(ctx, &s, &x, DType::F32);
    let t = |dims: Vec<u64>| ctx.empty(&dims, DType::F32).unwrap();
    let (o, lse, d_o) = (t(s.q_dims()), t(s.row_dims()), t(s.q_dims()));
    let (dq, dk, f) = (t(s.q_dims()), t(s.kv_dims()), t(s.f_dims()));
    let up = Upstream::new(&o, &lse, &d_o);
    let causal = Options::causal();
    let run =
        |opts: &Options, up: &Upstream, grads: &Grads| ctx.backward(&g.inputs(), opts, up, grads);
    // Fine.
    run(&causal, &up, &Grads::new().dq(&dq)).unwrap();
    // dO of the wrong shape.
    let bad = t(s.kv_dims().into_iter().map(|d| d + 1).collect());
    let e = run(
        &causal,
        &Upstream::new(&o, &lse, &bad),
        &Grads::new().dq(&dq),
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { tensor: "dO", .. }),
        "{e:?}"
    );
    // A gradient of the wrong shape and of the wrong type.
    let e = run(&causal, &up, &Grads::new().dq(&dk)).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { tensor: "dq", .. }),
        "{e:?}"
    );
    let dq_u32 = ctx.upload_u32(&s.q_dims(), &[0; 80]).unwrap();
    let e = run(&causal, &up, &Grads::new().dq(&dq_u32)).unwrap_err();
    assert!(
        matches!(e, Error::DTypeMismatch { tensor: "dq", .. }),
        "{e:?}"
    );
    // dF_out and dF0 without selective masking.
    let e = run(&causal, &up.df_out(&f), &Grads::new().dq(&dq)).unwrap_err();
    assert!(
        matches!(e, Error::InputWithoutUse { what: "dF_out", .. }),
        "{e:?}"
    );
    let e = run(&causal, &up, &Grads::new().df0(&f)).unwrap_err();
    assert!(
        matches!(e, Error::InputWithoutUse { what: "dF0", .. }),
        "{e:?}"
    );
    // A gradient aliasing an input, or another gradient.
    let e = run(&causal, &up, &Grads::new().dq(&g.q)).unwrap_err();
    assert!(matches!(e, Error::BadBuffer { .. }), "{e:?}");
    let e = run(&causal, &up, &Grads::new().dq(&dq).dv(&dq)).unwrap_err();
    assert!(
        matches!(e, Error::BadBuffer { .. }) || matches!(e, Error::ShapeMismatch { .. }),
        "{e:?}"
    );
    let e = run(&causal, &up, &Grads::new().dk(&dk).dv(&dk)).unwrap_err();
    assert!(matches!(e, Error::BadBuffer { .. }), "{e:?}");
    // The forward's own checks: LSE of the wrong shape, selective without causal.
    let e = run(
        &causal,
        &Upstream::new(&o, &dq, &d_o),
        &Grads::new().dq(&dk),
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { tensor: "lse", .. }),
        "{e:?}"
    );
    let e = run(&Options::new().selective(0), &up, &Grads::new().dq(&dq)).unwrap_err();
    assert_eq!(e, Error::SelectiveNeedsCausal);
    // Tensors of another context: dO and a gradient are refused, nothing is recorded.
    let info = &ctx.capabilities().info;
    let (a, _) = selattn::adapters()
        .into_iter()
        .find(|(a, why)| {
            why.is_none() && a.get_info().name == info.name && a.get_info().backend == info.backend
        })
        .expect("the adapter is seen again");
    let other = selattn::Context::from_adapter(&a).unwrap();
    let (far_do, far_dq) = (
        other.empty(&s.q_dims(), DType::F32).unwrap(),
        other.empty(&s.q_dims(), DType::F32).unwrap(),
    );
    let e = run(
        &causal,
        &Upstream::new(&o, &lse, &far_do),
        &Grads::new().dq(&dq),
    )
    .unwrap_err();
    assert_eq!(e, Error::ForeignTensor { tensor: "dO" });
    let e = run(&causal, &up, &Grads::new().dq(&far_dq)).unwrap_err();
    assert_eq!(e, Error::ForeignTensor { tensor: "dq" });
}

/// Scratch: the workspace holds rows and keys, plus with selective masking B·Hkv·⌈Nq/Br⌉·Nk
/// column sums and C (B·⌈Nq/Br⌉·Nk): within B·(Hq + 1)·⌈Nq/Br⌉·Nk floats beyond the linear
/// parts, far below an Nq×Nk matrix per head. Checked by formula on big planned shapes.
#[test]
fn scratch_bytes_bound() {
    let ctx = &contexts()[0];
    // This adapter, and the reference NVIDIA device with cooperative matrices (whose coop path
    // uses selective tiles of at most 16 rows).
    let coop_caps = selattn_tools::variants::reference_devices()
        .into_iter()
        .find(|c| c.coop_16x16_f16())
        .expect("a reference device with cooperative matrices");
    for mut caps in [ctx.capabilities().clone(), coop_caps] {
        caps.max_storage_binding = u64::MAX;
        caps.max_buffer = u64::MAX;
        for (bn, hq, hkv, n, d) in [
            (1u32, 8u32, 2u32, 4096u32, 64u32),
            (4, 16, 16, 4096, 128),
            (2, 8, 8, 16384, 64),
        ] {
            for sel in [false, true] {
                let mut options = Options::causal();
                if sel {
                    options = options.selective(1);
                }
                let r = Spec {
                    shape: Shape::new(bn, hq, n, d).with_kv_heads(hkv),
                    options,
                    present: Switches {
                        tau: true,
                        alpha: true,
                        gate: true,
                        kv_len: true,
                        lse: true,
                        ..Switches::default()
                    },
                }
                .validate()
                .unwrap();
                let plan = BackwardPlan::new(&caps, &r, DType::F16, Wanted::all(sel)).unwrap();
                let (b, hq, hkv, n, d) = (bn as u64, hq as u64, hkv as u64, n as u64, d as u64);
                let nqt = n.div_ceil(plan.br as u64);
                let rows = b * hq * n;
                let keys = b * hkv * n;
                // LSE, Delta, tau, dt; gate, dgate; alpha; kv_len.
                let linear = 4 * rows + 2 * keys + hq + b;
                let selective = if sel {
                    b * hkv * nqt * n + b * nqt * n + b * n + 2 * b * n * d
                } else {
                    0
                };
                assert_eq!(
                    plan.scratch_bytes(),
                    4 * (linear + selective),
                    "B{b} Hq{hq} N{n} sel {sel}"
                );
                assert!(b * hkv * nqt * n + b * nqt * n <= b * (hq + 1) * nqt * n);
                let full = 4 * b * hq * n * n;
                eprintln!(
                "[{}] B{b} Hq{hq} Hkv{hkv} N{n} D{d} sel {sel}: path {:?}, Br {}, scratch {} MiB, one Nq×Nk per head would be {} MiB",
                caps.info.name,
                plan.path,
                plan.br,
                plan.scratch_bytes() >> 20,
                full >> 20
            );
                assert!(plan.scratch_bytes() * 4 < full);
            }
        }
    }
}

/// The chunk rule on the GPU: a sequence run forward in chunks (F_out of one chunk as F0 of the
/// next), then backward last chunk first (dF0 of one chunk, first keys, as dF_out of the one
/// before) gives the whole sequence's gradients (the reference backward of the whole run).
#[test]
fn chunked_backward_equals_whole() {
    let shape = Shape::new(2, 4, 40, 32).with_kv_heads(2);
    let opts = Options::causal().selective(3);
    let whole = bcase(
        "chunked",
        shape,
        opts,
        Switches::ALL,
        true,
        true,
        Some(vec![40, 23]),
        77,
    );
    let r = reference(&whole);
    let bounds = [0usize, 17, 18, 40];
    let x = &whole.x;
    let mut failures = vec![];
    for ctx in contexts() {
        // Forward, threading F through the GPU's own F_out.
        let chunks = chunks_forward(&shape, &opts, x, &bounds, |c| {
            run_gpu(ctx, &c.shape, &c.x, &c.opts, DType::F32).f_out
        });
        let acc = chunks_backward(
            &shape,
            &chunks,
            &whole.d_o,
            whole.df_out.as_deref().unwrap(),
            |c, d_o, df_out| {
                let c = BCase {
                    name: format!("chunk {}..{}", c.lo, c.hi),
                    shape: c.shape,
                    opts: c.opts,
                    x: c.x.clone(),
                    d_o,
                    df_out: Some(df_out),
                };
                run_gpu_backward(ctx, &c, DType::F32, want_all(&c)).widened()
            },
        );
        let got = GpuGrads::rounded(&acc);
        let name = format!("[{}] chunks {bounds:?}", ctx.describe());
        failures.extend(check_grads(&name, &got, &r, want_all(&whole), TOL));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// Long on purpose: a table of cases.
/// Cases for the cooperative-matrix path: the shared cases whose head dim it takes (multiples
/// of 16 up to 128), and larger ones that span several 64-key and 64-row workgroups, staged
/// tiles and 16-row chunks (cheap on a GPU with tensor cores, the only place they run).
fn coop_cases() -> Vec<BCase> {
    let all = Switches::ALL;
    let none = Switches::NONE;
    let sel = |h| Options::causal().selective(h);
    let mut v: Vec<BCase> = cases()
        .into_iter()
        .filter(|c| c.shape.head_dim % 16 == 0 && c.shape.head_dim <= 128)
        .collect();
    v.extend([
        bcase(
            "coop tiles, selective GQA, kv_len",
            Shape::new(1, 4, 150, 64).with_kv_heads(2),
            sel(3),
            all,
            true,
            true,
            Some(vec![140]),
            21,
        ),
        bcase(
            "coop D128 causal, Nq < Nk",
            Shape::new(2, 2, 130, 128).with_q_len(90),
            Options::causal(),
            all,
            false,
            false,
            None,
            22,
        ),
        bcase(
            "coop D16 full",
            Shape::new(1, 2, 70, 16),
            Options::new(),
            none,
            false,
            false,
            None,
            23,
        ),
        bcase(
            "coop D96 selective, chunk",
            Shape::new(1, 2, 100, 96).with_q_len(77),
            sel(1).start(20),
            all,
            true,
            true,
            None,
            24,
        ),
        bcase(
            "coop D128 selective MQA",
            Shape::new(1, 3, 81, 128).with_kv_heads(1),
            sel(2),
            all,
            false,
            true,
            None,
            25,
        ),
        // du scratch (coop_selq writes du per chunk of 64-row blocks into the dead G slots of
        // KV heads 1.., coop_selk_du reads it): (Hkv - 1) * ceil(Nq / BR) >= 64 rows per chunk.
        bcase(
            "coop du chunks, GQA, kv_len",
            Shape::new(1, 10, 300, 32).with_kv_heads(5),
            sel(7),
            all,
            true,
            true,
            Some(vec![290]),
            26,
        ),
        bcase(
            "coop du chunks, Nq < Nk",
            Shape::new(2, 4, 400, 64).with_q_len(350),
            sel(2).start(50),
            all,
            true,
            false,
            Some(vec![390, 372]),
            27,
        ),
        bcase(
            "coop du one chunk",
            Shape::new(1, 17, 64, 16),
            sel(16),
            none,
            false,
            false,
            None,
            28,
        ),
    ]);
    v
}

/// The planner's path choice on the reference devices (no GPU needed): the cooperative-matrix
/// backward for f16 storage at head dims 16..=128 step 16 where the device reports 16x16x16
/// f16->f32 matrices, within its workgroup memory, with selective tiles of at most 16 rows;
/// the scalar path for f32, other head dims and other devices; a forced coop path where it
/// cannot run is a typed error.
#[test]
fn coop_path_choice() {
    for caps in selattn_tools::variants::reference_devices() {
        let coop_device = caps.coop_16x16_f16();
        for d in (8..=256).step_by(8) {
            for sel in [false, true] {
                for elem in [DType::F16, DType::F32] {
                    let mut options = Options::causal();
                    if sel {
                        options = options.selective(0);
                    }
                    let spec = |path| Spec {
                        shape: Shape::new(1, 2, 40, d),
                        options: options.path(path),
                        present: Switches {
                            lse: true,
                            ..Switches::default()
                        },
                    };
                    let r = spec(Path::Auto).validate().unwrap();
                    let Ok(plan) = BackwardPlan::new(&caps, &r, elem, Wanted::all(sel)) else {
                        continue;
                    };
                    let expect = coop_device && elem == DType::F16 && d % 16 == 0 && d <= 128;
                    let what = format!("{:?} D{d} sel {sel} {elem:?}", caps.info.name);
                    assert_eq!(plan.coop.is_some(), expect, "{what}");
                    assert_eq!(plan.path == Path::Coop, expect, "{what}");
                    let r = spec(Path::Coop).validate().unwrap();
                    let forced = BackwardPlan::new(&caps, &r, elem, Wanted::all(sel));
                    if let Some((dkv, dq)) = plan.coop {
                        assert!(
                            plan.br <= 16 && 16 % plan.br == 0,
                            "{what}: C tile {}",
                            plan.br
                        );
                        assert!(
                            dkv.workgroup_bytes() <= caps.workgroup_memory as u64,
                            "{what}"
                        );
                        assert!(dq.threads() <= caps.max_invocations, "{what}");
                        assert!(
                            plan.keys()
                                .iter()
                                .filter(|k| matches!(k.kernel, Kernel::CoopBackward(_)))
                                .count()
                                == 2 + 2 * plan.coop_sel.is_some() as usize,
                            "{what}: {:?}",
                            plan.keys()
                        );
                        assert!(forced.is_ok(), "{what}");
                        // With selective masking the selective terms run on the coop path too.
                        assert_eq!(plan.coop_sel.is_some(), sel, "{what}");
                        if let Some((selq, _)) = plan.coop_sel {
                            assert!(
                                selq.workgroup_bytes() <= caps.workgroup_memory as u64,
                                "{what}"
                            );
                        }
                    } else {
                        assert!(
                            matches!(forced, Err(Error::PathUnavailable { path: "coop", .. })),
                            "{what}: {forced:?}"
                        );
                    }
                }
            }
        }
    }
}

// Long on purpose: every coop property is checked on the same runs, so they share one loop.
/// The cooperative-matrix backward where the adapter has it (an adapter without it must refuse a
/// forced coop call with a typed error): every coop case against the reference (f16 rules),
/// forced-scalar and coop agree, only the requested gradients, repeat runs bit-identical,
/// bounds-checked and unchecked shaders agree.
#[test]
fn coop_backward() {
    let mut failures = vec![];
    let mut ran = 0;
    for (ctx, checked) in contexts().iter().zip(checked_contexts()) {
        let probe = Spec {
            shape: Shape::new(1, 1, 16, 64),
            options: Options::new().path(Path::Coop),
            present: Switches {
                lse: true,
                ..Switches::default()
            },
        }
        .validate()
        .unwrap();
        match BackwardPlan::new(ctx.capabilities(), &probe, DType::F16, Wanted::all(false)) {
            Err(Error::PathUnavailable { why, .. }) => {
                eprintln!("[{}] no coop backward: {why}", ctx.describe());
                continue;
            }
            Err(e) => panic!("[{}] probe: {e}", ctx.describe()),
            Ok(plan) => assert_eq!(plan.path, Path::Coop),
        }
        for (n, c) in coop_cases().iter().enumerate() {
            let t = std::time::Instant::now();
            if c.name.starts_with("coop du") {
                // These cases must take the du scratch (in chunks, but for "one chunk").
                let r = Spec {
                    shape: c.shape,
                    options: c.opts.path(Path::Coop),
                    present: Switches {
                        lse: true,
                        ..Switches::default()
                    },
                }
                .validate()
                .unwrap();
                let plan =
                    BackwardPlan::new(ctx.capabilities(), &r, DType::F16, want_all(c)).unwrap();
                let one = c.name.starts_with("coop du one");
                let ok = plan.du_rows > 0 && (plan.du_rows >= c.shape.q_len) == one;
                if !ok && std::env::var(selattn::kernels::backward::DU_ENV).as_deref() != Ok("0") {
                    failures.push(format!("{}: du rows {}", c.name, plan.du_rows));
                }
            }
            let coop = f16_case(c, c.opts.path(Path::Coop));
            let scalar = f16_case(c, c.opts.path(Path::Scalar));
            let r = reference(&coop);
            let want = want_all(c);
            let g = run_gpu_backward(ctx, &coop, DType::F16, want);
            ran += 1;
            let name = format!("[{}] coop {}", ctx.describe(), c.name);
            failures.extend(check_f16(&name, &g, &r));
            let gs = run_gpu_backward(ctx, &scalar, DType::F16, want);
            failures.extend(check_f16(
                &format!("[{}] scalar {}", ctx.describe(), c.name),
                &gs,
                &r,
            ));
            // Coop against forced scalar, gradient by gradient.
            for (what, a, b) in [
                ("dq", &g.dq, &gs.dq),
                ("dk", &g.dk, &gs.dk),
                ("dv", &g.dv, &gs.dv),
                ("dtau", &g.dtau, &gs.dtau),
                ("dgate", &g.dgate, &gs.dgate),
                ("df0", &g.df0, &gs.df0),
            ] {
                let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
                let cmp = compare(a, &b64, 0.0, 0.0);
                if cmp.nan > 0 || cmp.rel_norm > 5e-3 || a.len() != b.len() {
                    failures.push(format!("{name}: coop vs scalar {what}: {cmp:?}"));
                }
            }
            let again = run_gpu_backward(ctx, &coop, DType::F16, want);
            if all_bits(&again) != all_bits(&g) {
                failures.push(format!("{name}: repeat run differs"));
            }
            if n % 3 == 0 {
                let gc = run_gpu_backward(checked, &coop, DType::F16, want);
                if !same_up_to_contraction(ctx, &all_bits_f(&g), &all_bits_f(&gc)) {
                    failures.push(format!("{name}: checked and unchecked differ"));
                }
            }
            if c.opts.selective.is_some() && c.x.f0.is_some() {
                let none = Wanted::default();
                for (what, only) in [
                    ("dq", Wanted { dq: true, ..none }),
                    ("dk", Wanted { dk: true, ..none }),
                    ("dv", Wanted { dv: true, ..none }),
                    (
                        "dtau+dgate+df0",
                        Wanted {
                            dtau: true,
                            dgate: true,
                            df0: true,
                            ..none
                        },
                    ),
                ] {
                    let w = Wanted {
                        df_out: want.df_out,
                        ..only
                    };
                    let go = run_gpu_backward(ctx, &coop, DType::F16, w);
                    let mut r1 = HostGrads::default();
                    let pick = |on: bool, v: &Vec<f64>| if on { v.clone() } else { vec![] };
                    r1.dq = pick(w.dq, &r.dq);
                    r1.dk = pick(w.dk, &r.dk);
                    r1.dv = pick(w.dv, &r.dv);
                    r1.dtau = pick(w.dtau, &r.dtau);
                    r1.dgate = pick(w.dgate, &r.dgate);
                    r1.df0 = pick(w.df0, &r.df0);
                    failures.extend(check_f16(&format!("{name} only {what}"), &go, &r1));
                }
            }
            eprintln!("{name} in {:.1} s", t.elapsed().as_secs_f64());
        }
    }
    eprintln!("{ran} coop runs");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
