//! Selective masking on every adapter: shapes × options × selection head against the reference,
//! chunked prefill threading F (chunks of random sizes give the whole run's O, LSE and F), and the
//! scratch memory bound B·ceil(Nq/Br)·Nk·4.

mod common;
use common::chunks::{chunk_inputs, put_rows};
use common::*;
use selattn::reference::HostOutputs;
use selattn::{DType, Options, Plan, Shape, Spec, Switches};

const TOL: f64 = 2e-5;

fn with_f0(mut c: Case, seed: u64) -> Case {
    let n = (c.shape.batch * c.shape.k_len) as usize;
    c.x.f0 = Some(Rng::new(seed).range(0.0, 3.0, n));
    c.name += " +F0";
    c
}

#[test]
fn selective_matrix() {
    let all = Switches::ALL;
    let none = Switches::NONE;
    let some = Switches {
        tau: true,
        alpha: true,
        gate: true,
        kv_len: false,
        ..Switches::NONE
    };
    let sel = |h| Options::causal().selective(h);
    let gqa = Shape::new(2, 4, 33, 32).with_kv_heads(2);
    let mut cases = vec![
        Case::random("head 0", gqa, sel(0), none, 1),
        Case::random("head 3 of GQA", gqa, sel(3), all, 2),
        with_f0(Case::random("head 2 of GQA", gqa, sel(2), some, 3), 30),
        with_f0(
            Case::random(
                "GQA 4:1 head 5",
                Shape::new(1, 8, 45, 32).with_kv_heads(2),
                sel(5),
                all,
                4,
            ),
            40,
        ),
        Case::random(
            "group of 3, head 4",
            Shape::new(2, 6, 29, 32).with_kv_heads(2),
            sel(4),
            all,
            13,
        ),
        Case::random(
            "MQA head 1",
            Shape::new(2, 4, 65, 32).with_kv_heads(1),
            sel(1),
            all,
            5,
        ),
        // decode: one query at the last position, state carried in
        with_f0(
            Case::random(
                "Nq=1",
                Shape::new(2, 4, 50, 32).with_kv_heads(2).with_q_len(1),
                sel(3),
                all,
                6,
            ),
            60,
        ),
        // only the first token: S is all zero, F_out = F0
        with_f0(
            Case::random("first token", Shape::new(2, 2, 1, 32), sel(1), all, 7),
            70,
        ),
        Case::random(
            "first position, more keys",
            Shape::new(1, 2, 9, 32).with_q_len(1),
            sel(0).start(0),
            none,
            8,
        ),
        // no tile multiple, Nq < Nk with a start in the middle
        Case::random("N=100", Shape::new(1, 2, 100, 32), sel(1), none, 9),
        with_f0(
            Case::random(
                "chunk in the middle",
                Shape::new(2, 4, 60, 32).with_kv_heads(2).with_q_len(10),
                sel(1).start(23),
                all,
                10,
            ),
            100,
        ),
        Case::random(
            "custom scale",
            Shape::new(1, 2, 37, 32),
            sel(1).scale(0.3),
            all,
            11,
        ),
    ];
    // kv_len padding: batch 0 ends well before Nk, batch 1 after 3 keys, with F0.
    let mut pad = Case::random("kv_len padding [28, 3]", gqa, sel(3), all, 12);
    pad.x.kv_len = Some(vec![28, 3]);
    cases.push(with_f0(pad, 120));
    check_cases(&cases, TOL);
}

/// Seeded random chunk boundaries of `n` rows: sizes from 1 to about n/3.
fn chunks(n: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = Rng::new(seed);
    let mut v = vec![];
    let mut s = 0;
    while s < n {
        let len = 1 + rng.below((n / 3).max(1) as u32) as usize;
        let e = (s + len).min(n);
        v.push((s, e));
        s = e;
    }
    v
}

fn report(what: &str, c: Cmp) -> Option<String> {
    eprintln!("  {what}: {c:?}");
    (c.bad > 0 || c.rel_norm > TOL).then(|| format!("{what}: {c:?}"))
}

/// Chunked prefill: a sequence run in chunks of random sizes, threading F (and every other
/// option: tau, alpha, gate, kv_len, GQA, selection head != 0, an initial F0), gives the same O,
/// LSE and final F as running it whole, on the GPU and in the reference.
#[test]
fn chunked_prefill_matches_whole() {
    let shape = Shape::new(2, 4, 70, 32).with_kv_heads(2);
    let (b, hq, n, d) = (2usize, 4usize, 70usize, 32usize);
    let opts = Options::causal().selective(3);
    let mut failures = vec![];
    for seed in 0..3u64 {
        let mut x = random_inputs(&shape, Switches::ALL, 1000 + seed);
        x.f0 = Some(Rng::new(2000 + seed).range(0.0, 2.0, b * n));
        if seed == 2 {
            x.kv_len = Some(vec![70, 41]);
        }
        let plan = chunks(n, 3000 + seed);
        let whole_ref = run_ref(&shape, &x, &opts);

        // The reference itself keeps the invariant.
        let mut o = vec![0.0f64; b * hq * n * d];
        let mut lse = vec![0.0f64; b * hq * n];
        let mut f: Option<(Vec<f32>, usize)> = None;
        let mut f_last = vec![];
        for &(s, e) in &plan {
            let (cs, cx) = chunk_inputs(&shape, &x, s, e, f.as_ref().map(|(v, pe)| (&v[..], *pe)));
            let r: HostOutputs = run_ref(&cs, &cx, &opts.start(s as u32));
            put_rows(&mut o, &r.o, b * hq, n, d, s);
            put_rows(&mut lse, &r.lse, b * hq, n, 1, s);
            // Thread F in f32, as it is stored on the GPU.
            f = Some((r.f_out.iter().map(|&v| v as f32).collect(), e));
            f_last = r.f_out;
        }
        let as32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        eprintln!("reference, chunks {plan:?}");
        let name = format!("reference chunked seed {seed}");
        for (what, got, want) in [
            ("O", as32(&o), &whole_ref.o),
            ("LSE", as32(&lse), &whole_ref.lse),
            ("F_out", as32(&f_last), &whole_ref.f_out),
        ] {
            if let Some(m) = report(what, compare(&got, want, TOL, TOL)) {
                failures.push(format!("{name} {m}"));
            }
        }

        for ctx in contexts() {
            let whole = run_gpu(ctx, &shape, &x, &opts, DType::F32);
            let mut o = vec![f32::NAN; b * hq * n * d];
            let mut lse = vec![f32::NAN; b * hq * n];
            let mut f: Option<(Vec<f32>, usize)> = None;
            for &(s, e) in &plan {
                let (cs, cx) =
                    chunk_inputs(&shape, &x, s, e, f.as_ref().map(|(v, pe)| (&v[..], *pe)));
                let g = run_gpu(ctx, &cs, &cx, &opts.start(s as u32), DType::F32);
                put_rows(&mut o, &g.o, b * hq, n, d, s);
                put_rows(&mut lse, &g.lse, b * hq, n, 1, s);
                f = Some((g.f_out, e));
            }
            let f_last = f.map(|(v, _)| v).unwrap_or_default();
            let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            let name = format!("[{}] GPU chunked seed {seed}", ctx.describe());
            eprintln!("{name}, {} chunks", plan.len());
            for (what, got, want) in [
                ("O vs reference", &o, &whole_ref.o),
                ("LSE vs reference", &lse, &whole_ref.lse),
                ("F_out vs reference", &f_last, &whole_ref.f_out),
                ("O vs whole GPU run", &o, &to64(&whole.o)),
                ("LSE vs whole GPU run", &lse, &to64(&whole.lse)),
                ("F_out vs whole GPU run", &f_last, &to64(&whole.f_out)),
            ] {
                if let Some(m) = report(what, compare(got, want, TOL, TOL)) {
                    failures.push(format!("{name} {m}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Scratch memory is B·ceil(Nq/Br)·Nk·4 bytes with selective masking and nothing without, asked
/// before running; at large N it is far below the B·Nq·Nk·4 of an N×N matrix. Big shapes go
/// through `Plan::new`, which allocates nothing.
/// The selective scan in row parts is the default where 256 threads fit; the old scan (one
/// thread per column) stays the fallback (`SELATTN_COOP_ABLATE=pscan`): the reference tests run
/// again with it, in a child process.
#[test]
fn one_thread_scan_matches_reference() {
    rerun_with_env(
        &["selective_matrix", "chunked_prefill_matches_whole"],
        &[("SELATTN_COOP_ABLATE", "pscan")],
    );
}

#[test]
fn scratch_bytes_bound() {
    for ctx in contexts() {
        // Real tensors: Context::scratch_bytes.
        let shape = Shape::new(2, 4, 45, 32).with_kv_heads(2).with_q_len(30);
        let x = random_inputs(&shape, Switches::ALL, 1);
        let g = Gpu::upload(ctx, &shape, &x, DType::F32);
        let o = ctx.empty(&shape.q_dims(), DType::F32).unwrap();
        let f_out = ctx.empty(&shape.f_dims(), DType::F32).unwrap();
        let outs = selattn::Outputs::new(&o).f_out(&f_out);
        let sel = Options::causal().selective(1);
        let plan = ctx.plan(&g.inputs(), &sel, &outs).unwrap();
        let br = plan.sel_block_rows() as u64;
        let want = 2 * 30u64.div_ceil(br) * 45 * 4;
        let got = ctx.scratch_bytes(&g.inputs(), &sel, &outs).unwrap();
        assert_eq!(got, want, "[{}] Br {br}", ctx.describe());
        let plain = ctx
            .scratch_bytes(&g.inputs(), &Options::causal(), &selattn::Outputs::new(&o))
            .unwrap();
        assert_eq!(plain, 0);

        // Big shapes, planned only. Capabilities with unlimited buffers, so the formula is checked
        // even where this device could not hold the scratch.
        let mut caps = ctx.capabilities().clone();
        caps.max_storage_binding = u64::MAX;
        caps.max_buffer = u64::MAX;
        for (bn, n) in [(1u32, 4096u32), (2, 16384), (4, 65536)] {
            let r = Spec {
                shape: Shape::new(bn, 8, n, 64),
                options: Options::causal().selective(0),
                present: Switches {
                    lse: true,
                    f_out: true,
                    ..Switches::default()
                },
            }
            .validate()
            .unwrap();
            let plan = Plan::new(&caps, &r, DType::F32).unwrap();
            let br = plan.sel_block_rows() as u64;
            let (bn, n) = (bn as u64, n as u64);
            let bound = bn * n.div_ceil(br) * n * 4;
            let full = bn * n * n * 4;
            eprintln!(
                "[{}] B{bn} N{n} D64: Br {br}, scratch {} MiB, N×N would be {} MiB",
                ctx.describe(),
                plan.scratch_bytes() >> 20,
                full >> 20
            );
            assert_eq!(plan.scratch_bytes(), bound);
            // Br >= 8 at D = 64 on any device with WebGPU's minimum 16 KiB of workgroup memory.
            assert!(plan.scratch_bytes() * 8 <= full, "Br {br}");
            // On the device itself: the plan either fits, or is refused with the numbers.
            match Plan::new(ctx.capabilities(), &r, DType::F32) {
                Ok(p) => assert_eq!(p.scratch_bytes(), bound),
                Err(e) => assert!(
                    matches!(e, selattn::Error::TooLarge { what: "selective scratch", bytes, .. } if bytes == bound),
                    "{e:?}"
                ),
            }
        }
    }
}

/// `encode_attention_profiled` where the device has TIMESTAMP_QUERY_INSIDE_PASSES: one label per
/// dispatch (the column sums, the scan, the attention kernel), the same O and F_out bit for bit
/// as `attention`; a query set too small is a typed error that writes nothing (O keeps its
/// poison). Without the feature: FeatureMissing.
#[test]
fn profiled_forward_matches_and_labels() {
    use selattn::Outputs;
    let shape = Shape::new(1, 4, 70, 32).with_kv_heads(2);
    let opts = Options::causal().selective(1);
    let c = Case::random("profiled", shape, opts, Switches::ALL, 21);
    for ctx in contexts() {
        let plain = run_gpu(ctx, &shape, &c.x, &opts, DType::F32);
        let g = Gpu::upload(ctx, &shape, &c.x, DType::F32);
        let o = ctx.empty(&shape.q_dims(), DType::F32).unwrap();
        let f_out = ctx.empty(&shape.f_dims(), DType::F32).unwrap();
        let qs = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("test profile"),
            ty: wgpu::QueryType::Timestamp,
            count: 8,
        });
        let profiled = |cap: u32| {
            ctx.poison(&o).unwrap();
            ctx.poison(&f_out).unwrap();
            let outs = Outputs::new(&o).f_out(&f_out);
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            let r = ctx.encode_attention_profiled(&mut enc, &g.inputs(), &opts, &outs, &qs, cap);
            ctx.queue.submit([enc.finish()]);
            (r, ctx.download(&o).unwrap(), ctx.download(&f_out).unwrap())
        };
        let (labels, got_o, got_f) = profiled(8);
        let Some(labels) = profile_labels(ctx, labels) else {
            continue;
        };
        assert_eq!(
            labels,
            ["sel_colsum", "sel_scan", "forward"],
            "[{}]",
            ctx.describe()
        );
        assert_eq!(bits(&got_o), bits(&plain.o), "[{}] O", ctx.describe());
        assert_eq!(
            bits(&got_f),
            bits(&plain.f_out),
            "[{}] F_out",
            ctx.describe()
        );
        let (small, got_o, _) = profiled(3);
        assert!(small.is_err(), "[{}] {small:?}", ctx.describe());
        assert!(
            got_o.iter().all(|x| x.is_nan()),
            "[{}] a refused profiled call wrote O",
            ctx.describe()
        );
    }
}
