//! Every invalid call gets a typed error naming the numbers, never a panic: one test per `Error`
//! variant reachable from the public API (RequestDevice and Gpu need a failing driver; Io belongs
//! to file I/O). Planning does no GPU work, so most of these run no shader at all.

mod common;
use common::*;
use selattn::reference::HostInputs;
use selattn::spec::check_kv_len;
use selattn::{
    Context, DType, Error, Inputs, Options, Outputs, Path, Plan, Shape, Spec, Switches, Tensor,
};

/// B = 2, Hq = 4, Hkv = 2, Nq = 5, Nk = 7, D = 16.
fn base() -> Shape {
    Shape::new(2, 4, 7, 16).with_kv_heads(2).with_q_len(5)
}

fn ctx() -> &'static Context {
    &contexts()[0]
}

/// A full set of correctly shaped tensors for a shape; tests swap one out to make a call invalid.
struct Set {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau: Tensor,
    alpha: Tensor,
    gate: Tensor,
    kv_len: Tensor,
    f0: Tensor,
    o: Tensor,
    lse: Tensor,
    f_out: Tensor,
}

impl Set {
    fn new(ctx: &Context, s: &Shape) -> Set {
        let e = |d: Vec<u64>, t| ctx.empty(&d, t).unwrap();
        Set {
            q: e(s.q_dims(), DType::F32),
            k: e(s.kv_dims(), DType::F32),
            v: e(s.kv_dims(), DType::F32),
            tau: e(s.row_dims(), DType::F32),
            alpha: e(s.alpha_dims(), DType::F32),
            gate: e(s.gate_dims(), DType::F32),
            kv_len: e(s.kv_len_dims(), DType::U32),
            f0: e(s.f_dims(), DType::F32),
            o: e(s.q_dims(), DType::F32),
            lse: e(s.row_dims(), DType::F32),
            f_out: e(s.f_dims(), DType::F32),
        }
    }
    /// Every input present.
    fn inputs(&self) -> Inputs<'_> {
        Inputs::new(&self.q, &self.k, &self.v)
            .tau(&self.tau)
            .alpha(&self.alpha)
            .gate(&self.gate)
            .kv_len(&self.kv_len)
            .f0(&self.f0)
    }
    fn outputs(&self) -> Outputs<'_> {
        Outputs::new(&self.o).lse(&self.lse).f_out(&self.f_out)
    }
}

fn sel() -> Options {
    Options::causal().selective(1)
}

fn plan_err(inputs: &Inputs, opts: &Options, outputs: &Outputs) -> Error {
    let e = ctx()
        .plan(inputs, opts, outputs)
        .expect_err("an invalid call was planned");
    // The same error from every entry point that takes the call (compared as text: NaN != NaN).
    let same =
        |other: Error, what: &str| assert_eq!(format!("{other:?}"), format!("{e:?}"), "{what}");
    same(
        ctx().scratch_bytes(inputs, opts, outputs).unwrap_err(),
        "scratch_bytes",
    );
    let mut enc = ctx()
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    same(
        ctx()
            .encode_attention(&mut enc, inputs, opts, outputs)
            .unwrap_err(),
        "encode_attention",
    );
    same(
        ctx().attention(inputs, opts, outputs).unwrap_err(),
        "attention",
    );
    eprintln!("{e:?}: {e}");
    e
}

#[test]
fn valid_base_call_plans() {
    let s = Set::new(ctx(), &base());
    ctx().plan(&s.inputs(), &sel(), &s.outputs()).unwrap();
}

#[test]
fn zero_size() {
    type Zero = fn(&mut Shape);
    let fields: [(&str, Zero); 6] = [
        ("batch", |s| s.batch = 0),
        ("q_heads", |s| s.q_heads = 0),
        ("kv_heads", |s| s.kv_heads = 0),
        ("q_len", |s| s.q_len = 0),
        ("k_len", |s| s.k_len = 0),
        ("head_dim", |s| s.head_dim = 0),
    ];
    for (name, zero) in fields {
        let mut shape = base();
        zero(&mut shape);
        let e = Spec {
            shape,
            options: Options::new(),
            present: Switches::default(),
        }
        .validate()
        .unwrap_err();
        assert!(
            matches!(e, Error::ZeroSize { what } if what == name),
            "{name}: {e:?}"
        );
    }
    // Tensors of no elements cannot be made, so a call never sees one.
    let e = ctx().empty(&[2, 0, 3], DType::F32).unwrap_err();
    assert!(matches!(e, Error::ZeroSize { what: "tensor" }), "{e:?}");
    let e = ctx().upload(&[0], &[]).unwrap_err();
    assert!(matches!(e, Error::ZeroSize { what: "tensor" }), "{e:?}");
    let buf = ctx().empty(&[4], DType::F32).unwrap().buffer().clone();
    let e = Tensor::from_buffer(ctx(), buf, &[4, 0], DType::F32).unwrap_err();
    assert!(matches!(e, Error::ZeroSize { what: "tensor" }), "{e:?}");
}

#[test]
fn head_dim_unsupported() {
    for d in [4u32, 12, 100, 264, 512] {
        let shape = Shape {
            head_dim: d,
            ..base()
        };
        let s = Set::new(ctx(), &shape);
        let e = plan_err(
            &Inputs::new(&s.q, &s.k, &s.v),
            &Options::new(),
            &Outputs::new(&s.o),
        );
        assert!(
            matches!(e, Error::HeadDimUnsupported { got, .. } if got == d),
            "D{d}: {e:?}"
        );
    }
}

#[test]
fn heads_not_multiple() {
    let shape = Shape::new(1, 3, 7, 16).with_kv_heads(2);
    let s = Set::new(ctx(), &shape);
    let e = plan_err(
        &Inputs::new(&s.q, &s.k, &s.v),
        &Options::new(),
        &Outputs::new(&s.o),
    );
    assert!(
        matches!(
            e,
            Error::HeadsNotMultiple {
                q_heads: 3,
                kv_heads: 2
            }
        ),
        "{e:?}"
    );
}

/// Every tensor of the call, given in a wrong shape, is named with both shapes.
#[test]
fn shape_mismatch() {
    let c = ctx();
    let shape = base();
    let s = Set::new(c, &shape);
    let f32t = |d: &[u64]| c.empty(d, DType::F32).unwrap();
    let e = |tensor: &'static str, err: Error, expected: &[u64], got: &[u64]| {
        assert!(
            matches!(&err, Error::ShapeMismatch { tensor: t, expected: x, got: g }
                if *t == tensor && x == expected && g == got),
            "{tensor}: {err:?}"
        );
    };
    let (ins, outs) = (s.inputs(), s.outputs());

    // Q and K must be 4-D (they define the shape).
    let q3 = f32t(&[2, 4, 80]);
    let err = plan_err(&Inputs { q: &q3, ..ins }, &sel(), &outs);
    assert!(
        matches!(&err, Error::RankMismatch { tensor: "q", rank: 4, got } if got == &[2, 4, 80]),
        "{err:?}"
    );
    let k3 = f32t(&[2, 2, 112]);
    let err = plan_err(&Inputs { k: &k3, ..ins }, &sel(), &outs);
    assert!(
        matches!(&err, Error::RankMismatch { tensor: "k", rank: 4, got } if got == &[2, 2, 112]),
        "{err:?}"
    );
    // K with another batch or head dim than Q.
    let kb = f32t(&[3, 2, 7, 16]);
    let err = plan_err(&Inputs { k: &kb, ..ins }, &sel(), &outs);
    e("k", err, &[2, 2, 7, 16], &[3, 2, 7, 16]);
    let kd = f32t(&[2, 2, 7, 8]);
    let err = plan_err(&Inputs { k: &kd, ..ins }, &sel(), &outs);
    e("k", err, &[2, 2, 7, 16], &[2, 2, 7, 8]);
    // V with another Nk than K.
    let v = f32t(&[2, 2, 6, 16]);
    let err = plan_err(&Inputs { v: &v, ..ins }, &sel(), &outs);
    e("v", err, &[2, 2, 7, 16], &[2, 2, 6, 16]);
    // Optional inputs.
    let tau = f32t(&[2, 4, 7]);
    let err = plan_err(
        &Inputs {
            tau: Some(&tau),
            ..ins
        },
        &sel(),
        &outs,
    );
    e("tau", err, &[2, 4, 5], &[2, 4, 7]);
    let alpha = f32t(&[2]);
    let err = plan_err(
        &Inputs {
            alpha: Some(&alpha),
            ..ins
        },
        &sel(),
        &outs,
    );
    e("alpha", err, &[4], &[2]);
    let gate = f32t(&[2, 4, 7]);
    let err = plan_err(
        &Inputs {
            gate: Some(&gate),
            ..ins
        },
        &sel(),
        &outs,
    );
    e("gate", err, &[2, 2, 7], &[2, 4, 7]);
    let kv_len = c.empty(&[3], DType::U32).unwrap();
    let err = plan_err(
        &Inputs {
            kv_len: Some(&kv_len),
            ..ins
        },
        &sel(),
        &outs,
    );
    e("kv_len", err, &[2], &[3]);
    let f0 = f32t(&[2, 5]);
    let err = plan_err(
        &Inputs {
            f0: Some(&f0),
            ..ins
        },
        &sel(),
        &outs,
    );
    e("f0", err, &[2, 7], &[2, 5]);
    // Outputs.
    let o = f32t(&[2, 4, 5, 8]);
    let err = plan_err(&ins, &sel(), &Outputs { o: &o, ..outs });
    e("o", err, &[2, 4, 5, 16], &[2, 4, 5, 8]);
    let lse = f32t(&[2, 4, 5, 1]);
    let err = plan_err(
        &ins,
        &sel(),
        &Outputs {
            lse: Some(&lse),
            ..outs
        },
    );
    e("lse", err, &[2, 4, 5], &[2, 4, 5, 1]);
    let f_out = f32t(&[1, 7]);
    let err = plan_err(
        &ins,
        &sel(),
        &Outputs {
            f_out: Some(&f_out),
            ..outs
        },
    );
    e("f_out", err, &[2, 7], &[1, 7]);
}

#[test]
fn dtype_mismatch() {
    let c = ctx();
    let shape = base();
    let s = Set::new(c, &shape);
    let (ins, outs) = (s.inputs(), s.outputs());
    let check = |err: Error, tensor: &str, expected: DType, got: DType| {
        assert!(
            matches!(&err, Error::DTypeMismatch { tensor: t, expected: x, got: g }
                if *t == tensor && *x == expected && *g == got),
            "{tensor}: {err:?}"
        );
    };
    let q = c.empty(&shape.q_dims(), DType::U32).unwrap();
    let err = plan_err(&Inputs { q: &q, ..ins }, &sel(), &outs);
    check(err, "q", DType::F32, DType::U32);
    let tau = c.empty(&shape.row_dims(), DType::U32).unwrap();
    let err = plan_err(
        &Inputs {
            tau: Some(&tau),
            ..ins
        },
        &sel(),
        &outs,
    );
    check(err, "tau", DType::F32, DType::U32);
    let kv_len = c.empty(&shape.kv_len_dims(), DType::F32).unwrap();
    let err = plan_err(
        &Inputs {
            kv_len: Some(&kv_len),
            ..ins
        },
        &sel(),
        &outs,
    );
    check(err, "kv_len", DType::U32, DType::F32);
    let lse = c.empty(&shape.row_dims(), DType::U32).unwrap();
    let err = plan_err(
        &ins,
        &sel(),
        &Outputs {
            lse: Some(&lse),
            ..outs
        },
    );
    check(err, "lse", DType::F32, DType::U32);
    // K in f16 while Q is f32 (a view of an f32 buffer: no f16 support needed to build it).
    let k16 = Tensor::from_buffer(c, s.k.buffer().clone(), &shape.kv_dims(), DType::F16).unwrap();
    let err = plan_err(&Inputs { k: &k16, ..ins }, &sel(), &outs);
    check(err, "k", DType::F32, DType::F16);
}

#[test]
fn length_mismatch() {
    let e = ctx().upload(&[2, 3], &[1.0; 5]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                what: "upload",
                expected: 6,
                got: 5
            }
        ),
        "{e:?}"
    );
    let e = ctx().upload_u32(&[2], &[1, 2, 3]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                what: "upload",
                expected: 2,
                got: 3
            }
        ),
        "{e:?}"
    );
    let e = check_kv_len(&[1, 2, 3], &base()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                what: "kv_len",
                expected: 2,
                got: 3
            }
        ),
        "{e:?}"
    );
    // The reference checks host slices the same way.
    let shape = base();
    let mut x = random_inputs(&shape, Switches::NONE, 1);
    x.v.pop();
    let spec = Spec {
        shape,
        options: Options::new(),
        present: x.present(false),
    };
    let e = selattn::reference::attention(&spec, &x).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                what: "v",
                expected: 448,
                got: 447
            }
        ),
        "{e:?}"
    );
}

#[test]
fn kv_len_too_large() {
    let e = check_kv_len(&[3, 9], &base()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::KvLenTooLarge {
                batch: 1,
                kv_len: 9,
                keys: 7
            }
        ),
        "{e:?}"
    );
    let shape = base();
    let x = HostInputs {
        kv_len: Some(vec![8, 2]),
        ..random_inputs(&shape, Switches::NONE, 2)
    };
    let spec = Spec {
        shape,
        options: Options::new(),
        present: x.present(false),
    };
    let e = selattn::reference::attention(&spec, &x).unwrap_err();
    assert!(
        matches!(
            e,
            Error::KvLenTooLarge {
                batch: 0,
                kv_len: 8,
                keys: 7
            }
        ),
        "{e:?}"
    );
}

#[test]
fn start_out_of_range() {
    let s = Set::new(ctx(), &base());
    let (ins, outs) = (s.inputs(), s.outputs());
    // Causal: start + Nq = 3 + 5 > 7.
    let e = plan_err(&ins, &sel().start(3), &outs);
    assert!(
        matches!(
            e,
            Error::StartOutOfRange {
                start: 3,
                queries: 5,
                keys: 7
            }
        ),
        "{e:?}"
    );
    let e = plan_err(
        &Inputs::new(&s.q, &s.k, &s.v),
        &Options::causal().start(3),
        &Outputs::new(&s.o),
    );
    assert!(
        matches!(
            e,
            Error::StartOutOfRange {
                start: 3,
                queries: 5,
                keys: 7
            }
        ),
        "{e:?}"
    );
    // Causal with Nq > Nk and the default start (Nk - Nq saturates to 0).
    let big = Shape::new(1, 1, 4, 8).with_q_len(6);
    let t = Set::new(ctx(), &big);
    let e = plan_err(
        &Inputs::new(&t.q, &t.k, &t.v),
        &Options::causal(),
        &Outputs::new(&t.o),
    );
    assert!(
        matches!(
            e,
            Error::StartOutOfRange {
                start: 0,
                queries: 6,
                keys: 4
            }
        ),
        "{e:?}"
    );
    // Non-causal positions must stay representable (start + i in u32 on the GPU).
    let huge = u32::MAX - 2;
    let e = plan_err(
        &Inputs::new(&s.q, &s.k, &s.v),
        &Options::new().start(huge),
        &Outputs::new(&s.o),
    );
    assert!(
        matches!(e, Error::CountTooLarge { what: "query positions (start + Nq)", count, .. } if count == huge as u64 + 5),
        "{e:?}"
    );
}

#[test]
fn bad_scale() {
    let s = Set::new(ctx(), &base());
    for scale in [
        0.0f32,
        -0.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ] {
        let e = plan_err(&s.inputs(), &sel().scale(scale), &s.outputs());
        assert!(
            matches!(e, Error::BadScale { scale: x } if x.to_bits() == scale.to_bits()),
            "{scale}: {e:?}"
        );
    }
}

#[test]
fn selective_needs_causal() {
    let s = Set::new(ctx(), &base());
    let e = plan_err(
        &Inputs::new(&s.q, &s.k, &s.v),
        &Options::new().selective(0),
        &Outputs::new(&s.o),
    );
    assert!(matches!(e, Error::SelectiveNeedsCausal), "{e:?}");
}

#[test]
fn selection_head_out_of_range() {
    let s = Set::new(ctx(), &base());
    let e = plan_err(&s.inputs(), &Options::causal().selective(4), &s.outputs());
    assert!(
        matches!(
            e,
            Error::SelectionHeadOutOfRange {
                head: 4,
                q_heads: 4
            }
        ),
        "{e:?}"
    );
}

#[test]
fn input_without_use() {
    let s = Set::new(ctx(), &base());
    let e = plan_err(
        &Inputs::new(&s.q, &s.k, &s.v).f0(&s.f0),
        &Options::causal(),
        &Outputs::new(&s.o),
    );
    assert!(
        matches!(e, Error::InputWithoutUse { what: "F0", .. }),
        "{e:?}"
    );
    let e = plan_err(
        &Inputs::new(&s.q, &s.k, &s.v),
        &Options::causal(),
        &Outputs::new(&s.o).f_out(&s.f_out),
    );
    assert!(
        matches!(e, Error::InputWithoutUse { what: "F_out", .. }),
        "{e:?}"
    );
}

/// Sizes beyond the device's limits: tensors, workgroup memory, dispatch sizes, scratch, and a
/// device with too few storage buffers. Plans are checked against synthetic capabilities.
#[test]
fn too_large() {
    let c = ctx();
    let caps = c.capabilities();
    let limit = caps.max_storage_binding.min(caps.max_buffer);
    let n = limit / 4 + 1;
    let e = c.empty(&[n], DType::F32).unwrap_err();
    assert!(
        matches!(e, Error::TooLarge { what: "tensor", bytes, limit: l } if bytes == 4 * n && l == limit),
        "{e:?}"
    );
    // Element count overflowing u64 bytes.
    let e = c.empty(&[u64::MAX / 2, 3], DType::F32).unwrap_err();
    assert!(matches!(e, Error::TooLarge { what: "tensor", .. }), "{e:?}");

    let r = Spec {
        shape: Shape::new(1, 2, 4096, 64),
        options: sel(),
        present: Switches {
            lse: true,
            f_out: true,
            ..Switches::default()
        },
    }
    .validate()
    .unwrap();
    Plan::new(caps, &r, DType::F32).unwrap();

    let mut small = caps.clone();
    small.workgroup_memory = 64;
    let e = Plan::new(&small, &r, DType::F32).unwrap_err();
    assert!(
        matches!(e, Error::TooLarge { what, limit: 64, bytes } if what.starts_with("workgroup memory") && bytes > 64),
        "{e:?}"
    );

    let mut small = caps.clone();
    small.max_workgroups_per_dim = 3;
    let e = Plan::new(&small, &r, DType::F32).unwrap_err();
    assert!(
        matches!(e, Error::DispatchTooLarge { what: "query tiles per dispatch", limit: 3, workgroups } if workgroups > 3),
        "{e:?}"
    );

    let mut small = caps.clone();
    small.max_storage_binding = 1 << 16;
    let e = Plan::new(&small, &r, DType::F32).unwrap_err();
    assert!(
        matches!(e, Error::TooLarge { what: "selective scratch", limit, bytes } if limit == 1 << 16 && bytes > limit),
        "{e:?}"
    );

    // A user buffer larger than one storage binding may hold (allowed as a buffer) cannot be bound
    // whole: Q over the binding limit. Only where that limit is small enough to allocate here.
    let binding = caps.max_storage_binding;
    if caps.max_buffer > binding && binding <= 256 << 20 {
        let rows = binding / 32 + 1; // D = 8 f32: 32 bytes a row
        let big = c.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("over the binding limit"),
            size: rows * 32,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let dims = [1, 1, rows, 8];
        let q = Tensor::from_buffer(c, big.clone(), &dims, DType::F32).unwrap();
        let o = Tensor::from_buffer(c, big, &dims, DType::F32).unwrap();
        let k = c.empty(&[1, 1, 3, 8], DType::F32).unwrap();
        let e = c
            .plan(&Inputs::new(&q, &k, &k), &Options::new(), &Outputs::new(&o))
            .unwrap_err();
        assert!(
            matches!(e, Error::TooLarge { what: "q", bytes, limit } if bytes == rows * 32 && limit == binding),
            "{e:?}"
        );
    } else {
        eprintln!("binding limit {binding}: Q over it not tried");
    }

    // A device requested with wgpu's default limits (8 storage buffers per stage) cannot run the
    // forward kernel, which binds 10.
    let (a, _) = selattn::adapters()
        .into_iter()
        .find(|(a, why)| why.is_none() && a.get_info() == caps.info)
        .unwrap();
    let (device, queue) = pollster::block_on(a.request_device(&wgpu::DeviceDescriptor {
        required_limits: wgpu::Limits::downlevel_defaults(),
        ..Default::default()
    }))
    .unwrap();
    let have = device.limits().max_storage_buffers_per_shader_stage as u64;
    let e = Context::from_device(device, queue, a.get_info(), vec![]).unwrap_err();
    assert!(
        matches!(e, Error::DeviceLimit { what: "storage buffers per shader stage", needed: 10, limit } if limit == have),
        "{e:?}"
    );
}

/// f16 tensors on an adapter without SHADER_F16, the cooperative-matrix path where none is
/// reported, timestamps where the device has none.
#[test]
fn feature_missing() {
    let mut checked = 0;
    for c in contexts() {
        let caps = c.capabilities();
        let shape = base();
        let s = Set::new(c, &shape);
        if !caps.f16 {
            let e = c.empty(&[4], DType::F16).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::FeatureMissing {
                        feature: "SHADER_F16"
                    }
                ),
                "{e:?}"
            );
            let e = c.upload_f16(&[4], &[1.0; 4]).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::FeatureMissing {
                        feature: "SHADER_F16"
                    }
                ),
                "{e:?}"
            );
            let view = |t: &Tensor, d: Vec<u64>| {
                Tensor::from_buffer(c, t.buffer().clone(), &d, DType::F16)
            };
            let (q, k, v, o) = (
                view(&s.q, shape.q_dims()).unwrap(),
                view(&s.k, shape.kv_dims()).unwrap(),
                view(&s.v, shape.kv_dims()).unwrap(),
                view(&s.o, shape.q_dims()).unwrap(),
            );
            let e = c
                .plan(&Inputs::new(&q, &k, &v), &Options::new(), &Outputs::new(&o))
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::FeatureMissing {
                        feature: "SHADER_F16"
                    }
                ),
                "[{}] {e:?}",
                c.describe()
            );
            checked += 1;
        }
        if caps.cooperative_matrix.is_empty() {
            let e = c
                .plan(&s.inputs(), &sel().path(Path::Coop), &s.outputs())
                .unwrap_err();
            assert!(
                matches!(e, Error::PathUnavailable { path: "coop", .. }),
                "{e:?}"
            );
            checked += 1;
        }
        if !caps.timestamps {
            let scope = c.device.push_error_scope(wgpu::ErrorFilter::Validation);
            let qs = c.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: None,
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let _ = pollster::block_on(scope.pop());
            let mut enc = c
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            let e = c
                .encode_attention_timed(
                    &mut enc,
                    &s.inputs(),
                    &sel(),
                    &s.outputs(),
                    wgpu::ComputePassTimestampWrites {
                        query_set: &qs,
                        beginning_of_pass_write_index: Some(0),
                        end_of_pass_write_index: Some(1),
                    },
                )
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::FeatureMissing {
                        feature: "TIMESTAMP_QUERY"
                    }
                ),
                "{e:?}"
            );
            checked += 1;
        }
        eprintln!(
            "[{}] f16 {} coop {} timestamps {}",
            c.describe(),
            caps.f16,
            !caps.cooperative_matrix.is_empty(),
            caps.timestamps
        );
    }
    // On a machine whose only usable adapter has every feature (the H100) there is nothing to
    // check; CI's software adapters lack f16 (GL), cooperative matrices and more.
    eprintln!("{checked} missing-feature checks");
}

#[test]
fn bad_buffer() {
    let c = ctx();
    let shape = base();
    let s = Set::new(c, &shape);
    let (ins, outs) = (s.inputs(), s.outputs());
    let is_bad = |e: &Error| matches!(e, Error::BadBuffer { .. });
    // O is Q.
    let e = plan_err(&ins, &sel(), &Outputs { o: &s.q, ..outs });
    assert!(is_bad(&e), "{e:?}");
    // LSE in the same buffer as O (a view of O's buffer with LSE's shape).
    let lse = Tensor::from_buffer(c, s.o.buffer().clone(), &shape.row_dims(), DType::F32).unwrap();
    let e = plan_err(
        &ins,
        &sel(),
        &Outputs {
            lse: Some(&lse),
            ..outs
        },
    );
    assert!(is_bad(&e), "{e:?}");
    // F_out written over F0.
    let e = plan_err(
        &ins,
        &sel(),
        &Outputs {
            f_out: Some(&s.f0),
            ..outs
        },
    );
    assert!(is_bad(&e), "{e:?}");
    // F_out over the gate's buffer.
    let f_out = Tensor::from_buffer(c, s.gate.buffer().clone(), &shape.f_dims(), DType::F32);
    let f_out = f_out.unwrap();
    let e = plan_err(
        &ins,
        &sel(),
        &Outputs {
            f_out: Some(&f_out),
            ..outs
        },
    );
    assert!(is_bad(&e), "{e:?}");

    // Buffers that cannot be tensors: no STORAGE usage, too small, a shape that overflows.
    let mapped = c.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let e = Tensor::from_buffer(c, mapped, &[4], DType::F32).unwrap_err();
    assert!(is_bad(&e), "{e:?}");
    let e = Tensor::from_buffer(c, s.q.buffer().clone(), &[1000], DType::F32).unwrap_err();
    assert!(is_bad(&e), "{e:?}");
    let e = Tensor::from_buffer(c, s.q.buffer().clone(), &[u64::MAX, 2], DType::F32).unwrap_err();
    assert!(is_bad(&e), "{e:?}");
}

const CHILD_ENV: &str = "SELATTN_TEST_NO_ADAPTER_CHILD";

/// `SELATTN_ADAPTER` matching nothing gives `NoAdapter` with one reason per adapter seen. Runs in
/// a child process: setting an environment variable while other test threads read theirs is
/// unsound.
#[test]
fn no_adapter() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["no_adapter_child", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_ENV, "1")
        .env(selattn::ADAPTER_ENV, "no-such-adapter-anywhere")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child failed"
    );
    // And an adapter that cannot run compute, where one is present (OpenGL below 4.3).
    for (a, why) in selattn::adapters() {
        if let Some(why) = why {
            let e = Context::from_adapter(&a).unwrap_err();
            assert!(
                matches!(&e, Error::NoAdapter { reasons } if reasons == &vec![why.clone()]),
                "{e:?}"
            );
        }
    }
}

#[test]
#[ignore = "run by no_adapter in a child process"]
fn no_adapter_child() {
    if std::env::var(CHILD_ENV).is_err() {
        eprintln!("only meaningful inside no_adapter");
        return;
    }
    let e = Context::new().unwrap_err();
    eprintln!("{e}");
    let n = selattn::adapters().len();
    assert!(
        matches!(&e, Error::NoAdapter { reasons } if reasons.len() == n
            && reasons.iter().all(|r| r.contains("no-such-adapter-anywhere"))),
        "{e:?}"
    );
}

/// A user buffer may be larger than its tensor (documented on `Tensor::from_buffer`), even larger
/// than one storage binding may be. Only the tensor's bytes take part, so such a call must run
/// and give the reference's result, never fail validation or panic.
#[test]
fn user_buffer_larger_than_a_binding() {
    let c = ctx();
    let caps = c.capabilities();
    let binding = caps.max_storage_binding;
    if !(caps.max_buffer > binding && binding <= 256 << 20) {
        eprintln!("binding limit {binding}: not tried");
        return;
    }
    let shape = Shape::new(1, 2, 9, 8);
    let x = random_inputs(&shape, Switches::NONE, 5);
    let big = c.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("larger than a binding"),
        size: binding + 256,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    c.queue.write_buffer(&big, 0, bytemuck::cast_slice(&x.q));
    let q = Tensor::from_buffer(c, big, &shape.q_dims(), DType::F32).unwrap();
    let k = c.upload(&shape.kv_dims(), &x.k).unwrap();
    let v = c.upload(&shape.kv_dims(), &x.v).unwrap();
    let o = c.empty(&shape.q_dims(), DType::F32).unwrap();
    c.poison(&o).unwrap();
    let res = c.attention(&Inputs::new(&q, &k, &v), &Options::new(), &Outputs::new(&o));
    assert!(res.is_ok(), "{res:?}");
    let got = c.download(&o).unwrap();
    let r = run_ref(&shape, &x, &Options::new());
    let cmp = compare(&got, &r.o, 2e-5, 2e-5);
    assert!(cmp.bad == 0, "{cmp:?}");
}
