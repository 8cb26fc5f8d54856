//! Every pipeline variant (see `selattn_tools::variants`), with the exact `override` constants used at
//! run time, translated by naga to SPIR-V (Vulkan), MSL (Metal), HLSL (DX12) and GLSL (GL), so
//! the Metal and DX12 code paths are at least compiled in every run. SPIR-V is checked with
//! `spirv-val` and GLSL with `glslangValidator` when installed (a missing tool skips only its
//! check, with a warning). No GPU is needed.
//!
//! A failure lists every failing (variant, backend, error).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use selattn::kernels::{Kernel, KernelKey, Source};
use selattn::DType;
use selattn::Switches;
use selattn_tools::variants;

/// The SPIR-V version naga writes and the environment spirv-val checks it against: Vulkan 1.1
/// (SPIR-V 1.3), the oldest wgpu's Vulkan backend writes beyond 1.0 for.
const SPV_VERSION: (u8, u8) = (1, 3);
const SPV_ENV: &str = "vulkan1.1";
/// MSL version: 2.1 is the oldest wgpu's Metal backend maps to on current macOS and iOS;
/// `half` storage needs nothing newer.
const MSL_VERSION: (u8, u8) = (2, 1);
/// Cooperative-matrix variants: wgpu offers EXPERIMENTAL_COOPERATIVE_MATRIX on Vulkan (through
/// VK_KHR_cooperative_matrix, written here as SPIR-V 1.6 for Vulkan 1.3, as on the H100) and
/// Metal (simdgroup matrices, MSL 2.3+) only; they are not translated to HLSL or GLSL.
const COOP_SPV_VERSION: (u8, u8) = (1, 6);
const COOP_SPV_ENV: &str = "vulkan1.3";
const COOP_MSL_VERSION: (u8, u8) = (2, 3);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Backend {
    Spirv,
    Msl,
    Hlsl,
    Glsl,
}

/// A parsed and validated source, shared by every variant of it.
struct Parsed {
    module: naga::Module,
    info: ModuleInfo,
}

fn parse(text: &str) -> Result<Parsed, String> {
    let module = naga::front::wgsl::parse_str(text).map_err(|e| e.emit_to_string(text))?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .map_err(|e| e.emit_to_string(text))?;
    Ok(Parsed { module, info })
}

fn tool(name: &str) -> bool {
    Command::new(name).arg("--version").output().is_ok()
}

struct Tools {
    spirv_val: bool,
    /// Cooperative-matrix variants whose SPIR-V this spirv-val is too old to check.
    coop_spv_skipped: AtomicUsize,
    glslang: bool,
    dir: PathBuf,
}

/// Runs `cmd` on `path`; returns its output as an error when it fails.
fn check_with(cmd: &mut Command, path: &Path) -> Result<(), String> {
    let out = cmd.arg(path).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Translates one variant to every backend; returns (backend, error) for each failure, and
/// the GLSL file written for `glslangValidator` (checked later, many files per run, since
/// starting the tool costs far more than checking one shader).
fn translate(
    key: &KernelKey,
    parsed: &Parsed,
    tools: &Tools,
    n: usize,
) -> (Vec<(Backend, String)>, Option<PathBuf>) {
    let mut glsl_file = None;
    let mut fails = vec![];
    let constants: naga::back::PipelineConstants = key
        .constants()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let entry = key.entry();
    let stage = naga::ShaderStage::Compute;
    // The substitution wgpu does at pipeline creation, for this entry point only.
    let (module, info) = match naga::back::pipeline_constants::process_overrides(
        &parsed.module,
        &parsed.info,
        Some((stage, entry)),
        &constants,
    ) {
        Ok(x) => x,
        Err(e) => {
            let msg = format!("process_overrides: {e}");
            let all = [Backend::Spirv, Backend::Msl, Backend::Hlsl, Backend::Glsl];
            return (all.into_iter().map(|b| (b, msg.clone())).collect(), None);
        }
    };
    // Production shaders are built without bounds checks (naga's default policies are
    // `Unchecked`), so that is what is translated here.

    let coop = matches!(
        key.source(),
        Source::CoopForward | Source::CoopColsum | Source::CoopBackward
    );
    let (spv_version, spv_env, msl_version) = if coop {
        (COOP_SPV_VERSION, COOP_SPV_ENV, COOP_MSL_VERSION)
    } else {
        (SPV_VERSION, SPV_ENV, MSL_VERSION)
    };

    // SPIR-V.
    let spv_opts = spv::Options {
        lang_version: spv_version,
        flags: spv::WriterFlags::empty(),
        ..Default::default()
    };
    let spv_pipe = spv::PipelineOptions {
        shader_stage: stage,
        entry_point: entry.to_string(),
    };
    match spv::write_vec(&module, &info, &spv_opts, Some(&spv_pipe)) {
        Ok(words) if tools.spirv_val => {
            let path = tools.dir.join(format!("v{n}.spv"));
            let r = write_file(&path, bytemuck::cast_slice(&words)).and_then(|_| {
                check_with(
                    Command::new("spirv-val").args(["--target-env", spv_env]),
                    &path,
                )
            });
            match r {
                // SPIRV-Tools before mid-2023 (Debian 12 ships v2023.1) does not know
                // SPV_KHR_cooperative_matrix (CooperativeMatrixKHR is capability 6022): naga's
                // output is still written and checked by naga; only this validation is skipped.
                Err(e) if coop && e.contains("Invalid capability operand: 6022") => {
                    tools.coop_spv_skipped.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => fails.push((Backend::Spirv, format!("spirv-val: {e}"))),
                Ok(()) => {}
            }
        }
        Ok(_) => {}
        Err(e) => fails.push((Backend::Spirv, e.to_string())),
    }

    // MSL (Metal).
    let msl_opts = msl::Options {
        lang_version: msl_version,
        ..Default::default()
    };
    let msl_pipe = msl::PipelineOptions {
        entry_point: Some((stage, entry.to_string())),
        ..Default::default()
    };
    if let Err(e) = msl::write_string(&module, &info, &msl_opts, &msl_pipe) {
        fails.push((Backend::Msl, e.to_string()));
    }

    if coop {
        return (fails, None);
    }

    // HLSL (DX12): shader model 5.1 (FXC, what WARP and old drivers get) for f32; f16 needs
    // shader model 6.2 (DXC), which is also where wgpu offers SHADER_F16 on DX12.
    let hlsl_opts = hlsl::Options {
        shader_model: match key.elem {
            DType::F16 => hlsl::ShaderModel::V6_2,
            _ => hlsl::ShaderModel::V5_1,
        },
        ..Default::default()
    };
    let hlsl_pipe = hlsl::PipelineOptions {
        entry_point: Some((stage, entry.to_string())),
    };
    let mut hlsl_out = String::new();
    if let Err(e) =
        hlsl::Writer::new(&mut hlsl_out, &hlsl_opts, &hlsl_pipe).write(&module, &info, None)
    {
        fails.push((Backend::Hlsl, e.to_string()));
    }

    // GLSL 4.30 core (GL 4.3 is the first with compute shaders). GLSL has no f16 storage
    // without extensions wgpu's GL backend does not use, and wgpu never offers SHADER_F16 on
    // GL, so f16 variants cannot reach this backend.
    if key.elem != DType::F16 {
        let glsl_opts = glsl::Options {
            version: glsl::Version::Desktop(430),
            writer_flags: glsl::WriterFlags::empty(),
            ..Default::default()
        };
        let glsl_pipe = glsl::PipelineOptions {
            shader_stage: stage,
            entry_point: entry.to_string(),
            multiview: None,
        };
        let mut glsl_out = String::new();
        let written = glsl::Writer::new(
            &mut glsl_out,
            &module,
            &info,
            &glsl_opts,
            &glsl_pipe,
            naga::proc::BoundsCheckPolicies::default(),
        )
        .and_then(|mut w| w.write());
        match written {
            Ok(_) if tools.glslang => {
                let path = tools.dir.join(format!("v{n}.comp"));
                match write_file(&path, glsl_out.as_bytes()) {
                    Ok(()) => glsl_file = Some(path),
                    Err(e) => fails.push((Backend::Glsl, e)),
                }
            }
            Ok(_) => {}
            Err(e) => fails.push((Backend::Glsl, e.to_string())),
        }
    }
    (fails, glsl_file)
}

/// Checks GLSL files with one `glslangValidator` run; when that fails, file by file, so each
/// error names its variant. Returns (index into `files`, error).
fn check_glsl(files: &[PathBuf]) -> Vec<(usize, String)> {
    let mut cmd = Command::new("glslangValidator");
    cmd.args(files);
    let batch_ok = cmd.output().map(|o| o.status.success()).unwrap_or(false);
    if batch_ok {
        return vec![];
    }
    files
        .iter()
        .enumerate()
        .filter_map(|(i, f)| {
            check_with(&mut Command::new("glslangValidator"), f)
                .err()
                .map(|e| (i, e))
        })
        .collect()
}

/// Translates `keys` on every core; returns one line per failure.
fn translate_all(keys: &[KernelKey]) -> Vec<String> {
    // One folder per call: tests run in parallel in one process.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "selattn-translate-{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let tools = Tools {
        spirv_val: tool("spirv-val"),
        coop_spv_skipped: AtomicUsize::new(0),
        glslang: tool("glslangValidator"),
        dir: dir.clone(),
    };
    if !tools.spirv_val {
        eprintln!("WARNING: spirv-val not found: SPIR-V is written but not validated");
    }
    if !tools.glslang {
        eprintln!("WARNING: glslangValidator not found: GLSL is written but not validated");
    }
    // Parse and validate each distinct WGSL text once (the scalar families share one text per
    // element type; the cooperative-matrix template differs per head dim and switches).
    let mut texts = Vec::new();
    let mut parsed: HashMap<String, Parsed> = HashMap::new();
    let mut failures = vec![];
    for key in keys {
        let text = match key.wgsl() {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("{key:?} [WGSL]: {e}"));
                texts.push(String::new());
                continue;
            }
        };
        if !parsed.contains_key(&text) {
            match parse(&text) {
                Ok(p) => {
                    parsed.insert(text.clone(), p);
                }
                Err(err) => failures.push(format!("{key:?} [WGSL]: {err}")),
            }
        }
        texts.push(text);
    }
    if !failures.is_empty() {
        return failures;
    }
    let next = AtomicUsize::new(0);
    let out = Arc::new(Mutex::new(Vec::new()));
    let glsl = Arc::new(Mutex::new(Vec::new()));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(key) = keys.get(n) else { break };
                let p = &parsed[&texts[n]];
                let (fails, file) = translate(key, p, &tools, n);
                for (backend, err) in fails {
                    out.lock()
                        .unwrap()
                        .push(format!("{key:?} [{backend:?}]: {err}"));
                }
                if let Some(f) = file {
                    glsl.lock().unwrap().push((n, f));
                }
            });
        }
    });
    // GLSL: glslangValidator over chunks of files, one chunk per thread at a time.
    let glsl = glsl.lock().unwrap().clone();
    let chunks: Vec<_> = glsl.chunks(128).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                let Some(chunk) = chunks.get(c) else { break };
                let files: Vec<PathBuf> = chunk.iter().map(|(_, f)| f.clone()).collect();
                for (i, err) in check_glsl(&files) {
                    let key = &keys[chunk[i].0];
                    out.lock()
                        .unwrap()
                        .push(format!("{key:?} [Glsl]: glslangValidator: {err}"));
                }
            });
        }
    });
    std::fs::remove_dir_all(&dir).ok();
    let skipped = tools.coop_spv_skipped.load(Ordering::Relaxed);
    if skipped > 0 {
        eprintln!(
            "WARNING: spirv-val does not know SPV_KHR_cooperative_matrix: SPIR-V of {skipped} \
             cooperative-matrix variants written by naga but not validated (needs SPIRV-Tools \
             2023.2 or newer)"
        );
    }
    let mut v = out.lock().unwrap().clone();
    v.sort();
    v
}

#[test]
fn every_variant_translates_to_every_backend() {
    let keys = variants::covering_variants();
    let t = Instant::now();
    let failures = translate_all(&keys);
    eprintln!(
        "translated {} variants to SPIR-V, MSL, HLSL, GLSL in {:.1} s",
        keys.len(),
        t.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} translation failures (variant [backend]: error):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The selective cooperative-matrix kernels in the forms their knobs give back
/// (`SELATTN_COOP_ABLATE`: `sgprefix`, `selp`, `colkpwN`, `+cpre`), which the planner's defaults in the
/// covering set do not reach: the tile-wide prefix, the selection head's K staged through kbuf,
/// the carry prefetch, the scan in row parts, and the column sums at 1, 2, 8 and 16 key tiles per workgroup, per tile
/// and per 16 rows.
#[test]
fn selective_coop_knob_forms_translate() {
    let mut keys = Vec::new();
    for k in variants::covering_variants() {
        match k.kernel {
            Kernel::CoopForward(c) if c.features.selective => {
                // The opt-in carry prefetch (`+cpre`) with the defaults and without SELP.
                let cpre = c.sgprefix && c.nsel * (c.bc / c.nsel).div_ceil(c.sgs) <= 4;
                for (sgprefix, selp, cpre) in [
                    (false, false, false),
                    (false, c.selp, false),
                    (c.sgprefix, false, false),
                    (c.sgprefix, c.selp, cpre),
                    (c.sgprefix, false, cpre),
                ] {
                    keys.push(KernelKey {
                        kernel: Kernel::CoopForward(selattn::kernels::coop::CoopConfig {
                            sgprefix,
                            selp,
                            cpre,
                            ..c
                        }),
                        ..k
                    });
                }
            }
            // The scan in row parts (the default where 256 threads fit; `pscan` in the knob
            // gives the one-thread-per-column scan back).
            Kernel::SelScan(c) => keys.push(KernelKey {
                kernel: Kernel::SelScan(selattn::kernels::selective::ScanConfig {
                    wg: 256,
                    parts: 8,
                    ..c
                }),
                ..k
            }),
            Kernel::SelColsum(c) if c.coop_sgs > 0 => {
                for kpw in [1, 2, 8, 16] {
                    for sub16 in [false, true] {
                        keys.push(KernelKey {
                            kernel: Kernel::SelColsum(selattn::kernels::selective::ColsumConfig {
                                kpw,
                                sub16: sub16 && c.br > 16,
                                ..c
                            }),
                            ..k
                        });
                    }
                }
            }
            _ => {}
        }
    }
    keys.sort_by_key(|k| format!("{k:?}"));
    keys.dedup();
    assert!(
        !keys.is_empty(),
        "no selective coop variant in the covering set"
    );
    let failures = translate_all(&keys);
    eprintln!("translated {} selective coop knob forms", keys.len());
    assert!(
        failures.is_empty(),
        "{} of {} knob forms failed:\n{}",
        failures.len(),
        keys.len(),
        failures.join("\n")
    );
}

/// The cooperative-matrix backward kernels in the forms of their knobs that the planner's
/// defaults in the covering set do not reach: `SELATTN_BACKWARD_PIPE` (coop_dkv and coop_dq)
/// and `SELATTN_BACKWARD_DUP` (coop_selq_du and coop_selk_du, at 16- to 64-row tiles), beside
/// the planner's own form of the du readers (the DUP form by default; with
/// `SELATTN_BACKWARD_DUP=0`, as [`backward_coop_fallback_forms_translate`] runs it, the old one).
#[test]
fn backward_coop_knob_forms_translate() {
    use selattn::kernels::coop_backward::CoopEntry;
    let mut keys = Vec::new();
    for k in variants::covering_variants() {
        if let Kernel::CoopBackward(c) = k.kernel {
            let forms: Vec<_> = match c.entry {
                CoopEntry::Dkv | CoopEntry::Dq => {
                    vec![selattn::kernels::coop_backward::CoopBackwardConfig { pipe: true, ..c }]
                }
                CoopEntry::SelkDu | CoopEntry::SelqRead => std::iter::once(c)
                    .chain([16, 32, 64].into_iter().map(|bt| {
                        selattn::kernels::coop_backward::CoopBackwardConfig { bt, dup: true, ..c }
                    }))
                    .collect(),
                _ => vec![],
            };
            for c in forms {
                keys.push(KernelKey {
                    kernel: Kernel::CoopBackward(c),
                    ..k
                });
            }
        }
    }
    keys.sort_by_key(|k| format!("{k:?}"));
    keys.dedup();
    assert!(
        !keys.is_empty(),
        "no coop backward variant in the covering set"
    );
    if std::env::var("SELATTN_BACKWARD_DUP").as_deref() == Ok("0") {
        assert!(
            keys.iter()
                .any(|k| matches!(k.kernel, Kernel::CoopBackward(c)
                if matches!(c.entry, CoopEntry::SelkDu | CoopEntry::SelqRead) && !c.dup)),
            "SELATTN_BACKWARD_DUP=0 left no du reader in its old form"
        );
    }
    let failures = translate_all(&keys);
    eprintln!("translated {} coop backward knob forms", keys.len());
    assert!(
        failures.is_empty(),
        "{} of {} knob forms failed:\n{}",
        failures.len(),
        keys.len(),
        failures.join("\n")
    );
}

/// The du readers' old form (`SELATTN_BACKWARD_DUP=0`, the fallback of the default DUP form)
/// translates too: [`backward_coop_knob_forms_translate`] again in a child process with it.
#[test]
fn backward_coop_fallback_forms_translate() {
    common::rerun_with_env(
        &["backward_coop_knob_forms_translate"],
        &[("SELATTN_BACKWARD_DUP", "0")],
    );
}

/// Tiles (D, BR, BC, DN) of the forward kernel, (D, BR, BC, WG) of the colsum pass and
/// (D, BR, BC, subgroup size) of the cooperative-matrix kernel.
fn tiles(keys: &[KernelKey]) -> BTreeSet<(u8, u32, u32, u32, u32)> {
    keys.iter()
        .filter_map(|k| match k.kernel {
            Kernel::Forward(c) => Some((0, c.d, c.br, c.bc, c.dn)),
            Kernel::SelColsum(c) => Some((1, c.d, c.br, c.bc, c.wg)),
            Kernel::CoopForward(c) => Some((2, c.d, c.br, c.bc, c.sgs)),
            _ => None,
        })
        .collect()
}

/// The harness itself: a key the planner would never make (BR = 0 gives zero-sized
/// workgroup arrays) must come back as a failure naming the variant and the backends.
#[test]
fn a_bad_variant_is_reported_with_its_backend() {
    let good = variants::covering_variants()
        .into_iter()
        .find(|k| k.elem == DType::F32 && matches!(k.kernel, Kernel::Forward(_)))
        .expect("a forward f32 variant");
    let Kernel::Forward(mut c) = good.kernel else {
        unreachable!()
    };
    c.br = 0;
    let bad = KernelKey {
        kernel: Kernel::Forward(c),
        elem: DType::F32,
    };
    let failures = translate_all(&[good, bad]);
    let name = format!("{bad:?}");
    assert!(!failures.is_empty(), "BR = 0 translated cleanly");
    assert!(
        failures.iter().all(|f| f.starts_with(&name)),
        "a failure names another variant: {failures:?}"
    );
    for b in ["[Spirv]", "[Msl]", "[Hlsl]", "[Glsl]"] {
        assert!(
            failures.iter().any(|f| f.contains(b)),
            "no {b} failure: {failures:?}"
        );
    }
}

/// Reads one switch of a forward kernel's specialisation.
type Switch = fn(&selattn::kernels::forward::ForwardConfig) -> bool;

#[test]
fn covering_set_has_every_tile_switch_and_head_dim() {
    let full = variants::all_variants();
    let cover = variants::covering_variants();
    eprintln!(
        "{} variants in all, {} in the covering set",
        full.len(),
        cover.len()
    );
    // Every covering key is a real variant.
    let full_set: std::collections::HashSet<_> = full.iter().collect();
    let stray: Vec<_> = cover.iter().filter(|k| !full_set.contains(k)).collect();
    assert!(
        stray.is_empty(),
        "covering keys not in the full set: {stray:?}"
    );
    // Every tile of the full set is covered.
    let missing: Vec<_> = tiles(&full).difference(&tiles(&cover)).copied().collect();
    assert!(missing.is_empty(), "tiles not covered: {missing:?}");
    // Every scan pass specialisation.
    let scans = |keys: &[KernelKey]| -> BTreeSet<String> {
        keys.iter()
            .filter(|k| matches!(k.kernel, Kernel::SelScan(_)))
            .map(|k| format!("{k:?}"))
            .collect()
    };
    let missing: Vec<_> = scans(&full).difference(&scans(&cover)).cloned().collect();
    assert!(missing.is_empty(), "scan variants not covered: {missing:?}");
    // Every head dim × element type, with every forward switch both on and off.
    for d in variants::head_dims() {
        for elem in variants::ELEMENT_TYPES {
            let fwd: Vec<_> = cover
                .iter()
                .filter(|k| k.elem == elem)
                .filter_map(|k| match k.kernel {
                    Kernel::Forward(c) if c.d == d => Some(c),
                    _ => None,
                })
                .collect();
            let switches: [(&str, Switch); 7] = [
                ("causal", |c| c.features.causal),
                ("tau", |c| c.features.tau),
                ("alpha", |c| c.features.alpha),
                ("gate", |c| c.features.gate),
                ("kv_len", |c| c.features.kv_len),
                ("selective", |c| c.features.selective),
                ("lse", |c| c.features.lse),
            ];
            for (name, get) in switches {
                assert!(
                    fwd.iter().any(get) && fwd.iter().any(|c| !get(c)),
                    "D={d} {elem:?}: switch {name} not both on and off"
                );
            }
        }
    }
    // Both forms of the coop kernel's selection tile the planner picks (whole, and in two
    // column slices where only that fits, e.g. D64 at BC = 64) are in the covering set.
    for nsel in [1, 2] {
        assert!(
            cover.iter().any(|k| matches!(k.kernel,
                Kernel::CoopForward(c) if c.features.selective && c.nsel == nsel)),
            "no selective coop forward key with NSEL = {nsel}"
        );
    }
    // The softmax form the planner picks on the H200 (S kept in registers, four columns a step,
    // K/V/Q staged as vec4<f16>) is in the covering set, selective and not.
    for sel in [false, true] {
        assert!(
            cover.iter().any(|k| matches!(k.kernel,
                Kernel::CoopForward(c) if c.features.selective == sel && c.sm_keep && c.sm_quads
                    && c.kv4)),
            "no coop forward key with SM_KEEP and KV4 (selective {sel})"
        );
    }
    // With `+vpre` set (issue 11's candidate), the non-selective coop keys carry it and no
    // selective one does (the planner refuses it there).
    let ablate = std::env::var(selattn::kernels::coop::ABLATE_ENV).unwrap_or_default();
    if ablate.split(',').any(|w| w.trim() == "+vpre") {
        for sel in [false, true] {
            assert_eq!(
                cover.iter().any(|k| matches!(k.kernel,
                    Kernel::CoopForward(c) if c.features.selective == sel && c.vpre)),
                !sel,
                "VPRE on selective {sel} coop keys"
            );
        }
    }
    // The full enumeration really is every valid switch combination.
    assert_eq!(Switches::all().len(), 64 + 32 * 4);
}
