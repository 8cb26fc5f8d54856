//! The cooperative-matrix operations behave as `shaders/coop_forward.wgsl` assumes: zero-valued
//! accumulators, row-major (`coopLoadT`) and column-major (`coopLoad`) loads from workgroup
//! memory with padded strides, multiply-add, row-major stores. Runs on every adapter that
//! reports a 16×16×16 f16 → f32 configuration; elsewhere it says so and checks nothing.

mod common;
use common::*;

const SHADER: &str = r#"
enable f16;
enable wgpu_cooperative_matrix;
diagnostic(off, derivative_uniformity);

@group(0) @binding(0) var<storage, read> a_in: array<f32>;   // 16 x 16 row-major
@group(0) @binding(1) var<storage, read> b_in: array<f32>;   // 16 x 16 row-major (B = K^T: rows are keys)
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // 7 x 256

const ST: u32 = 24u;      // padded f16 stride
const SS: u32 = 20u;      // padded f32 stride
var<workgroup> a_sh: array<f16, 16u * ST>;
var<workgroup> b_sh: array<f16, 16u * ST>;
var<workgroup> c_sh: array<f32, 16u * SS>;

@compute @workgroup_size(SGS)
fn main(@builtin(local_invocation_index) tid: u32) {
    for (var e = tid; e < 256u; e += SGS) {
        a_sh[(e / 16u) * ST + e % 16u] = f16(a_in[e]);
        b_sh[(e / 16u) * ST + e % 16u] = f16(b_in[e]);
    }
    workgroupBarrier();
    // 0: a zero-valued accumulator
    var z = coop_mat16x16<f32, C>();
    coopStoreT(z, &c_sh[0], SS);
    workgroupBarrier();
    for (var e = tid; e < 256u; e += SGS) { out[e] = c_sh[(e / 16u) * SS + e % 16u]; }
    workgroupBarrier();
    // 1: A (row-major) x B where B is loaded column-major from b_sh: A * b^T
    let a = coopLoadT<coop_mat16x16<f16, A>>(&a_sh[0], ST);
    let bt = coopLoad<coop_mat16x16<f16, B>>(&b_sh[0], ST);
    var c1 = coop_mat16x16<f32, C>();
    c1 = coopMultiplyAdd(a, bt, c1);
    coopStoreT(c1, &c_sh[0], SS);
    workgroupBarrier();
    for (var e = tid; e < 256u; e += SGS) { out[256u + e] = c_sh[(e / 16u) * SS + e % 16u]; }
    workgroupBarrier();
    // 2: A x B with B row-major: A * b
    let b = coopLoadT<coop_mat16x16<f16, B>>(&b_sh[0], ST);
    var c2 = coop_mat16x16<f32, C>();
    c2 = coopMultiplyAdd(a, b, c2);
    coopStoreT(c2, &c_sh[0], SS);
    workgroupBarrier();
    for (var e = tid; e < 256u; e += SGS) { out[512u + e] = c_sh[(e / 16u) * SS + e % 16u]; }
    workgroupBarrier();
    // 3: accumulate twice into a loaded C: 2 * A * b + C(=c2)
    var c3 = coopLoadT<coop_mat16x16<f32, C>>(&c_sh[0], SS);
    c3 = coopMultiplyAdd(a, b, c3);
    c3 = coopMultiplyAdd(a, b, c3);
    workgroupBarrier();
    coopStoreT(c3, &c_sh[0], SS);
    workgroupBarrier();
    for (var e = tid; e < 256u; e += SGS) { out[768u + e] = c_sh[(e / 16u) * SS + e % 16u]; }
    workgroupBarrier();
    // 4: an accumulator carried across loop iterations with barriers: 3 * A * b
    var c4 = coop_mat16x16<f32, C>();
    for (var it = 0u; it < 3u; it++) {
        workgroupBarrier();
        c4 = coopMultiplyAdd(a, coopLoadT<coop_mat16x16<f16, B>>(&b_sh[0], ST), c4);
    }
    workgroupBarrier();
    coopStoreT(c4, &c_sh[0], SS);
    workgroupBarrier();
    for (var e = tid; e < 256u; e += SGS) { out[1024u + e] = c_sh[(e / 16u) * SS + e % 16u]; }
    workgroupBarrier();
    // 5: A assigned inside a loop under a uniform branch, b_sh overwritten afterwards
    // (the load must not be deferred to the use): A * b
    var qa = coop_mat16x16<f16, A>();
    for (var qp = 0u; qp < 2u; qp++) {
        workgroupBarrier();
        if qp == 0u {
            qa = coopLoadT<coop_mat16x16<f16, A>>(&a_sh[0], ST);
        }
    }
    let bb = coopLoadT<coop_mat16x16<f16, B>>(&b_sh[0], ST);
    workgroupBarrier();
    for (var e = tid; e < 256u; e += SGS) {
        a_sh[(e / 16u) * ST + e % 16u] = f16(7.0);
    }
    workgroupBarrier();
    var c5 = coop_mat16x16<f32, C>();
    c5 = coopMultiplyAdd(qa, bb, c5);
    coopStoreT(c5, &c_sh[0], SS);
    workgroupBarrier();
    for (var e = tid; e < 256u; e += SGS) { out[1280u + e] = c_sh[(e / 16u) * SS + e % 16u]; }
    workgroupBarrier();
    // 6: a_sh rewritten through a function call, then loaded: (all 7) * b
    for (var e = tid; e < 256u; e += SGS) {
        put(e, 0.5);
    }
    workgroupBarrier();
    let a6 = coopLoadT<coop_mat16x16<f16, A>>(&a_sh[0], ST);
    var c6 = coop_mat16x16<f32, C>();
    c6 = coopMultiplyAdd(a6, bb, c6);
    coopStoreT(c6, &c_sh[0], SS);
    workgroupBarrier();
    for (var e = tid; e < 256u; e += SGS) { out[1536u + e] = c_sh[(e / 16u) * SS + e % 16u]; }
}

fn put(e: u32, x: f32) {
    a_sh[(e / 16u) * ST + e % 16u] = f16(x);
}
"#;

#[test]
fn cooperative_matrix_primitives() {
    use wgpu::util::DeviceExt;
    let mut checked = 0;
    let mut failures = vec![];
    for ctx in contexts() {
        let caps = ctx.capabilities();
        if !caps.coop_16x16_f16() || caps.subgroup_min_size != caps.subgroup_max_size {
            eprintln!(
                "[{}] no 16x16x16 f16->f32 cooperative matrices: skipped",
                ctx.describe()
            );
            continue;
        }
        let sgs = caps.subgroup_min_size;
        let mut rng = Rng::new(7);
        // Small integers and halves: exact in f16 and in f32 sums.
        let a: Vec<f32> = (0..256)
            .map(|_| (rng.below(9) as f32 - 4.0) * 0.5)
            .collect();
        let b: Vec<f32> = (0..256)
            .map(|_| (rng.below(9) as f32 - 4.0) * 0.5)
            .collect();
        let dev = &ctx.device;
        let src = SHADER.replace("SGS", &format!("{sgs}u"));
        let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("coop primitives"),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        let pipe = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("coop primitives"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let mk = |d: &[f32]| {
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(d),
                usage: wgpu::BufferUsages::STORAGE,
            })
        };
        let (ab, bb) = (mk(&a), mk(&b));
        let out = ctx.empty(&[1792], selattn::DType::F32).unwrap();
        ctx.poison(&out).unwrap();
        let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipe.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: ab.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: bb.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: out.buffer().as_entire_binding(),
                },
            ],
        });
        let mut enc = dev.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipe);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(1, 1, 1);
        }
        ctx.queue.submit([enc.finish()]);
        let got = ctx.download(&out).unwrap();
        let mut want = vec![0.0f64; 1792];
        for i in 0..16 {
            for j in 0..16 {
                let (mut abt, mut ab_) = (0.0, 0.0);
                for k in 0..16 {
                    abt += a[i * 16 + k] as f64 * b[j * 16 + k] as f64;
                    ab_ += a[i * 16 + k] as f64 * b[k * 16 + j] as f64;
                }
                want[256 + i * 16 + j] = abt;
                want[512 + i * 16 + j] = ab_;
                want[768 + i * 16 + j] = 3.0 * ab_;
                want[1024 + i * 16 + j] = 3.0 * ab_;
                want[1280 + i * 16 + j] = ab_;
                want[1536 + i * 16 + j] = (0..16).map(|k| 0.5 * b[k * 16 + j] as f64).sum::<f64>();
            }
        }
        for (part, name) in [
            "zero accumulator",
            "A x B^T (coopLoad)",
            "A x B (coopLoadT)",
            "accumulate into loaded C",
            "accumulator carried across a loop",
            "A loaded in a loop branch, memory rewritten after",
            "memory written through a function, then loaded",
        ]
        .iter()
        .enumerate()
        {
            let c = compare(
                &got[part * 256..][..256],
                &want[part * 256..][..256],
                0.0,
                0.0,
            );
            eprintln!(
                "[{}] {name}: max error {:.3e} at {}",
                ctx.describe(),
                c.max_abs,
                c.at
            );
            if !(c.bad == 0 && c.max_abs == 0.0) {
                failures.push(format!(
                    "[{}] {name}: {c:?}\n got {:?}\n want {:?}",
                    ctx.describe(),
                    &got[part * 256..][..16],
                    &want[part * 256..][..16]
                ));
            }
        }
        checked += 1;
    }
    eprintln!("checked on {checked} adapter(s)");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
