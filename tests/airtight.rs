//! Issue 9, items 1-5 and 7: each misuse that used to panic, silently use another buffer, leave
//! state half-changed or return NaN from finite inputs, checked on every adapter.

mod common;

use common::{compare, contexts, Rng};
use selattn::reference::HostInputs;
use selattn::reference_cache::{HostQueries, HostTokens, RefCache};
use selattn::{
    Context, DType, DecodeOptions, Error, Inputs, KvCache, KvCacheConfig, Options, Outputs, Path,
    Shape, Spec, Step, Tensor, Tokens,
};

/// A second context over the same adapter as `ctx`: another wgpu instance and device.
fn twin(ctx: &Context) -> Context {
    let name = &ctx.capabilities().info.name;
    let backend = ctx.capabilities().info.backend;
    let (a, _) = selattn::adapters()
        .into_iter()
        .find(|(a, why)| {
            let i = a.get_info();
            why.is_none() && &i.name == name && i.backend == backend
        })
        .expect("the adapter is seen again");
    Context::from_adapter(&a).unwrap()
}

fn foreign(e: &Error, which: &str) -> bool {
    matches!(e, Error::ForeignTensor { tensor } if *tensor == which)
}

/// Item 1: a tensor or cache of another context is refused by every call, with the context's
/// own state untouched; contexts sharing a device through `from_device_shared` share tensors.
#[test]
fn tensors_of_another_device_are_refused() {
    for c1 in contexts() {
        let c2 = &twin(c1);
        let shape = Shape::new(1, 2, 8, 8);
        let mut rng = Rng::new(11);
        let n = shape.q_dims().iter().product::<u64>() as usize;
        let q1 = c1.upload(&shape.q_dims(), &rng.normals(n)).unwrap();
        let k1 = c1.upload(&shape.kv_dims(), &rng.normals(n)).unwrap();
        let o1 = c1.empty(&shape.q_dims(), DType::F32).unwrap();
        let q2 = c2.upload(&shape.q_dims(), &rng.normals(n)).unwrap();
        let o2 = c2.empty(&shape.q_dims(), DType::F32).unwrap();
        let opts = Options::causal();
        for (e, which) in [
            (
                c1.attention(&Inputs::new(&q2, &k1, &k1), &opts, &Outputs::new(&o1)),
                "q",
            ),
            (
                c1.attention(&Inputs::new(&q1, &k1, &k1), &opts, &Outputs::new(&o2)),
                "o",
            ),
            (
                c2.attention(&Inputs::new(&q2, &k1, &k1), &opts, &Outputs::new(&o2)),
                "k",
            ),
        ] {
            let e = e.unwrap_err();
            assert!(foreign(&e, which), "{}: {e:?}", c1.describe());
        }
        let mut enc = c1
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        let e = c1
            .encode_attention(
                &mut enc,
                &Inputs::new(&q1, &k1, &k1),
                &opts,
                &Outputs::new(&o2),
            )
            .unwrap_err();
        assert!(foreign(&e, "o"), "{e:?}");
        assert!(foreign(&c1.download(&q2).unwrap_err(), "tensor"));
        assert!(foreign(&c2.poison(&q1).unwrap_err(), "tensor"));

        // A cache used with another context, or given another context's tensors.
        let cfg = KvCacheConfig::new(1, 2, 8, 8);
        let mut cache = KvCache::new(c1, cfg).unwrap();
        let kt = c1.upload(&[1, 2, 1, 8], &rng.normals(16)).unwrap();
        let kt2 = c2.upload(&[1, 2, 1, 8], &rng.normals(16)).unwrap();
        let qs = c1.upload(&[1, 2, 1, 8], &rng.normals(16)).unwrap();
        let os = c1.empty(&[1, 2, 1, 8], DType::F32).unwrap();
        cache.append(c1, &Tokens::new(&kt, &kt), None).unwrap();
        let before = (cache.lens().to_vec(), cache.positions().to_vec());
        let e = cache
            .append(c2, &Tokens::new(&kt2, &kt2), None)
            .unwrap_err();
        assert!(foreign(&e, "cache"), "{e:?}");
        let e = cache.append(c1, &Tokens::new(&kt, &kt2), None).unwrap_err();
        assert!(foreign(&e, "v"), "{e:?}");
        let e = cache
            .step(
                c1,
                &Step::new(&qs, &kt2, &kt),
                &DecodeOptions::new(),
                &Outputs::new(&os),
            )
            .unwrap_err();
        assert!(foreign(&e, "k"), "{e:?}");
        let e = cache
            .step(
                c2,
                &Step::new(&qs, &kt, &kt),
                &DecodeOptions::new(),
                &Outputs::new(&os),
            )
            .unwrap_err();
        assert!(foreign(&e, "cache"), "{e:?}");
        assert_eq!(
            before,
            (cache.lens().to_vec(), cache.positions().to_vec()),
            "a refused call changed the cache"
        );

        // Two contexts over one device share tensors.
        let c3 = Context::from_device_shared(
            c1.device.clone(),
            c1.queue.clone(),
            c1.capabilities().info.clone(),
            c1.capabilities().cooperative_matrix.clone(),
            c1,
        )
        .unwrap();
        let o3 = c3.empty(&shape.q_dims(), DType::F32).unwrap();
        c1.attention(&Inputs::new(&q1, &k1, &k1), &opts, &Outputs::new(&o1))
            .unwrap();
        c3.attention(&Inputs::new(&q1, &k1, &k1), &opts, &Outputs::new(&o3))
            .unwrap();
        assert_eq!(c1.download(&o1).unwrap(), c3.download(&o3).unwrap());
        // ... but not with another device's.
        let e = Context::from_device_shared(
            c2.device.clone(),
            c2.queue.clone(),
            c2.capabilities().info.clone(),
            vec![],
            c1,
        );
        // wgpu may see c2's device as equal to c1's (ids of different instances collide), so
        // only a refusal or a context that still refuses c2's tensors is acceptable.
        if let Ok(c4) = e {
            assert_eq!(c4.device_token(), c1.device_token());
        }
    }
}

/// Item 2: buffers that lack a usage, are too small, or were destroyed give typed errors, not
/// panics through wgpu's default error handler; the context keeps working afterwards.
#[test]
fn wgpu_errors_come_back_as_errors() {
    for c in contexts() {
        let buf = |size: u64, usage: wgpu::BufferUsages| {
            c.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("user buffer"),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        use wgpu::BufferUsages as U;
        let t = Tensor::from_buffer(c, buf(64, U::STORAGE), &[16], DType::F32).unwrap();
        let e = c.download(&t).unwrap_err();
        assert!(matches!(e, Error::BadBuffer { .. }), "{e:?}");
        let e = c.poison(&t).unwrap_err();
        assert!(matches!(e, Error::BadBuffer { .. }), "{e:?}");
        // 3 f16 elements are bound and copied as 8 bytes: a 6-byte buffer cannot hold them.
        let e =
            Tensor::from_buffer(c, buf(6, U::STORAGE | U::COPY_SRC), &[3], DType::F16).unwrap_err();
        assert!(matches!(e, Error::BadBuffer { .. }), "{e:?}");
        let t = Tensor::from_buffer(c, buf(8, U::STORAGE | U::COPY_SRC), &[3], DType::F16).unwrap();
        assert_eq!(c.download(&t).unwrap().len(), 3);

        // Use after destroy.
        let shape = Shape::new(1, 1, 4, 8);
        let q = c.upload(&shape.q_dims(), &[0.5; 32]).unwrap();
        let k = c.upload(&shape.kv_dims(), &[0.25; 32]).unwrap();
        let o = c.empty(&shape.q_dims(), DType::F32).unwrap();
        let dead = c.upload(&shape.q_dims(), &[1.0; 32]).unwrap();
        dead.buffer().destroy();
        let is_gpu = |e: &Error| {
            matches!(
                e,
                Error::Gpu {
                    source: Some(_),
                    ..
                }
            ) && std::error::Error::source(e).is_some()
        };
        let e = c.download(&dead).unwrap_err();
        assert!(is_gpu(&e), "{}: {e:?}", c.describe());
        let e = c.poison(&dead).unwrap_err();
        assert!(is_gpu(&e), "{e:?}");
        let e = c
            .attention(
                &Inputs::new(&dead, &k, &k),
                &Options::new(),
                &Outputs::new(&o),
            )
            .unwrap_err();
        assert!(is_gpu(&e), "{e:?}");
        // Still usable.
        c.attention(&Inputs::new(&q, &k, &k), &Options::new(), &Outputs::new(&o))
            .unwrap();
        let got = c.download(&o).unwrap();
        assert!(got.iter().all(|&x| (x - 0.25).abs() < 1e-6), "{got:?}");
    }
}

/// Item 3: element and byte counts that overflow u64 are refused, never wrapped.
#[test]
fn overflowing_sizes_are_refused() {
    let c = &contexts()[0];
    let huge = [(1u64 << 63) + 1, 2];
    assert!(c.empty(&huge, DType::F32).is_err());
    assert!(c.empty(&[1 << 62, 4], DType::F16).is_err());
    assert!(c.upload(&huge, &[0.0; 2]).is_err());
    let b = c.empty(&[4], DType::F32).unwrap().buffer().clone();
    let e = Tensor::from_buffer(c, b.clone(), &huge, DType::F32).unwrap_err();
    assert!(matches!(e, Error::BadBuffer { .. }), "{e:?}");
    let e = Tensor::from_buffer(c, b, &[1 << 31, 1 << 31, 1 << 2], DType::F32).unwrap_err();
    assert!(matches!(e, Error::BadBuffer { .. }), "{e:?}");
    let cfg = KvCacheConfig::new(u32::MAX, u32::MAX, 256, u32::MAX);
    assert_eq!(cfg.bytes(), u64::MAX);
    assert!(KvCache::new(c, cfg).is_err());
}

fn host_tokens(rng: &mut Rng, b: usize, h: usize, n: usize, d: usize) -> HostTokens {
    HostTokens {
        n,
        k: rng.normals(b * h * n * d),
        v: rng.normals(b * h * n * d),
        gate: None,
        f: None,
    }
}

/// Item 4: a cache larger than one dispatch is refused when made; a step that fails on the GPU
/// leaves lengths and positions as they were, and the next step still matches the reference;
/// a tensor in a buffer larger than a binding works in a decode step as in `attention`.
#[test]
fn failed_cache_calls_change_nothing() {
    for c in contexts() {
        let max = c.capabilities().max_workgroups_per_dim;
        let e = KvCache::new(c, KvCacheConfig::new(max + 1, 1, 8, 4)).unwrap_err();
        assert!(matches!(e, Error::DispatchTooLarge { .. }), "{e:?}");

        let (b, h, d) = (2usize, 2usize, 8usize);
        let cfg = KvCacheConfig::new(b as u32, h as u32, d as u32, 16);
        let mut cache = KvCache::new(c, cfg).unwrap();
        let mut r = RefCache::new(cfg).unwrap();
        let mut rng = Rng::new(5);
        let t = host_tokens(&mut rng, b, h, 3, d);
        let kv = |x: &[f32], n: u64| c.upload(&[b as u64, h as u64, n, d as u64], x).unwrap();
        cache
            .append(c, &Tokens::new(&kv(&t.k, 3), &kv(&t.v, 3)), None)
            .unwrap();
        r.append(&t, None).unwrap();

        let dims = [b as u64, h as u64, 1, d as u64];
        let step_once = |cache: &mut KvCache, q: &Tensor, t: &HostTokens| {
            let o = c.empty(&dims, DType::F32).unwrap();
            c.poison(&o).unwrap();
            let res = cache.step(
                c,
                &Step::new(q, &kv(&t.k, 1), &kv(&t.v, 1)),
                &DecodeOptions::new(),
                &Outputs::new(&o),
            );
            res.map(|_| c.download(&o).unwrap())
        };
        // A step whose query buffer dies before the submit.
        let x = rng.normals(b * h * d);
        let dead = c.upload(&dims, &x).unwrap();
        dead.buffer().destroy();
        let t1 = host_tokens(&mut rng, b, h, 1, d);
        let before = (cache.lens().to_vec(), cache.positions().to_vec());
        let e = step_once(&mut cache, &dead, &t1).unwrap_err();
        assert!(matches!(e, Error::Gpu { .. }), "{e:?}");
        assert_eq!(
            before,
            (cache.lens().to_vec(), cache.positions().to_vec()),
            "a failed step moved the cache"
        );
        // The next valid step agrees with the reference, whose cache never saw the failed one.
        // Its query lives in a buffer larger than a storage binding where that is allocatable.
        let caps = c.capabilities();
        let big = caps.max_storage_binding + 256;
        let q = if big <= caps.max_buffer && big <= 256 << 20 {
            let buf = c.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("larger than a binding"),
                size: big,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            c.queue.write_buffer(&buf, 0, bytemuck::cast_slice(&x));
            Tensor::from_buffer(c, buf, &dims, DType::F32).unwrap()
        } else {
            c.upload(&dims, &x).unwrap()
        };
        let got = step_once(&mut cache, &q, &t1).unwrap();
        let hq = HostQueries {
            q_heads: h,
            q: x,
            tau: None,
            alpha: None,
        };
        let want = r.step(&hq, &t1, None, None).unwrap();
        let cmp = compare(&got, &want.o, 1e-5, 1e-5);
        assert!(cmp.bad == 0, "{}: {cmp:?}", c.describe());
        assert_eq!(cache.lens(), &[4, 4]);
        assert_eq!(cache.positions(), &[4, 4]);
    }
}

/// Item 5: finite inputs whose exact result fits in f32 give that result, on every path the
/// adapter runs (prefill scalar and cooperative, decode), never NaN or -inf.
#[test]
fn huge_logits_stay_finite() {
    // (name, q, k, scale): the exact logits are about +3.2e38, -3.2e38 and +2.8e38.
    let cases: [(&str, f32, f32, Option<f32>); 3] = [
        ("scale 4e37", 1.0, 1.0, Some(4e37)),
        ("scale 4e37, negative logits", 1.0, -1.0, Some(4e37)),
        ("|q|, |k| = 1e19", 1e19, 1e19, None),
    ];
    let (n, d) = (6u32, 8u32);
    let shape = Shape::new(1, 1, n, d);
    let mut fails = vec![];
    for ctx in contexts() {
        for (name, qv, kv, scale) in cases {
            let mut rng = Rng::new(3);
            let x = HostInputs {
                q: vec![qv; (n * d) as usize],
                k: vec![kv; (n * d) as usize],
                v: rng.normals((n * d) as usize),
                ..Default::default()
            };
            let mut opts = Options::causal();
            opts.scale = scale;
            let r = common::run_ref(&shape, &x, &opts);
            let mut paths = vec![(Path::Scalar, DType::F32)];
            if ctx.capabilities().f16 && qv.abs() < 6e4 {
                paths.push((Path::Scalar, DType::F16));
                paths.push((Path::Coop, DType::F16));
            }
            for (path, elem) in paths {
                let o = opts.path(path);
                let spec = Spec {
                    shape,
                    options: o,
                    present: x.present(false),
                };
                // The cooperative path runs only where the adapter has it.
                if path == Path::Coop {
                    let r = spec.validate().unwrap();
                    if selattn::Plan::new(ctx.capabilities(), &r, elem).is_err() {
                        continue;
                    }
                }
                let xe = match elem {
                    DType::F16 => HostInputs {
                        v: selattn_tools::testing::round_f16(&x.v),
                        ..x.clone()
                    },
                    _ => x.clone(),
                };
                let re = common::run_ref(&shape, &xe, &opts);
                let g = common::run_gpu(ctx, &shape, &xe, &o, elem);
                let tol = if elem == DType::F16 { 2e-3 } else { 1e-5 };
                let co = compare(&g.o, &re.o, tol, tol);
                let cl = compare(&g.lse, &re.lse, 0.0, 1e-5);
                if co.bad > 0 || cl.bad > 0 || g.lse.iter().any(|l| !l.is_finite()) {
                    fails.push(format!(
                        "[{}] prefill {name} {path:?} {elem:?}: O {co:?} LSE {cl:?} (got {:?}, want {:?})",
                        ctx.describe(),
                        &g.lse,
                        &re.lse
                    ));
                }
            }
            let _ = r;
            // Decode: the same logits through a KV cache.
            let cfg = KvCacheConfig::new(1, 1, d, 8);
            let mut cache = KvCache::new(ctx, cfg).unwrap();
            let mut rc = RefCache::new(cfg).unwrap();
            let t = HostTokens {
                n: 4,
                k: vec![kv; 4 * d as usize],
                v: rng.normals(4 * d as usize),
                gate: None,
                f: None,
            };
            let up = |x: &[f32], n: u64| ctx.upload(&[1, 1, n, d as u64], x).unwrap();
            cache
                .append(ctx, &Tokens::new(&up(&t.k, 4), &up(&t.v, 4)), None)
                .unwrap();
            rc.append(&t, None).unwrap();
            let t1 = HostTokens {
                n: 1,
                k: vec![kv; d as usize],
                v: rng.normals(d as usize),
                gate: None,
                f: None,
            };
            let hq = HostQueries {
                q_heads: 1,
                q: vec![qv; d as usize],
                tau: None,
                alpha: None,
            };
            let q = up(&hq.q, 1);
            let o = ctx.empty(&[1, 1, 1, d as u64], DType::F32).unwrap();
            let lse = ctx.empty(&[1, 1, 1], DType::F32).unwrap();
            ctx.poison(&o).unwrap();
            ctx.poison(&lse).unwrap();
            let mut dopts = DecodeOptions::new();
            dopts.scale = scale;
            cache
                .step(
                    ctx,
                    &Step::new(&q, &up(&t1.k, 1), &up(&t1.v, 1)),
                    &dopts,
                    &Outputs::new(&o).lse(&lse),
                )
                .unwrap();
            let want = rc.step(&hq, &t1, scale, None).unwrap();
            let go = ctx.download(&o).unwrap();
            let gl = ctx.download(&lse).unwrap();
            let co = compare(&go, &want.o, 1e-5, 1e-5);
            let cl = compare(&gl, &want.lse, 0.0, 1e-5);
            if co.bad > 0 || cl.bad > 0 {
                fails.push(format!(
                    "[{}] decode {name}: O {co:?} LSE {cl:?} (got {gl:?}, want {:?})",
                    ctx.describe(),
                    want.lse
                ));
            }
        }
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

/// Item 5 on the cooperative-matrix path (f16, a head dim it takes): logits near the f32 limit,
/// with a temperature, and with selective masking whose F terms are themselves huge, give the
/// exact result on the scalar f16 path everywhere and on the cooperative path where the adapter
/// has it (forced, so a missing coop path is reported, not silently skipped).
#[test]
fn huge_logits_stay_finite_on_the_coop_path() {
    // Head 1 (and head 0 unless selective): logits +-3.2e38 = 16 * 2e37. With selective masking
    // head 0 is the selection head, its q = 2^-13 (exact in f16): F terms of 3.9e34 each.
    let (n, d) = (20u32, 16u32);
    let shape = Shape::new(1, 2, n, d).with_kv_heads(1);
    let row = (n * d) as usize;
    // (name, q, k, scale, tau on even and odd rows, selective). Mixed tau: a tile with one huge
    // row factor runs in the wide units, the other rows must still come out right.
    type Case = (&'static str, f32, f32, f32, Option<(f32, f32)>, bool);
    let cases: [Case; 4] = [
        ("scale 2e37", 1.0, 1.0, 2e37, None, false),
        ("scale 2e37, negative logits", 1.0, -1.0, 2e37, None, false),
        (
            "tau 2e37 on even rows, 1 on odd",
            1.0,
            1.0,
            1.0,
            Some((2e37, 1.0)),
            false,
        ),
        ("scale 2e37, selective, huge F", 1.0, 1.0, 2e37, None, true),
    ];
    let (mut fails, mut coop_runs, mut runs) = (vec![], 0, 0);
    for ctx in contexts() {
        if !ctx.capabilities().f16 {
            eprintln!("[{}] no SHADER_F16: case not offered", ctx.describe());
            continue;
        }
        for (name, qv, kv, scale, tau, selective) in cases {
            let mut rng = Rng::new(5);
            let mut q = vec![qv; 2 * row];
            if selective {
                q[..row].fill(1.0 / 8192.0);
            }
            let x = HostInputs {
                q,
                k: vec![kv; row],
                v: selattn_tools::testing::round_f16(&rng.normals(row)),
                tau: tau.map(|(e, o)| (0..2 * n).map(|i| if i % 2 == 0 { e } else { o }).collect()),
                ..Default::default()
            };
            let mut opts = Options::causal();
            opts.scale = Some(scale);
            if selective {
                opts = opts.selective(0);
            }
            let re = common::run_ref(&shape, &x, &opts);
            for path in [Path::Scalar, Path::Coop] {
                let o = opts.path(path);
                let spec = Spec {
                    shape,
                    options: o,
                    present: x.present(selective),
                };
                let r = spec.validate().unwrap();
                if let Err(e) = selattn::Plan::new(ctx.capabilities(), &r, DType::F16) {
                    eprintln!("[{}] {name} {path:?}: not offered ({e})", ctx.describe());
                    continue;
                }
                let g = common::run_gpu(ctx, &shape, &x, &o, DType::F16);
                runs += 1;
                coop_runs += (path == Path::Coop) as u32;
                let co = compare(&g.o, &re.o, 2e-3, 2e-3);
                let cl = compare(&g.lse, &re.lse, 0.0, 1e-5);
                let cf = compare(&g.f_out, &re.f_out, 0.0, 1e-3);
                eprintln!(
                    "[{}] {name} {path:?}: O max {:.2e}, LSE rel {:.2e} (row 0 {:e})",
                    ctx.describe(),
                    co.max_abs,
                    cl.rel_norm,
                    g.lse[0]
                );
                if co.bad > 0 || cl.bad > 0 || cf.bad > 0 || g.lse.iter().any(|l| !l.is_finite()) {
                    fails.push(format!(
                        "[{}] {name} {path:?}: O {co:?} LSE {cl:?} F_out {cf:?} (got {:?}, want {:?})",
                        ctx.describe(),
                        &g.lse,
                        &re.lse
                    ));
                }
            }
        }
    }
    eprintln!("{runs} runs, {coop_runs} on the cooperative path");
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

const CHILD_ENV: &str = "SELATTN_AIRTIGHT_CHILD";

/// Item 7: with no adapter at all, the error says so and how to get one. Runs in a child
/// process whose `WGPU_BACKEND` names a backend this machine lacks (or no backend wgpu knows).
#[test]
fn no_adapter_says_how_to_get_one() {
    let backend = if cfg!(target_os = "macos") {
        "dx12"
    } else {
        "metal"
    };
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["no_adapter_child", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_ENV, "1")
        .env("WGPU_BACKEND", backend)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child failed:\n{text}"
    );
}

#[test]
#[ignore = "run by no_adapter_says_how_to_get_one in a child process"]
fn no_adapter_child() {
    if std::env::var(CHILD_ENV).is_err() {
        eprintln!("only meaningful inside no_adapter_says_how_to_get_one");
        return;
    }
    let e = Context::new().unwrap_err();
    let text = e.to_string();
    eprintln!("{text}");
    assert!(matches!(&e, Error::NoAdapter { reasons } if reasons.is_empty()));
    assert!(text.contains("saw no adapter"), "{text}");
    assert!(
        text.contains("apt-get install mesa-vulkan-drivers"),
        "{text}"
    );
}
