//! Writes every shader variant the library can create: each distinct final WGSL text once, and a
//! JSON list of the variants, each with its text, entry point, element type and exact `override`
//! constants. Run your platform's WGSL compiler on exactly what selattn ships, or attach the
//! folder to a bug report.
//!
//! `cargo run --release --example shaders -- [FOLDER] [--all]`
//!
//! FOLDER defaults to `target/shaders`. Variants are those of [`variants::covering_variants`]
//! (every tile shape and every switch on and off per head dim, on the reference devices) plus
//! the KV-cache kernels of [`variants::decode_cache_variants`]; `--all` writes
//! [`variants::all_variants`] instead of the covering set (tens of thousands).
//!
//! `variants.json` is `{"texts": {...}, "variants": [...]}`; each variant has `label` (the wgpu
//! label the library gives the pipeline), `text` (a file in the folder), `entry`, `elem`,
//! `coop` (needs `wgpu_cooperative_matrix`, naga only), `f16` (needs `shader-f16`),
//! `workgroup_bytes` and `invocations` (what the pipeline needs of the device's limits) and
//! `constants` (name → number).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use selattn::kernels::{Kernel, KernelKey};
use selattn::DType;
use selattn_tools::variants;

/// Workgroup memory and invocations a variant needs.
fn needs(key: &KernelKey) -> (u64, u32) {
    match key.kernel {
        Kernel::Forward(c) => (c.workgroup_bytes(), c.threads()),
        Kernel::SelColsum(c) => (c.workgroup_bytes(), c.wg),
        Kernel::SelScan(c) => (0, c.wg),
        Kernel::CoopForward(c) => (c.workgroup_bytes(), c.threads()),
        Kernel::CacheAppend(c)
        | Kernel::CacheCandidates(c)
        | Kernel::CachePut(c)
        | Kernel::CachePutState(c) => (0, c.wg),
        Kernel::CacheMergeSegments(c) => (0, c.wg),
        Kernel::DecodeScore(c) => (0, c.wg),
        Kernel::DecodeAttend(c) => (c.workgroup_bytes(), c.wg),
        Kernel::DecodeMerge(c) => (0, c.wg),
        Kernel::MergePair(c) => (0, c.wg),
        Kernel::Backward(c) => (c.workgroup_bytes(), c.wg),
        Kernel::CoopBackward(c) => (c.workgroup_bytes(), c.threads()),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut dir = PathBuf::from("target/shaders");
    let mut all = false;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--all" => all = true,
            "-h" | "--help" => {
                println!("usage: shaders [FOLDER] [--all]   (FOLDER defaults to target/shaders)");
                return Ok(());
            }
            _ => dir = PathBuf::from(a),
        }
    }
    let mut keys = if all {
        variants::all_variants()
    } else {
        variants::covering_variants()
    };
    keys.extend(variants::decode_cache_variants());
    std::fs::create_dir_all(&dir)?;

    // Distinct texts, named after their source and element type (and a counter when a template
    // expands to several texts, as the cooperative-matrix kernel does per head dim).
    let mut texts: BTreeMap<String, String> = BTreeMap::new(); // text -> file name
    let mut json = String::from("{\n  \"variants\": [\n");
    for (i, key) in keys.iter().enumerate() {
        let text = key.wgsl()?;
        let n = texts.len();
        let file = texts
            .entry(text.clone())
            .or_insert_with(|| {
                let elem = match key.elem {
                    DType::F16 => "f16",
                    _ => "f32",
                };
                format!("{n:02}-{:?}-{elem}.wgsl", key.source()).to_lowercase()
            })
            .clone();
        let coop = matches!(key.kernel, Kernel::CoopForward(_) | Kernel::CoopBackward(_));
        let (wg_bytes, invocations) = needs(key);
        let mut constants = String::new();
        for (j, (name, value)) in key.constants().iter().enumerate() {
            let sep = if j == 0 { "" } else { ", " };
            write!(constants, "{sep}{}: {value}", json_string(name))?;
        }
        let sep = if i + 1 == keys.len() { "" } else { "," };
        writeln!(
            json,
            "    {{\"label\": {}, \"text\": {}, \"entry\": {}, \"elem\": {}, \"coop\": {coop}, \
             \"f16\": {}, \"workgroup_bytes\": {wg_bytes}, \"invocations\": {invocations}, \
             \"constants\": {{{constants}}}}}{sep}",
            json_string(&format!("{key:?}")),
            json_string(&file),
            json_string(key.entry()),
            json_string(&format!("{:?}", key.elem).to_lowercase()),
            coop || key.elem == DType::F16,
        )?;
    }
    json.push_str("  ]\n}\n");
    for (text, file) in &texts {
        std::fs::write(dir.join(file), text)?;
    }
    std::fs::write(dir.join("variants.json"), json)?;
    println!(
        "{} variants, {} distinct WGSL texts -> {}",
        keys.len(),
        texts.len(),
        dir.display()
    );
    Ok(())
}

/// A JSON string literal for `s`.
fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}
