//! f16 storage (SHADER_F16) on every adapter that has it, on every kernel path it offers:
//! the scalar kernel everywhere, the cooperative-matrix kernel where the adapter reports it.
//! Tolerances (DESIGN.md §4): norm-wise relative error under 5e-3 and no worse than twice the
//! error of the exact result rounded to f16.

mod common;
use common::*;
use selattn::reference::HostInputs;
use selattn::{DType, Options, Path, Shape};

fn round_f16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
}

/// Inputs as the GPU sees them: Q, K, V rounded to f16 (tau, alpha, gate, F0 stay f32).
fn as_stored(mut x: HostInputs) -> HostInputs {
    x.q = round_f16(&x.q);
    x.k = round_f16(&x.k);
    x.v = round_f16(&x.v);
    x
}

fn cases() -> Vec<(Shape, Options, Switches)> {
    let all = Switches::ALL;
    let plain = Switches::NONE;
    vec![
        (Shape::new(1, 2, 77, 64), Options::new(), plain),
        (Shape::new(1, 2, 77, 64), Options::causal(), all),
        (
            Shape::new(2, 4, 50, 128).with_kv_heads(1),
            Options::causal(),
            all,
        ),
        (
            Shape::new(1, 4, 70, 64).with_kv_heads(2),
            Options::causal().selective(3),
            all,
        ),
        (
            Shape::new(1, 2, 130, 32),
            Options::causal().selective(0),
            plain,
        ),
        (
            Shape::new(1, 2, 40, 16).with_q_len(1),
            Options::causal(),
            all,
        ),
        (
            Shape::new(1, 2, 90, 64).with_q_len(20),
            Options::causal().selective(1).start(60),
            all,
        ),
        (Shape::new(1, 1, 33, 128), Options::new(), all),
        // More key tiles than one column-sum workgroup walks (4 x 64 on the coop path), the
        // last group partial, with a partial query chunk ending mid-sequence.
        (
            Shape::new(1, 2, 600, 64).with_kv_heads(1).with_q_len(330),
            Options::causal().selective(1),
            all,
        ),
    ]
}

#[test]
fn f16_storage_matches_reference_on_every_path() {
    let mut failures = vec![];
    let mut ran = 0;
    for ctx in contexts() {
        let caps = ctx.capabilities();
        if !caps.f16 {
            eprintln!(
                "[{}] no SHADER_F16: f16 storage not offered",
                ctx.describe()
            );
            continue;
        }
        for (n, (shape, opts, c)) in cases().into_iter().enumerate() {
            let x = as_stored(random_inputs(&shape, c, 100 + n as u64));
            let r = run_ref(&shape, &x, &opts);
            let floor = compare(
                &round_f16(&r.o.iter().map(|&v| v as f32).collect::<Vec<_>>()),
                &r.o,
                0.0,
                0.0,
            );
            for path in [Path::Scalar, Path::Coop] {
                let opts = opts.path(path);
                let g = Gpu::upload(ctx, &shape, &x, DType::F16);
                let o = ctx.empty(&shape.q_dims(), DType::F16).unwrap();
                let lse = ctx.empty(&shape.row_dims(), DType::F32).unwrap();
                let f_out = ctx.empty(&shape.f_dims(), DType::F32).unwrap();
                ctx.poison(&o).unwrap();
                ctx.poison(&lse).unwrap();
                ctx.poison(&f_out).unwrap();
                let mut outs = selattn::Outputs::new(&o).lse(&lse);
                if opts.selective.is_some() {
                    outs = outs.f_out(&f_out);
                }
                match ctx.attention(&g.inputs(), &opts, &outs) {
                    Ok(()) => {}
                    Err(selattn::Error::PathUnavailable { why, .. }) if path == Path::Coop => {
                        if n == 0 {
                            eprintln!("[{}] coop path not offered: {why}", ctx.describe());
                        }
                        continue;
                    }
                    Err(e) => panic!("[{}] {path:?} {shape:?}: {e}", ctx.describe()),
                }
                ran += 1;
                let go = ctx.download(&o).unwrap();
                let gl = ctx.download(&lse).unwrap();
                let co = compare(&go, &r.o, 2e-2, 2e-2);
                let cl = compare(&gl, &r.lse, 2e-2, 2e-2);
                let name = format!(
                    "[{}] {path:?} {shape:?} {opts:?} {}",
                    ctx.describe(),
                    inputs_name(&c)
                );
                eprintln!(
                    "{name}: O rel {:.2e} (f16 rounding floor {:.2e}), max {:.2e}; LSE rel {:.2e}",
                    co.rel_norm, floor.rel_norm, co.max_abs, cl.rel_norm
                );
                let limit = (2.0 * floor.rel_norm).clamp(1e-4, 5e-3);
                if co.nan > 0
                    || co.rel_norm > limit
                    || co.bad > 0
                    || cl.bad > 0
                    || cl.rel_norm > 1e-3
                {
                    failures.push(format!("{name}: O {co:?} limit {limit:.2e}; LSE {cl:?}"));
                }
                if opts.selective.is_some() {
                    let cf = compare(&ctx.download(&f_out).unwrap(), &r.f_out, 1e-3, 1e-3);
                    if cf.bad > 0 || cf.rel_norm > 1e-3 {
                        failures.push(format!("{name}: F_out {cf:?}"));
                    }
                }
            }
        }
    }
    eprintln!("{ran} f16 runs");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The cooperative-matrix kernels (forward and the selective column sums) built without naga's
/// bounds checks give the same results as with them, over cases with partial query and key
/// tiles, GQA, Nq < Nk, every control, selective masking with F0 and F_out, and head dims 16,
/// 64 and 128. Runs where the adapter offers the path (none of the software adapters does).
#[test]
fn coop_bounds_checks_on_and_off_agree() {
    let all = Switches::ALL;
    let cases = [
        (Shape::new(1, 2, 77, 64), Options::causal(), all),
        (
            Shape::new(2, 4, 150, 128).with_kv_heads(1).with_q_len(70),
            Options::causal().selective(3),
            all,
        ),
        (
            Shape::new(1, 4, 200, 64).with_kv_heads(2),
            Options::causal().selective(0),
            Switches::NONE,
        ),
        (Shape::new(1, 2, 45, 16).with_q_len(1), Options::new(), all),
        // Several column-sum key groups, the last partial.
        (
            Shape::new(1, 2, 600, 64).with_q_len(330),
            Options::causal().selective(1),
            all,
        ),
    ];
    let mut ran = 0;
    for ctx in contexts() {
        let caps = ctx.capabilities();
        if !(caps.f16 && caps.coop_16x16_f16() && caps.subgroup_min_size == caps.subgroup_max_size)
        {
            eprintln!("[{}] no cooperative-matrix path: skipped", ctx.describe());
            continue;
        }
        let found = selattn::adapters()
            .into_iter()
            .find(|(a, why)| why.is_none() && a.get_info() == ctx.capabilities().info);
        let (a, _) = found.expect("adapter of a context disappeared");
        let checked = selattn::Context::from_adapter(&a)
            .unwrap()
            .with_bounds_checks(true);
        for (n, (shape, opts, c)) in cases.iter().enumerate() {
            let mut x = as_stored(random_inputs(shape, *c, 900 + n as u64));
            if opts.selective.is_some() && c.tau {
                x.f0 = Some(Rng::new(9).range(0.0, 2.0, (shape.batch * shape.k_len) as usize));
            }
            let opts = opts.path(Path::Coop);
            let u = run_gpu(ctx, shape, &x, &opts, DType::F16);
            let k = run_gpu(&checked, shape, &x, &opts, DType::F16);
            let name = format!("[{}] {shape:?} {opts:?} {}", ctx.describe(), inputs_name(c));
            for (what, p, q) in [
                ("O", &u.o, &k.o),
                ("LSE", &u.lse, &k.lse),
                ("F_out", &u.f_out, &k.f_out),
            ] {
                assert!(
                    same_up_to_contraction(ctx, p, q),
                    "{name} {what}: checked and unchecked builds differ"
                );
            }
            let r = run_ref(shape, &x, &opts);
            let co = compare(&u.o, &r.o, 2e-2, 2e-2);
            assert!(co.nan == 0 && co.bad == 0, "{name}: O {co:?}");
            eprintln!("{name}: checked == unchecked, O rel {:.2e}", co.rel_norm);
            ran += 1;
        }
    }
    eprintln!("{ran} coop checked/unchecked pairs");
}
