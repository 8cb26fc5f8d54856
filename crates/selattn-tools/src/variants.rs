//! Every pipeline variant the library can create, enumerated by asking the real planner.
//!
//! A variant is a [`KernelKey`]: kernel family, specialisation constants, entry point and
//! element type. Which keys exist is decided by the planner ([`Plan::new`] and
//! [`choose_tiles`](selattn::kernels::forward::choose_tiles)) from the call (head dim, options, inputs present) and the device
//! (workgroup memory, invocations). This module does not restate those rules: it builds a
//! [`Spec`] for every call that differs in something a kernel is specialised on, plans it on a
//! set of [`reference_devices`], and collects the keys the plans name.
//!
//! Adding a kernel family: write its `fn(&Capabilities, DType, Coverage) -> Vec<KernelKey>`
//! and add one entry to [`FAMILIES`]. Everything that consumes variants (the translation tests,
//! `examples/validate.rs`) picks it up from there.
//!
//! Two coverages:
//! * [`Coverage::Full`]: every head dim (8..=256 step 8) × f32/f16 × every combination of the
//!   switches a kernel is specialised on (causal, tau, alpha, gate, kv_len, LSE, selective, F0,
//!   F_out) × every reference device. Tens of thousands of keys: for listing and counting.
//! * [`Coverage::Covering`]: every head dim × f32/f16 × every reference device, with a reduced
//!   set of switch combinations chosen so that every switch is both on and off for every head
//!   dim, and every tile shape (D, BR, BC, TR) of the full set appears (tiles depend only on the
//!   head dim, selective or not, and the device, and both selective and non-selective calls are
//!   in the set). At [`FULL_PRODUCT_HEAD_DIMS`] the full switch product is kept, so
//!   interactions between switches are compiled too. This is what the translation tests
//!   translate; `tests/translate.rs` checks the tile and switch claims against `Full`.

use std::collections::HashSet;

use selattn::kernels::backward::{BackwardPlan, Wanted};
use selattn::kernels::forward::Plan;
use selattn::kernels::KernelKey;
use selattn::spec::{Options, Path, Shape, Spec};
use selattn::Capabilities;
use selattn::DType;
use selattn::Switches;

/// How many switch combinations to enumerate (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Coverage {
    /// Every combination.
    Full,
    /// Every switch on and off and every tile, per head dim; the full product at a few head dims.
    Covering,
}

/// Head dims at which [`Coverage::Covering`] keeps every switch combination.
pub const FULL_PRODUCT_HEAD_DIMS: [u32; 1] = [64];

/// Every head dim the kernels support.
pub fn head_dims() -> impl Iterator<Item = u32> {
    (8..=256).step_by(8)
}

/// Element types a variant can store.
pub const ELEMENT_TYPES: [DType; 2] = [DType::F32, DType::F16];

/// One kernel family's enumeration: every key it can create on a device for an element type.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    /// Name, for reports.
    pub name: &'static str,
    /// The enumeration.
    pub variants: fn(&Capabilities, DType, Coverage) -> Vec<KernelKey>,
}

/// Every kernel family. A new family adds its line here.
pub const FAMILIES: &[Family] = &[
    Family {
        name: "attention, scalar path (forward, selective colsum, selective scan)",
        variants: attention_variants,
    },
    Family {
        name: "attention, cooperative-matrix path (coop forward, selective colsum, scan)",
        variants: coop_attention_variants,
    },
    Family {
        name: "backward, scalar path (prep, dkv, dq, fscan, selq, selk, finish, selective colsum, scan)",
        variants: backward_variants,
    },
    Family {
        name: "backward, cooperative-matrix path (coop dkv, coop dq, with the scalar entries around them)",
        variants: coop_backward_variants,
    },
];

/// One reference device: its name, workgroup memory in bytes, invocations per workgroup,
/// fixed subgroup size, and whether it reports 16x16x16 f16->f32 cooperative matrices.
pub type ReferenceLimits = (&'static str, u32, u32, u32, bool);

/// Devices whose limits decide tile choices: the WebGPU defaults, lavapipe/llvmpipe, NVIDIA
/// (Vulkan, without and with cooperative matrices).
pub const REFERENCE_LIMITS: [ReferenceLimits; 4] = [
    ("webgpu-default (16 KiB, 256)", 16 * 1024, 256, 4, false),
    (
        "lavapipe/llvmpipe (32 KiB, 1024)",
        32 * 1024,
        1024,
        8,
        false,
    ),
    ("nvidia (48 KiB, 1024)", 48 * 1024, 1024, 32, false),
    (
        "nvidia coop matrix (48 KiB, 1024)",
        48 * 1024,
        1024,
        32,
        true,
    ),
];

/// Synthetic [`Capabilities`] for each of [`REFERENCE_LIMITS`], with SHADER_F16 and subgroups.
pub fn reference_devices() -> Vec<Capabilities> {
    REFERENCE_LIMITS
        .iter()
        .map(|&(name, memory, invocations, subgroup, coop)| {
            let limits = wgpu::Limits {
                max_compute_workgroup_storage_size: memory,
                max_compute_invocations_per_workgroup: invocations,
                max_compute_workgroup_size_x: invocations,
                max_storage_buffers_per_shader_stage: selattn::kernels::STORAGE_BUFFERS_NEEDED,
                ..wgpu::Limits::defaults()
            };
            let mut features = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
            let mut props = Vec::new();
            if coop {
                // As the H200 reports: the coop kernel's subgroup-barrier form is covered.
                features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
                    | wgpu::Features::SUBGROUP_BARRIER;
                props.push(wgpu::CooperativeMatrixProperties {
                    m_size: 16,
                    n_size: 16,
                    k_size: 16,
                    ab_type: wgpu::CooperativeScalarType::F16,
                    cr_type: wgpu::CooperativeScalarType::F32,
                    saturating_accumulation: false,
                });
            }
            let mut caps = Capabilities::synthetic(name, features, &limits, subgroup, props);
            if coop {
                // The H200's backend: the coop kernel's Vulkan-only forms (vec4 staging) are covered.
                caps.info.backend = wgpu::Backend::Vulkan;
            }
            caps
        })
        .collect()
}

/// Every variant the library can create on the reference devices, each once, in a fixed order.
pub fn all_variants() -> Vec<KernelKey> {
    variants(Coverage::Full)
}

/// The reduced set described in the module docs.
pub fn covering_variants() -> Vec<KernelKey> {
    variants(Coverage::Covering)
}

/// Every family's variants on every reference device and element type, each once.
pub fn variants(coverage: Coverage) -> Vec<KernelKey> {
    let devices = reference_devices();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for family in FAMILIES {
        for caps in &devices {
            for elem in ELEMENT_TYPES {
                for key in (family.variants)(caps, elem, coverage) {
                    if seen.insert(key) {
                        out.push(key);
                    }
                }
            }
        }
    }
    out
}

/// A few combinations in which every switch is on at least once and off at least once.
pub fn covering() -> Vec<Switches> {
    let p = |causal, selective, tau, alpha, gate, kv_len, lse, f0, f_out| Switches {
        causal,
        selective,
        tau,
        alpha,
        gate,
        kv_len,
        f0,
        lse,
        f_out,
    };
    vec![
        Switches::NONE,
        p(false, false, true, false, true, false, true, false, false),
        p(true, false, false, true, false, true, false, false, false),
        p(true, false, true, true, true, true, true, false, false),
        p(true, true, false, false, false, false, false, false, false),
        Switches::ALL,
        p(true, true, false, false, false, true, false, true, false),
    ]
}

/// The spec of a small call with the switches `s` on `path` (selection head 0; the shape does
/// not change any key).
pub fn spec(s: &Switches, head_dim: u32, path: Path) -> Spec {
    let mut options = Options::new().path(path);
    options.causal = s.causal;
    if s.selective {
        options = options.selective(0);
    }
    Spec {
        shape: Shape::new(1, 2, 16, head_dim),
        options,
        present: *s,
    }
}

/// The attention call's kernels on the scalar path: forward, and with selective masking the
/// colsum and scan passes.
pub fn attention_variants(caps: &Capabilities, elem: DType, coverage: Coverage) -> Vec<KernelKey> {
    planned_variants(caps, elem, coverage, Path::Scalar)
}

/// The attention call's kernels on the cooperative-matrix path, where the device has it.
pub fn coop_attention_variants(
    caps: &Capabilities,
    elem: DType,
    coverage: Coverage,
) -> Vec<KernelKey> {
    planned_variants(caps, elem, coverage, Path::Coop)
}

/// The keys of every call the planner accepts on `path`, over every head dim and the
/// coverage's switch combinations.
fn planned_variants(
    caps: &Capabilities,
    elem: DType,
    coverage: Coverage,
    path: Path,
) -> Vec<KernelKey> {
    let all = Switches::all();
    let covering = covering();
    let mut out = Vec::new();
    for d in head_dims() {
        let switches = match coverage {
            Coverage::Covering if !FULL_PRODUCT_HEAD_DIMS.contains(&d) => &covering,
            _ => &all,
        };
        for s in switches {
            // A call the planner rejects on this device has no variant: nothing to enumerate.
            let Ok(resolved) = spec(s, d, path).validate() else {
                continue;
            };
            let Ok(plan) = Plan::new(caps, &resolved, elem) else {
                continue;
            };
            out.extend(plan.keys());
        }
    }
    out
}

/// The backward call's kernels (every gradient asked for, dF_out given with selective
/// masking). Its keys depend on the head dim, the device, the element type and the operator
/// switches, not on which gradients are asked for (those are run-time flags). With
/// [`Coverage::Covering`] each head dim gets the two extremes (non-causal with nothing optional;
/// causal selective with everything), which name every entry point and tile; the covering
/// switch set at [`FULL_PRODUCT_HEAD_DIMS`] toggles each switch.
pub fn backward_variants(caps: &Capabilities, elem: DType, coverage: Coverage) -> Vec<KernelKey> {
    backward_path_variants(caps, elem, coverage, Path::Scalar)
}

/// The backward call's kernels on the cooperative-matrix path, where the device has it (f16
/// storage, head dims that are multiples of 16 up to 128), with the same switch sets as
/// [`backward_variants`].
pub fn coop_backward_variants(
    caps: &Capabilities,
    elem: DType,
    coverage: Coverage,
) -> Vec<KernelKey> {
    backward_path_variants(caps, elem, coverage, Path::Coop)
}

fn backward_path_variants(
    caps: &Capabilities,
    elem: DType,
    coverage: Coverage,
    path: Path,
) -> Vec<KernelKey> {
    let all = Switches::all();
    let covering = covering();
    let extremes = [covering[0], covering[5]];
    let mut out = Vec::new();
    for d in head_dims() {
        let switches: &[Switches] = match coverage {
            Coverage::Full => &all,
            Coverage::Covering if FULL_PRODUCT_HEAD_DIMS.contains(&d) => &covering,
            Coverage::Covering => &extremes,
        };
        for s in switches {
            let Ok(resolved) = spec(s, d, path).validate() else {
                continue;
            };
            let wanted = Wanted {
                df_out: s.selective,
                ..Wanted::all(s.selective)
            };
            let Ok(plan) = BackwardPlan::new(caps, &resolved, elem, wanted) else {
                continue;
            };
            out.extend(plan.keys());
            // Enough query rows for the coop path's du scratch (coop_selq with DU, coop_selk_du).
            if path == Path::Coop && s.selective {
                let mut long = spec(s, d, path);
                long.shape = Shape::new(1, 2, 1024, d);
                if let Ok(plan) = long
                    .validate()
                    .and_then(|r| BackwardPlan::new(caps, &r, elem, wanted))
                {
                    for key in plan.keys() {
                        if !out.contains(&key) {
                            out.push(key);
                        }
                    }
                }
            }
        }
    }
    out
}

/// The KV-cache kernels (append, decode score, attend, merge) a device can create for an element
/// type, planned by [`decode::plan`](selattn::kernels::decode::plan) over every head dim and a
/// few row counts per workgroup (queries per step × GQA group) and switch combinations:
/// every switch on and off, every `rb` the planner can choose. Not part of [`FAMILIES`] (the
/// translation tests do not translate these yet); [`decode_cache_variants`] collects them over
/// the reference devices.
pub fn decode_variants(caps: &Capabilities, elem: DType) -> Vec<KernelKey> {
    use selattn::kernels::decode::{self, AppendConfig, DecodeShape};
    use selattn::kernels::Kernel;
    let mut out = Vec::new();
    let key = |kernel| KernelKey { kernel, elem };
    let wg = selattn::cache::append_threads(caps.max_invocations);
    // (tau, alpha, gate, lse, selective)
    let switches = [
        (false, false, false, false, false),
        (true, true, true, true, false),
        (false, false, false, false, true),
        (true, true, true, true, true),
    ];
    for d in head_dims() {
        for (gate, f) in [(false, false), (true, false), (false, true), (true, true)] {
            out.push(key(Kernel::CacheAppend(AppendConfig { d, wg, gate, f })));
        }
        // Segmented caches (sequences in several buffers): `put` reads only the gate switch,
        // `put_state` only F's.
        for x in [false, true] {
            let put = AppendConfig {
                d,
                wg,
                gate: x,
                f: false,
            };
            out.push(key(Kernel::CachePut(put)));
            let state = AppendConfig {
                d,
                wg,
                gate: false,
                f: x,
            };
            out.push(key(Kernel::CachePutState(state)));
        }
        out.push(key(Kernel::CacheCandidates(AppendConfig {
            d,
            wg,
            gate: false,
            f: false,
        })));
        for (group, n) in [(1, 1), (1, 2), (4, 8)] {
            let shape = DecodeShape {
                batch: 1,
                q_heads: group,
                kv_heads: 1,
                head_dim: d,
                n,
                capacity: 64,
                max_len: 64,
            };
            for (tau, alpha, gate, lse, sel) in switches {
                let features = selattn::Switches {
                    causal: sel,
                    selective: sel,
                    tau,
                    alpha,
                    gate,
                    lse,
                    ..selattn::Switches::NONE
                };
                let Ok(plan) = decode::plan(
                    caps,
                    shape,
                    elem == DType::F16,
                    1.0,
                    features,
                    0,
                    None,
                    None,
                    None,
                ) else {
                    continue;
                };
                if let Some(s) = plan.score {
                    out.push(key(Kernel::DecodeScore(s)));
                }
                out.push(key(Kernel::DecodeAttend(plan.attend)));
                out.push(key(Kernel::DecodeMerge(plan.merge)));
                // Segmented caches' merge over per-segment partials: the same specialisation.
                out.push(key(Kernel::CacheMergeSegments(plan.merge)));
            }
        }
    }
    // merge_partials (shaders/merge.wgsl): every fold kind.
    for (first, single) in [(true, false), (false, false), (true, true)] {
        let c = selattn::merge::MergePairConfig { wg, first, single };
        out.push(key(Kernel::MergePair(c)));
    }
    out
}

/// [`decode_variants`] on every reference device and element type, each once.
pub fn decode_cache_variants() -> Vec<KernelKey> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for caps in &reference_devices() {
        for elem in ELEMENT_TYPES {
            for key in decode_variants(caps, elem) {
                if seen.insert(key) {
                    out.push(key);
                }
            }
        }
    }
    out
}
