//! The fused forward kernel against the f64 reference, on every adapter: shapes × options,
//! edge shapes, rows with no allowed key, repeat runs and bounds-checked shaders.

mod common;
use std::sync::OnceLock;

use common::*;
use selattn::{Context, DType, Options, Outputs, Shape};

/// f32 storage: element-wise atol = rtol and norm-wise bound (DESIGN.md §4 asks < 1e-5 norm-wise;
/// the errors seen here are ~1e-7 norm-wise, ~1e-6 element-wise).
const TOL: f64 = 2e-5;

fn sweep(cases: &[(Shape, Options, Switches)], seed: u64) {
    let cases: Vec<Case> = cases
        .iter()
        .enumerate()
        .map(|(n, (s, o, c))| Case::random("sweep", *s, *o, *c, seed + n as u64))
        .collect();
    check_cases(&cases, TOL);
}

/// Option sets shared by every test here, all at head dim 32: each distinct set is one shader
/// variant, and building variants (not running them) is what costs time on software adapters.
fn flag_sets() -> Vec<(Options, Switches)> {
    let all = Switches::ALL;
    let none = Switches::NONE;
    let c = |tau, alpha, gate, kv_len| Switches {
        tau,
        alpha,
        gate,
        kv_len,
        ..Switches::NONE
    };
    vec![
        (Options::new(), none),
        (Options::new(), all),
        (Options::new(), c(true, false, true, false)),
        (Options::causal(), none),
        (Options::causal(), all),
        (Options::causal(), c(false, true, false, true)),
        (Options::causal(), c(true, false, true, true)),
        (Options::causal().selective(1), none),
        (Options::causal().selective(1), all),
        (Options::causal().selective(1), c(true, true, true, false)),
    ]
}

/// Every control on and off, causal and not, with and without selective masking (each control is
/// off in some case where the others are on, so no flag hides behind another).
#[test]
fn every_option_on_and_off() {
    let s = Shape::new(2, 4, 33, 32).with_kv_heads(2);
    let cases: Vec<_> = flag_sets().into_iter().map(|(o, c)| (s, o, c)).collect();
    sweep(&cases, 100);
}

/// Every supported head dim at least once, at small N, alternating GQA, causality and controls
/// (selective masking at four of them: its passes are specialised on D too).
#[test]
fn every_head_dim() {
    let mut cases = vec![];
    for (n, d) in (8..=256).step_by(8).enumerate() {
        let n = n as u32;
        let len = 9 + n % 12;
        let shape = Shape::new(1, 2, len, d).with_kv_heads(1 + n % 2);
        let opts = match (n % 8, n % 2) {
            (7, _) => Options::causal().selective(n % 2),
            (_, 0) => Options::new(),
            _ => Options::causal(),
        };
        let c = if n % 4 < 2 {
            Switches::ALL
        } else {
            Switches::NONE
        };
        cases.push((shape, opts, c));
    }
    sweep(&cases, 200);
}

/// Nq = 1, Nq < Nk, Nq > Nk, sizes that are no tile multiple, MHA / GQA 4:1 / MQA, custom scale,
/// explicit start.
#[test]
fn edge_shapes() {
    let all = Switches::ALL;
    let none = Switches::NONE;
    let cases = [
        // decode: one query against many keys
        (Shape::new(2, 4, 65, 32).with_q_len(1), Options::new(), none),
        (
            Shape::new(2, 4, 65, 32).with_q_len(1),
            Options::causal(),
            all,
        ),
        (
            Shape::new(1, 8, 33, 32).with_kv_heads(2).with_q_len(1),
            Options::causal().selective(5),
            all,
        ),
        // one query, one key
        (Shape::new(1, 1, 1, 32), Options::new(), none),
        (Shape::new(1, 1, 1, 32), Options::causal(), all),
        // Nq < Nk
        (Shape::new(1, 2, 100, 32).with_q_len(7), Options::new(), all),
        (
            Shape::new(1, 2, 100, 32).with_q_len(7),
            Options::causal(),
            none,
        ),
        // Nq > Nk (non-causal only: causal needs start + Nq <= Nk)
        (Shape::new(1, 2, 17, 32).with_q_len(41), Options::new(), all),
        // no tile multiple
        (Shape::new(1, 2, 33, 32), Options::causal(), all),
        (Shape::new(1, 2, 65, 32), Options::new(), all),
        (Shape::new(2, 2, 100, 32), Options::causal(), none),
        // GQA 4:1, a group of 3, and MQA
        (
            Shape::new(1, 6, 21, 32).with_kv_heads(2),
            Options::causal(),
            all,
        ),
        (
            Shape::new(2, 8, 45, 32).with_kv_heads(2),
            Options::causal(),
            all,
        ),
        (
            Shape::new(1, 4, 50, 32).with_kv_heads(1),
            Options::new(),
            all,
        ),
        // custom scale
        (Shape::new(1, 2, 29, 32), Options::new().scale(0.05), all),
        (Shape::new(1, 2, 29, 32), Options::causal().scale(0.4), none),
        // explicit start: causal chunk in the middle or at 0, non-causal far positions (alpha reads them)
        (
            Shape::new(1, 2, 60, 32).with_q_len(10),
            Options::causal().start(23),
            all,
        ),
        (
            Shape::new(1, 2, 60, 32).with_q_len(10),
            Options::causal().start(0),
            all,
        ),
        (
            Shape::new(1, 2, 30, 32).with_q_len(5),
            Options::new().start(1000),
            all,
        ),
    ];
    sweep(&cases, 300);
}

/// kv_len = 0 for one batch element: every row of it has no allowed key. O must be exactly 0 and
/// LSE = -inf (never NaN), causal or not, selective or not; the other batch element is normal.
#[test]
fn rows_with_no_allowed_key() {
    let shape = Shape::new(2, 4, 21, 32).with_kv_heads(2).with_q_len(15);
    let mut failures = vec![];
    for ctx in contexts() {
        for opts in [
            Options::new(),
            Options::causal(),
            Options::causal().start(3).scale(0.3),
            Options::causal().selective(2),
        ] {
            let mut x = random_inputs(&shape, Switches::ALL, 400);
            x.kv_len = Some(vec![5, 0]);
            let name = format!("kvlen [5, 0] {}", opts_name(&opts));
            let gpu = run_gpu(ctx, &shape, &x, &opts, DType::F32);
            let r = run_ref(&shape, &x, &opts);
            if let Some(f) = check_case(&name, ctx, &gpu, &r, TOL) {
                failures.push(f);
            }
            // Batch element 1 is the second half of O and LSE.
            let o1 = &gpu.o[gpu.o.len() / 2..];
            let l1 = &gpu.lse[gpu.lse.len() / 2..];
            let o_nonzero = o1.iter().filter(|&&v| v != 0.0).count();
            let l_bad = l1.iter().filter(|&&v| v != f32::NEG_INFINITY).count();
            eprintln!(
                "[{}] {name}: empty rows: {o_nonzero} nonzero O, {l_bad} LSE != -inf",
                ctx.describe()
            );
            if o_nonzero + l_bad > 0 {
                failures.push(format!(
                    "[{}] {name}: {o_nonzero} nonzero O elements, {l_bad} LSE not -inf in empty rows",
                    ctx.describe()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// kv_len values above Nk are treated as Nk on the GPU (documented on `Inputs::kv_len`): the result
/// equals the one with kv_len = Nk bit for bit, and the reference with kv_len = Nk.
#[test]
fn kv_len_above_keys_is_clamped() {
    let shape = Shape::new(2, 2, 19, 32);
    let opts = Options::causal().selective(1);
    for ctx in contexts() {
        let mut x = random_inputs(&shape, Switches::ALL, 500);
        x.kv_len = Some(vec![19, 19]);
        let exact = run_gpu(ctx, &shape, &x, &opts, DType::F32);
        let r = run_ref(&shape, &x, &opts);
        x.kv_len = Some(vec![20, u32::MAX]);
        let over = run_gpu(ctx, &shape, &x, &opts, DType::F32);
        assert_eq!(bits(&exact.o), bits(&over.o), "[{}] O", ctx.describe());
        assert_eq!(
            bits(&exact.lse),
            bits(&over.lse),
            "[{}] LSE",
            ctx.describe()
        );
        assert_eq!(
            bits(&exact.f_out),
            bits(&over.f_out),
            "[{}] F",
            ctx.describe()
        );
        if let Some(f) = check_case("kv_len clamped", ctx, &over, &r, TOL) {
            panic!("{f}");
        }
    }
}

/// O alone (no LSE, no F_out): the kernel variants without those writes still produce O.
#[test]
fn without_optional_outputs() {
    let shape = Shape::new(1, 4, 27, 32).with_kv_heads(2);
    for ctx in contexts() {
        for opts in [Options::causal(), Options::causal().selective(3)] {
            let x = random_inputs(&shape, Switches::ALL, 600);
            let g = Gpu::upload(ctx, &shape, &x, DType::F32);
            let o = ctx.empty(&shape.q_dims(), DType::F32).unwrap();
            ctx.poison(&o).unwrap();
            ctx.attention(&g.inputs(), &opts, &Outputs::new(&o))
                .unwrap();
            let got = ctx.download(&o).unwrap();
            let r = run_ref(&shape, &x, &opts);
            let c = compare(&got, &r.o, TOL, TOL);
            eprintln!("[{}] O only {}: {c:?}", ctx.describe(), opts_name(&opts));
            assert!(
                c.bad == 0 && c.rel_norm < TOL,
                "[{}] O only {}: {c:?}",
                ctx.describe(),
                opts_name(&opts)
            );
        }
    }
}

/// The same call three times gives the same bits (no races, no state left in the scratch).
#[test]
fn repeat_runs_bit_identical() {
    let cases = [
        (Shape::new(2, 4, 45, 32).with_kv_heads(2), Options::new()),
        (
            Shape::new(2, 4, 45, 32).with_kv_heads(1),
            Options::causal().selective(2),
        ),
    ];
    for ctx in contexts() {
        for (n, (shape, opts)) in cases.iter().enumerate() {
            let mut x = random_inputs(shape, Switches::ALL, 700 + n as u64);
            if opts.selective.is_some() {
                x.f0 = Some(Rng::new(7).range(0.0, 2.0, (shape.batch * shape.k_len) as usize));
            }
            let first = run_gpu(ctx, shape, &x, opts, DType::F32);
            for _ in 0..2 {
                let again = run_gpu(ctx, shape, &x, opts, DType::F32);
                let name = format!("[{}] repeat {}", ctx.describe(), opts_name(opts));
                assert_eq!(bits(&first.o), bits(&again.o), "{name} O");
                assert_eq!(bits(&first.lse), bits(&again.lse), "{name} LSE");
                assert_eq!(bits(&first.f_out), bits(&again.f_out), "{name} F_out");
            }
        }
    }
}

/// For every context of `contexts()`, one on the same adapter with naga's bounds checks on.
fn checked_contexts() -> &'static [Context] {
    static CHECKED: OnceLock<Vec<Context>> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let mut v = vec![];
        for ctx in contexts() {
            let found = selattn::adapters().into_iter().find(|(a, why)| {
                let i = a.get_info();
                why.is_none() && i == ctx.capabilities().info
            });
            let (a, _) = found.expect("adapter of a context disappeared");
            let c = Context::from_adapter(&a).unwrap().with_bounds_checks(true);
            v.push(c);
        }
        v
    })
}

/// The production shaders (no runtime bounds checks) and the same shaders with checks on give
/// identical bits, over cases that switch every kernel flag on at least once (causal, tau, alpha,
/// gate, kv_len, selective, F0, F_out, LSE; head dims 32 and 256; Nq = 1; explicit start). A
/// difference would mean an access the checks clamp, i.e. an out-of-bounds access in production.
#[test]
fn bounds_checks_on_and_off_bit_identical() {
    let all = Switches::ALL;
    let none = Switches::NONE;
    let cases = [
        (
            Shape::new(2, 4, 37, 32).with_kv_heads(2).with_q_len(20),
            Options::new(),
            none,
        ),
        (
            Shape::new(2, 4, 41, 32).with_kv_heads(1).with_q_len(13),
            Options::causal().selective(3).start(20),
            all,
        ),
        (
            Shape::new(1, 2, 23, 256).with_q_len(1),
            Options::causal().selective(1),
            none,
        ),
    ];
    let checked = checked_contexts();
    for (plain, checked) in contexts().iter().zip(checked) {
        assert!(!plain.bounds_checks() && checked.bounds_checks());
        for (n, (shape, opts, c)) in cases.iter().enumerate() {
            let mut x = random_inputs(shape, *c, 800 + n as u64);
            if opts.selective.is_some() && c.tau {
                // F0 on as well (the scan's HAS_F0 flag).
                x.f0 = Some(Rng::new(8).range(0.0, 2.0, (shape.batch * shape.k_len) as usize));
            }
            let a = run_gpu(plain, shape, &x, opts, DType::F32);
            let b = run_gpu(checked, shape, &x, opts, DType::F32);
            let name = format!(
                "[{}] {:?} {} {}",
                plain.describe(),
                shape,
                opts_name(opts),
                inputs_name(c)
            );
            let same = bits(&a.o) == bits(&b.o)
                && bits(&a.lse) == bits(&b.lse)
                && bits(&a.f_out) == bits(&b.f_out);
            eprintln!("{name}: checked == unchecked bit for bit: {same}");
            for (what, x, y) in [
                ("O", &a.o, &b.o),
                ("LSE", &a.lse, &b.lse),
                ("F_out", &a.f_out, &b.f_out),
            ] {
                assert!(
                    same_up_to_contraction(plain, x, y),
                    "{name} {what}: checked and unchecked builds differ"
                );
            }
            let r = run_ref(shape, &x, opts);
            if let Some(f) = check_case("checked", checked, &b, &r, TOL) {
                panic!("{f}");
            }
        }
    }
}

/// Every head dim class of the tile chooser: tiny (8), padded output columns (40, 88, 248),
/// the register-heavy large dims (128, 256), with every option and selective masking.
#[test]
fn head_dims() {
    let mut cases = vec![];
    for d in [8, 40, 88, 128, 248, 256] {
        let s = Shape::new(1, 2, 19, d).with_kv_heads(1);
        cases.push((s, Options::causal(), Switches::ALL));
        cases.push((s, Options::causal().selective(1), Switches::ALL));
    }
    cases.push((Shape::new(1, 1, 1, 8), Options::new(), Switches::NONE));
    sweep(&cases, 100);
}
