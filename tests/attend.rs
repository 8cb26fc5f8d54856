//! Tests of the `attend` example (examples/attend.rs), run as a user would: `.npy` files in, the
//! program run through `cargo run --release --example attend`, `.npy` files and exit status out.
//!
//! Cargo reuses the example when it is already built (`cargo test` builds examples); otherwise the
//! first test to get the build lock builds it once. The GPU run uses the adapter `Context::new`
//! picks (SELATTN_ADAPTER and WGPU_BACKEND are passed through): this tests the command line, the
//! kernels are tested on every adapter elsewhere.

use std::path::{Path, PathBuf};
use std::process::Command;

use selattn::reference::{self, HostInputs};
use selattn::reference_backward;
use selattn::Switches;
use selattn::{Options, Shape, Spec};
use selattn_tools::npy;
use selattn_tools::testing::{compare, random_inputs, Rng};

/// A fresh directory for one test's files, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("selattn-attend-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// Writes an f32 array and returns its path as an argument.
    fn f32(&self, name: &str, shape: &[u64], data: &[f32]) -> String {
        let p = self.path(name);
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        npy::write_f32(&p, &shape, data).expect("writing a fixture");
        arg(&p)
    }
    /// Writes an array of another dtype: numpy's header for `descr`, then `data` as given.
    fn raw(&self, name: &str, descr: &str, shape: &[usize], data: &[u8]) -> String {
        let n: usize = shape.iter().product();
        // The f32 header has the same length as any other three-character descr's.
        let mut bytes = npy::to_bytes_f32(shape, &vec![0.0; n]).expect("header");
        bytes.truncate(bytes.len() - 4 * n);
        let at = bytes
            .windows(5)
            .position(|w| w == b"'<f4'")
            .expect("descr in header");
        bytes[at + 1..at + 4].copy_from_slice(descr.as_bytes());
        bytes.extend_from_slice(data);
        let p = self.path(name);
        std::fs::write(&p, bytes).expect("writing a fixture");
        arg(&p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn arg(p: &Path) -> String {
    p.to_str().expect("temp path is UTF-8").to_string()
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn attend(args: &[String]) -> Run {
    let out = Command::new(env!("CARGO"))
        .args(["run", "--release", "--quiet", "--example", "attend", "--"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts a failure before any GPU work: the exit status, and exactly one line on stderr that
/// contains every one of `needles`.
fn assert_fails(case: &str, r: &Run, code: i32, needles: &[&str]) {
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        r.code,
        Some(code),
        "{case}: exit status; stderr:\n{}",
        r.stderr
    );
    assert_eq!(
        lines.len(),
        1,
        "{case}: expected one line on stderr, got:\n{}",
        r.stderr
    );
    assert!(
        lines[0].starts_with("attend: "),
        "{case}: stderr {:?}",
        lines[0]
    );
    for n in needles {
        assert!(
            lines[0].contains(n),
            "{case}: {:?} does not name {n:?}",
            lines[0]
        );
    }
    assert!(
        !r.stderr.contains("panicked"),
        "{case}: panicked:\n{}",
        r.stderr
    );
}

/// A small valid Q, K, V set; returns the arguments naming them.
fn qkv(dir: &TempDir, shape: &Shape) -> Vec<String> {
    input_args(dir, shape, &random_inputs(shape, Switches::NONE, 3))
}

/// Writes Q, K, V and every optional input `x` holds; returns the arguments naming them.
fn input_args(dir: &TempDir, shape: &Shape, x: &HostInputs) -> Vec<String> {
    let mut args = vec![
        "--q".into(),
        dir.f32("q.npy", &shape.q_dims(), &x.q),
        "--k".into(),
        dir.f32("k.npy", &shape.kv_dims(), &x.k),
        "--v".into(),
        dir.f32("v.npy", &shape.kv_dims(), &x.v),
    ];
    let optional = [
        ("tau", shape.row_dims(), &x.tau),
        ("alpha", shape.alpha_dims(), &x.alpha),
        ("gate", shape.gate_dims(), &x.gate),
        ("f0", shape.f_dims(), &x.f0),
    ];
    for (name, dims, data) in optional {
        if let Some(data) = data {
            args.push(format!("--{name}"));
            args.push(dir.f32(&format!("{name}.npy"), &dims, data));
        }
    }
    if let Some(kv_len) = &x.kv_len {
        // int32, as `np.array(.., dtype=np.int32)` saves it.
        let bytes: Vec<u8> = kv_len
            .iter()
            .flat_map(|&l| (l as i32).to_le_bytes())
            .collect();
        args.push("--kv-len".into());
        args.push(dir.raw("kv_len.npy", "<i4", &[shape.batch as usize], &bytes));
    }
    args
}

fn small() -> Shape {
    Shape::new(1, 2, 5, 8)
}

/// Every input and option at once, f32, causal and selective: the outputs read back must match
/// the f64 reference computed here, and `--check` must agree.
#[test]
fn f32_causal_selective_every_option_matches_reference() {
    let dir = TempDir::new("every-option");
    // GQA, Nq < Nk, lengths that are no tile multiple, start inside the keys.
    let shape = Shape::new(2, 4, 12, 16).with_kv_heads(2).with_q_len(7);
    let mut x = random_inputs(&shape, Switches::ALL, 11);
    x.f0 = Some(Rng::new(12).range(0.0, 2.0, (shape.batch * shape.k_len) as usize));
    let options = Options::causal().selective(1).scale(0.3).start(4);
    let spec = Spec {
        shape,
        options,
        present: x.present(true),
    };
    let want = reference::attention(&spec, &x).expect("reference");

    let every = [
        x.tau.is_some(),
        x.alpha.is_some(),
        x.gate.is_some(),
        x.kv_len.is_some(),
    ];
    assert!(every.iter().all(|&on| on), "every optional input is on");
    let mut args = input_args(&dir, &shape, &x);
    let (o, lse, f_out) = (dir.path("o.npy"), dir.path("lse.npy"), dir.path("f.npy"));
    for a in [
        "--causal",
        "--selective",
        "1",
        "--scale",
        "0.3",
        "--start",
        "4",
        "--path",
        "auto",
        "--check",
        "--out",
        &arg(&o),
        "--lse",
        &arg(&lse),
        "--f-out",
        &arg(&f_out),
    ] {
        args.push(a.to_string());
    }
    let r = attend(&args);
    assert_eq!(
        r.code,
        Some(0),
        "attend failed:\n{}\n{}",
        r.stdout,
        r.stderr
    );
    assert!(
        r.stderr.contains("adapter: "),
        "adapter not named:\n{}",
        r.stderr
    );
    for what in ["check O:", "check LSE:", "check F_out:"] {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.starts_with(what) && l.ends_with(": ok")),
            "--check did not report {what} ok:\n{}",
            r.stdout
        );
    }

    for (name, path, dims, reference) in [
        ("O", &o, shape.q_dims(), &want.o),
        ("LSE", &lse, shape.row_dims(), &want.lse),
        ("F_out", &f_out, shape.f_dims(), &want.f_out),
    ] {
        let arr = npy::read(path).expect("reading an output");
        let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        assert_eq!(arr.shape, dims, "{name}: shape");
        assert_eq!(arr.dtype(), npy::NpyDtype::F32, "{name}: dtype");
        let got = arr.into_f32().expect("f32");
        let c = compare(&got, reference, 1e-5, 1e-5);
        assert!(
            c.bad == 0 && c.rel_norm < 1e-5,
            "{name} {shape:?}: max abs {:.3e} at {}, norm-wise {:.3e}, {} bad, {} NaN",
            c.max_abs,
            c.at,
            c.rel_norm,
            c.bad,
            c.nan
        );
    }
}

/// The backward pass through the command line: causal, selective, tau, alpha, gate and F0 on,
/// dO and dF_out given, every gradient written. Each gradient read back must match the f64
/// reference backward computed here, and `--check` must agree.
#[test]
fn gradients_match_reference_backward() {
    let dir = TempDir::new("gradients");
    let shape = Shape::new(1, 4, 9, 8).with_kv_heads(2).with_q_len(6);
    let mut x = random_inputs(&shape, Switches::ALL, 21);
    x.kv_len = None;
    x.f0 = Some(Rng::new(22).range(0.0, 2.0, (shape.batch * shape.k_len) as usize));
    let mut rng = Rng::new(23);
    let d_o = rng.normals(shape.q_dims().iter().product::<u64>() as usize);
    let df_out = rng.normals(shape.f_dims().iter().product::<u64>() as usize);
    let options = Options::causal().selective(1);
    let spec = Spec {
        shape,
        options,
        present: x.present(true),
    };
    let want = reference_backward::backward(&spec, &x, &d_o, Some(&df_out)).expect("reference");

    let mut args = input_args(&dir, &shape, &x);
    args.extend([
        "--grad-o".into(),
        dir.f32("do.npy", &shape.q_dims(), &d_o),
        "--grad-f-out".into(),
        dir.f32("dfout.npy", &shape.f_dims(), &df_out),
    ]);
    for a in ["--causal", "--selective", "1", "--check", "--out"] {
        args.push(a.to_string());
    }
    args.push(arg(&dir.path("o.npy")));
    let grads = [
        ("dq", shape.q_dims(), &want.dq),
        ("dk", shape.kv_dims(), &want.dk),
        ("dv", shape.kv_dims(), &want.dv),
        ("dtau", shape.row_dims(), &want.dtau),
        ("dalpha", shape.alpha_dims(), &want.dalpha),
        ("dgate", shape.gate_dims(), &want.dgate),
        ("df0", shape.f_dims(), &want.df0),
    ];
    for (flag, _, _) in &grads {
        args.push(format!("--{flag}"));
        args.push(arg(&dir.path(&format!("{flag}.npy"))));
    }
    let r = attend(&args);
    assert_eq!(
        r.code,
        Some(0),
        "attend failed:\n{}\n{}",
        r.stdout,
        r.stderr
    );
    for what in ["dQ", "dK", "dV", "dtau", "dalpha", "dgate", "dF0"] {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.starts_with(&format!("check {what}:")) && l.ends_with(": ok")),
            "--check did not report {what} ok:\n{}",
            r.stdout
        );
    }
    for (flag, dims, reference) in grads {
        let arr = npy::read(dir.path(&format!("{flag}.npy"))).expect("reading a gradient");
        let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        assert_eq!(arr.shape, dims, "{flag}: shape");
        let got = arr.into_f32().expect("f32");
        // As tests/backward.rs: dalpha sums over every row of a head, 10x the bound.
        let tol = if flag == "dalpha" { 1e-4 } else { 1e-5 };
        let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let c = compare(&got, reference, 20.0 * tol * scale, 20.0 * tol);
        assert!(
            c.bad == 0 && c.nan == 0 && c.rel_norm < tol,
            "{flag} {shape:?}: max abs {:.3e} at {}, norm-wise {:.3e}, {} bad, {} NaN",
            c.max_abs,
            c.at,
            c.rel_norm,
            c.bad,
            c.nan
        );
    }
}

#[test]
fn gradient_output_without_grad_o_is_a_usage_error() {
    let dir = TempDir::new("grad-without-do");
    let mut args = qkv(&dir, &small());
    let dq = dir.path("dq.npy");
    args.extend([
        "--out".into(),
        arg(&dir.path("o.npy")),
        "--dq".into(),
        arg(&dq),
    ]);
    let r = attend(&args);
    assert_fails("--dq without --grad-o", &r, 2, &["--dq", "--grad-o"]);
    assert!(!dq.exists(), "gradient written after a usage error");
}

#[test]
fn gradient_output_naming_an_input_is_refused() {
    let dir = TempDir::new("grad-clobber");
    let shape = small();
    let mut args = qkv(&dir, &shape);
    let k_before = std::fs::read(dir.path("k.npy")).expect("read k");
    let d_o = Rng::new(5).normals(shape.q_dims().iter().product::<u64>() as usize);
    args.extend([
        "--out".into(),
        arg(&dir.path("o.npy")),
        "--grad-o".into(),
        dir.f32("do.npy", &shape.q_dims(), &d_o),
        "--dk".into(),
        arg(&dir.path("k.npy")),
    ]);
    let r = attend(&args);
    assert_fails("--dk naming --k", &r, 1, &["--dk", "--k", "same file"]);
    assert_eq!(std::fs::read(dir.path("k.npy")).expect("read k"), k_before);
    assert!(!dir.path("o.npy").exists(), "output written after an error");
}

#[test]
fn garbage_file_is_named() {
    let dir = TempDir::new("garbage");
    let mut args = qkv(&dir, &small());
    let junk = dir.path("junk.npy");
    std::fs::write(&junk, b"\x00\x01 this is not numpy").expect("write");
    args[5] = arg(&junk);
    args.extend(["--out".into(), arg(&dir.path("o.npy"))]);
    let r = attend(&args);
    assert_fails(
        "garbage --v",
        &r,
        1,
        &["--v", "junk.npy", "not a .npy file"],
    );
    assert!(!dir.path("o.npy").exists(), "output written after an error");
}

#[test]
fn float64_file_is_refused() {
    let dir = TempDir::new("float64");
    let shape = small();
    let mut args = qkv(&dir, &shape);
    let x = random_inputs(&shape, Switches::NONE, 3);
    let dims: Vec<usize> = shape.q_dims().iter().map(|&d| d as usize).collect();
    let bytes: Vec<u8> = x.q.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect();
    args[1] = dir.raw("q64.npy", "<f8", &dims, &bytes);
    args.extend(["--out".into(), arg(&dir.path("o.npy"))]);
    let r = attend(&args);
    assert_fails("float64 --q", &r, 1, &["--q", "q64.npy", "<f8"]);
}

#[test]
fn int_tensor_is_refused() {
    let dir = TempDir::new("int-tau");
    let shape = small();
    let mut args = qkv(&dir, &shape);
    let n = (shape.batch * shape.q_heads * shape.q_len) as usize;
    let tau = dir.raw(
        "tau_i4.npy",
        "<i4",
        &[1, 2, 5],
        &vec![1i32; n]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    args.extend(["--tau".into(), tau, "--out".into(), arg(&dir.path("o.npy"))]);
    let r = attend(&args);
    assert_fails("int32 --tau", &r, 1, &["--tau", "tau_i4.npy", "i32"]);
}

#[test]
fn wrong_head_dim_in_k_is_refused() {
    let dir = TempDir::new("k-dim");
    let shape = small();
    let mut args = qkv(&dir, &shape);
    let bad = Shape::new(1, 2, 5, 16);
    let x = random_inputs(&bad, Switches::NONE, 4);
    args[3] = dir.f32("k16.npy", &bad.kv_dims(), &x.k);
    args.extend(["--out".into(), arg(&dir.path("o.npy"))]);
    let r = attend(&args);
    assert_fails(
        "K with D=16 against Q with D=8",
        &r,
        1,
        &["--k", "k16.npy", "(1, 2, 5, 16)"],
    );
}

#[test]
fn wrong_gate_shape_is_refused() {
    let dir = TempDir::new("gate-shape");
    let shape = small();
    let mut args = qkv(&dir, &shape);
    let gate = dir.f32("gate.npy", &[1, 2, 4], &[0.5; 8]);
    args.extend([
        "--gate".into(),
        gate,
        "--out".into(),
        arg(&dir.path("o.npy")),
    ]);
    let r = attend(&args);
    assert_fails(
        "gate [1,2,4] for Nk=5",
        &r,
        1,
        &["--gate", "(1, 2, 4)", "(1, 2, 5)"],
    );
}

#[test]
fn missing_q_is_a_usage_error() {
    let dir = TempDir::new("missing-q");
    let mut args = qkv(&dir, &small());
    args.drain(0..2);
    args.extend(["--out".into(), arg(&dir.path("o.npy"))]);
    let r = attend(&args);
    assert_fails("no --q", &r, 2, &["--q", "missing"]);
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let dir = TempDir::new("unknown-flag");
    let mut args = qkv(&dir, &small());
    args.extend(["--out".into(), arg(&dir.path("o.npy")), "--casual".into()]);
    let r = attend(&args);
    assert_fails("--casual", &r, 2, &["unknown flag --casual"]);
}

#[test]
fn selective_without_causal_is_refused() {
    let dir = TempDir::new("selective-noncausal");
    let mut args = qkv(&dir, &small());
    args.extend([
        "--selective".into(),
        "0".into(),
        "--out".into(),
        arg(&dir.path("o.npy")),
    ]);
    let r = attend(&args);
    assert_fails(
        "--selective without --causal",
        &r,
        1,
        &["--selective", "causal"],
    );
}

// ---- Hostile paths and files: one line, exit 1, no existing file touched -----------------------

/// An existing output holding `SENTINEL`, to check that a failed run leaves it as it was.
const SENTINEL: &[u8] = b"an existing file that a failed run must not touch";

fn sentinel(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.path(name);
    std::fs::write(&p, SENTINEL).expect("writing a sentinel");
    p
}

/// Every file of `dir` except those named in `keep` is gone (no temporary file left behind).
fn only_files(dir: &TempDir, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(&dir.0)
        .expect("listing the temp dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(names, want, "files left in the directory");
}

#[test]
fn out_naming_an_input_is_refused() {
    let dir = TempDir::new("out-is-q");
    let args0 = qkv(&dir, &small());
    let q_before = std::fs::read(dir.path("q.npy")).expect("read q");
    // The same file spelled differently: `dir/./q.npy`.
    let spelled = format!("{}/./q.npy", dir.0.display());
    let mut args = args0.clone();
    args.extend(["--out".into(), spelled]);
    let r = attend(&args);
    assert_fails("--out naming --q", &r, 1, &["--out", "--q", "same file"]);
    assert_eq!(std::fs::read(dir.path("q.npy")).expect("read q"), q_before);

    // A hard link to K is the same file too.
    std::fs::hard_link(dir.path("k.npy"), dir.path("k-link.npy")).expect("hard link");
    let mut args = args0;
    args.extend(["--out".into(), arg(&dir.path("k-link.npy"))]);
    let r = attend(&args);
    assert_fails(
        "--out a hard link to --k",
        &r,
        1,
        &["--out", "--k", "same file"],
    );
    only_files(&dir, &["q.npy", "k.npy", "v.npy", "k-link.npy"]);
}

#[test]
fn two_outputs_naming_one_file_are_refused() {
    let dir = TempDir::new("lse-is-out");
    let mut args = qkv(&dir, &small());
    let o = sentinel(&dir, "o.npy");
    args.extend([
        "--out".into(),
        arg(&o),
        "--lse".into(),
        format!(
            "{}/../{}/o.npy",
            dir.0.display(),
            dir.0.file_name().unwrap().to_string_lossy()
        ),
    ]);
    let r = attend(&args);
    assert_fails(
        "--lse naming --out",
        &r,
        1,
        &["--lse", "--out", "same file"],
    );
    assert_eq!(std::fs::read(&o).expect("read o"), SENTINEL);
}

#[test]
fn endless_device_is_refused_by_its_first_bytes() {
    let dir = TempDir::new("urandom");
    let mut args = qkv(&dir, &small());
    args[1] = "/dev/urandom".into();
    let o = sentinel(&dir, "o.npy");
    args.extend(["--out".into(), arg(&o)]);
    let r = attend(&args);
    assert_fails(
        "--q /dev/urandom",
        &r,
        1,
        &["--q", "/dev/urandom", "not a .npy file"],
    );
    assert_eq!(std::fs::read(&o).expect("read o"), SENTINEL);
}

#[test]
fn header_promising_more_than_the_file_holds_is_refused() {
    let dir = TempDir::new("huge-header");
    let mut args = qkv(&dir, &small());
    // A header for 64 GiB of f32 and 16 bytes of data: refused from the file's size, before
    // anything is sized from the header.
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 1073741824, 8), }\n";
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(dir.path("huge.npy"), &bytes).expect("write");
    args[1] = arg(&dir.path("huge.npy"));
    let o = sentinel(&dir, "o.npy");
    args.extend(["--out".into(), arg(&o)]);
    let r = attend(&args);
    assert_fails(
        "--q with a 64 GiB header",
        &r,
        1,
        &["--q", "huge.npy", "truncated"],
    );
    assert_eq!(std::fs::read(&o).expect("read o"), SENTINEL);
}

/// The LSE cannot be written (its temporary name is too long for the file system) after O was:
/// O's target keeps its old contents and no temporary file is left.
#[test]
fn failed_write_of_a_later_output_leaves_earlier_ones_untouched() {
    let dir = TempDir::new("late-failure");
    let mut args = qkv(&dir, &small());
    let o = sentinel(&dir, "o.npy");
    // 250 bytes is a valid name; with the temporary prefix and suffix it is over 255.
    let long = format!("{}.npy", "l".repeat(246));
    args.extend([
        "--out".into(),
        arg(&o),
        "--lse".into(),
        arg(&dir.path(&long)),
    ]);
    let r = attend(&args);
    assert_eq!(r.code, Some(1), "exit status; stderr:\n{}", r.stderr);
    let last = r.stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("attend: --lse"), "stderr:\n{}", r.stderr);
    assert_eq!(std::fs::read(&o).expect("read o"), SENTINEL);
    only_files(&dir, &["q.npy", "k.npy", "v.npy", "o.npy"]);
}
