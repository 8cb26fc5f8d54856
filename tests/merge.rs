//! Exact merging of partial results over disjoint key ranges: shards merged = one call, with every
//! option, on every adapter; the f64 reference merge against the f64 reference itself.

mod common;
use common::*;
use selattn::reference::{attention, attention_keys, HostInputs, HostOutputs};
use selattn::{
    merge_partials, merge_partials_reference, DType, Error, Options, Outputs, Partial, Shape, Spec,
    Switches,
};

fn spec(shape: Shape, opts: Options, x: &HostInputs) -> Spec {
    Spec {
        shape,
        options: opts,
        present: x.present(opts.selective.is_some()),
    }
}

/// Key partitions of `nk` keys: two shards, three shards, and one with an empty shard.
fn partitions(nk: usize) -> Vec<Vec<std::ops::Range<usize>>> {
    vec![
        vec![0..7, 7..nk],
        vec![0..1, 1..12, 12..nk],
        vec![0..nk - 2, nk - 2..nk, nk..nk],
    ]
}

/// Every option the operator has: plain, causal, causal with selective masking and carried F0,
/// each without and with temperature, positional temperature, gate and kv_len; GQA.
fn cases() -> Vec<(String, Shape, Options, HostInputs)> {
    let shape = Shape::new(2, 4, 23, 16).with_kv_heads(2).with_q_len(5);
    let mut v = vec![];
    let mut seed = 1;
    for opts in [
        Options::new(),
        Options::new().start(9),
        Options::causal(),
        Options::causal().selective(1),
        Options::causal().selective(3).start(11),
    ] {
        for c in [Switches::NONE, Switches::ALL] {
            let mut x = random_inputs(&shape, c, seed);
            if opts.selective.is_some() && c.tau {
                let mut rng = Rng::new(seed + 1000);
                x.f0 = Some(rng.range(0.0, 2.0, 2 * 23));
            }
            seed += 1;
            let name = format!(
                "{} {} f0 {}",
                opts_name(&opts),
                if c.tau { "all inputs" } else { "no inputs" },
                x.f0.is_some()
            );
            v.push((name, shape, opts, x));
        }
    }
    v
}

fn shards(s: &Spec, x: &HostInputs, part: &[std::ops::Range<usize>]) -> Vec<HostOutputs> {
    part.iter()
        .map(|r| attention_keys(s, x, r.clone()).unwrap())
        .collect()
}

#[test]
fn reference_shards_merged_equal_one_reference_call() {
    let mut failures = vec![];
    for (name, shape, opts, x) in cases() {
        let s = spec(shape, opts, &x);
        let full = attention(&s, &x).unwrap();
        let mut split_something = false;
        for part in partitions(shape.k_len as usize) {
            let outs = shards(&s, &x, &part);
            // The shards really split the work: some row of some shard differs from the whole.
            split_something |= outs
                .iter()
                .any(|o| o.lse.iter().zip(&full.lse).any(|(a, b)| a != b));
            let parts: Vec<(&[f64], &[f64])> = outs
                .iter()
                .map(|o| (o.o.as_slice(), o.lse.as_slice()))
                .collect();
            let (o, lse) = merge_partials_reference(&parts, shape.head_dim as usize);
            let eo = o
                .iter()
                .zip(&full.o)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            let el = lse
                .iter()
                .zip(&full.lse)
                .map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() })
                .fold(0.0, f64::max);
            if !(eo < 1e-12 && el < 1e-12) {
                failures.push(format!("{name} {part:?}: O err {eo:.2e}, LSE err {el:.2e}"));
            }
        }
        if !split_something {
            failures.push(format!("{name}: no shard differs from the whole"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn gpu_merge_of_shards_equals_one_call() {
    let mut failures = vec![];
    for ctx in contexts() {
        for elem in [DType::F32, DType::F16] {
            if elem == DType::F16 && !ctx.capabilities().f16 {
                eprintln!("[{}] no SHADER_F16: skipping f16", ctx.describe());
                continue;
            }
            for (name, shape, opts, x) in cases() {
                let s = spec(shape, opts, &x);
                let full = attention(&s, &x).unwrap();
                for part in partitions(shape.k_len as usize) {
                    let outs = shards(&s, &x, &part);
                    let up = |o: &HostOutputs| {
                        let of: Vec<f32> = o.o.iter().map(|&v| v as f32).collect();
                        let lf: Vec<f32> = o.lse.iter().map(|&v| v as f32).collect();
                        let ot = match elem {
                            DType::F16 => ctx.upload_f16(&shape.q_dims(), &of).unwrap(),
                            _ => ctx.upload(&shape.q_dims(), &of).unwrap(),
                        };
                        (ot, ctx.upload(&shape.row_dims(), &lf).unwrap())
                    };
                    let tensors: Vec<_> = outs.iter().map(up).collect();
                    let parts: Vec<Partial> =
                        tensors.iter().map(|(o, lse)| Partial { o, lse }).collect();
                    let o = ctx.empty(&shape.q_dims(), elem).unwrap();
                    let lse = ctx.empty(&shape.row_dims(), DType::F32).unwrap();
                    ctx.poison(&o).unwrap();
                    ctx.poison(&lse).unwrap();
                    merge_partials(ctx, &parts, &Outputs::new(&o).lse(&lse)).unwrap();
                    let go = ctx.download(&o).unwrap();
                    let gl = ctx.download(&lse).unwrap();
                    let tol = if elem == DType::F16 { 2e-3 } else { 1e-5 };
                    let co = compare(&go, &full.o, tol, tol);
                    let cl = compare(&gl, &full.lse, 1e-5, 1e-5);
                    if co.bad > 0 || cl.bad > 0 {
                        failures.push(format!(
                            "[{}] {elem:?} {name} {part:?}: O {co:?} LSE {cl:?}",
                            ctx.describe()
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// End to end on the GPU: attention over key shards (separate K, V, gate and kv_len tensors per
/// shard, the queries at their absolute positions), merged on the GPU, equals the reference of
/// one call over all keys. Non-causal: a causal shard would need its keys' absolute positions.
#[test]
fn gpu_attention_shards_merged_equal_reference() {
    let shape = Shape::new(2, 4, 40, 32).with_kv_heads(2).with_q_len(3);
    let (b, hkv, nk, d) = (2usize, 2usize, 40usize, 32usize);
    let mut failures = vec![];
    for ctx in contexts() {
        for c in [Switches::NONE, Switches::ALL] {
            let x = random_inputs(&shape, c, 77);
            let opts = Options::new().start(37);
            let full = attention(&spec(shape, opts, &x), &x).unwrap();
            let mut held = vec![];
            for r in [0..13usize, 13..nk] {
                let n = r.len();
                let sub = |t: &[f32], per: usize| -> Vec<f32> {
                    (0..b * hkv)
                        .flat_map(|bh| t[(bh * nk + r.start) * per..][..n * per].to_vec())
                        .collect()
                };
                let sx = HostInputs {
                    q: x.q.clone(),
                    k: sub(&x.k, d),
                    v: sub(&x.v, d),
                    tau: x.tau.clone(),
                    alpha: x.alpha.clone(),
                    gate: x.gate.as_ref().map(|g| sub(g, 1)),
                    kv_len: x.kv_len.as_ref().map(|l| {
                        l.iter()
                            .map(|&v| (v as usize).saturating_sub(r.start).min(n) as u32)
                            .collect()
                    }),
                    f0: None,
                };
                let sshape = Shape::new(2, 4, n as u32, 32)
                    .with_kv_heads(2)
                    .with_q_len(3);
                let g = Gpu::upload(ctx, &sshape, &sx, DType::F32);
                let o = ctx.empty(&sshape.q_dims(), DType::F32).unwrap();
                let lse = ctx.empty(&sshape.row_dims(), DType::F32).unwrap();
                ctx.poison(&o).unwrap();
                ctx.poison(&lse).unwrap();
                ctx.attention(&g.inputs(), &opts, &Outputs::new(&o).lse(&lse))
                    .unwrap();
                held.push((o, lse));
            }
            let parts: Vec<Partial> = held.iter().map(|(o, lse)| Partial { o, lse }).collect();
            let o = ctx.empty(&shape.q_dims(), DType::F32).unwrap();
            let lse = ctx.empty(&shape.row_dims(), DType::F32).unwrap();
            ctx.poison(&o).unwrap();
            ctx.poison(&lse).unwrap();
            merge_partials(ctx, &parts, &Outputs::new(&o).lse(&lse)).unwrap();
            let co = compare(&ctx.download(&o).unwrap(), &full.o, 2e-5, 2e-5);
            let cl = compare(&ctx.download(&lse).unwrap(), &full.lse, 2e-5, 2e-5);
            if co.bad > 0 || cl.bad > 0 {
                failures.push(format!(
                    "[{}] {}: O {co:?} LSE {cl:?}",
                    ctx.describe(),
                    if c.tau { "all inputs" } else { "no inputs" }
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn one_partial_is_copied_and_bad_input_gets_typed_errors() {
    for ctx in contexts() {
        let mut rng = Rng::new(5);
        let ov = rng.normals(2 * 3 * 8);
        let mut lv = rng.range(-2.0, 2.0, 6);
        lv[4] = f32::NEG_INFINITY;
        let o1 = ctx.upload(&[2, 3, 8], &ov).unwrap();
        let l1 = ctx.upload(&[2, 3], &lv).unwrap();
        let o = ctx.empty(&[2, 3, 8], DType::F32).unwrap();
        let lse = ctx.empty(&[2, 3], DType::F32).unwrap();
        ctx.poison(&o).unwrap();
        ctx.poison(&lse).unwrap();
        let one = [Partial { o: &o1, lse: &l1 }];
        merge_partials(ctx, &one, &Outputs::new(&o).lse(&lse)).unwrap();
        let go = ctx.download(&o).unwrap();
        let gl = ctx.download(&lse).unwrap();
        // Row 4 is empty: O = 0 there, LSE -inf; every other value copied exactly.
        for (i, (&g, &w)) in go.iter().zip(&ov).enumerate() {
            let want = if i / 8 == 4 { 0.0 } else { w };
            assert_eq!(g.to_bits(), want.to_bits(), "[{}] O[{i}]", ctx.describe());
        }
        for (i, (&g, &w)) in gl.iter().zip(&lv).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "[{}] LSE[{i}]", ctx.describe());
        }

        let outs = Outputs::new(&o).lse(&lse);
        assert!(matches!(
            merge_partials(ctx, &[], &outs),
            Err(Error::ZeroSize { .. })
        ));
        let short = ctx.empty(&[2, 2], DType::F32).unwrap();
        assert!(matches!(
            merge_partials(
                ctx,
                &[Partial {
                    o: &o1,
                    lse: &short
                }],
                &outs
            ),
            Err(Error::ShapeMismatch { .. })
        ));
        let o16 = ctx.empty(&[2, 3, 8], DType::U32).unwrap();
        assert!(matches!(
            merge_partials(ctx, &one, &Outputs::new(&o16)),
            Err(Error::DTypeMismatch { .. })
        ));
        assert!(matches!(
            merge_partials(ctx, &one, &Outputs::new(&o1).lse(&lse)),
            Err(Error::BadBuffer { .. })
        ));
        assert!(matches!(
            merge_partials(ctx, &one, &Outputs::new(&o).lse(&l1)),
            Err(Error::BadBuffer { .. })
        ));
        let f = ctx.empty(&[2, 3], DType::F32).unwrap();
        assert!(matches!(
            merge_partials(ctx, &one, &Outputs::new(&o).f_out(&f)),
            Err(Error::InputWithoutUse { .. })
        ));
        let odd = ctx.empty(&[2, 3, 6], DType::F32).unwrap();
        let odd_in = ctx.empty(&[2, 3, 6], DType::F32).unwrap();
        assert!(matches!(
            merge_partials(
                ctx,
                &[Partial {
                    o: &odd_in,
                    lse: &l1
                }],
                &Outputs::new(&odd)
            ),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
