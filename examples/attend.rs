//! Attention over `.npy` files: a command-line front for Python users and for checking the
//! kernels from outside. Reads Q, K, V and the optional inputs, runs one call on the GPU, writes
//! O (and LSE, F_out) as f32 `.npy`, and with `--check` compares against the f64 CPU reference.
//! Given the upstream gradient (`--grad-o`, and `--grad-f-out` with selective masking) it also
//! runs the backward pass and writes the gradients asked for (`--dq --dk --dv --dtau --dalpha
//! --dgate --df0`), which `--check` compares against the f64 reference backward.
//!
//! ```text
//! cargo run --release --example attend -- --q q.npy --k k.npy --v v.npy --causal --out o.npy
//! cargo run --release --example attend -- --help
//! ```
//!
//! `examples/attend_check.py` drives it from NumPy. Errors are one line on stderr; the exit status
//! is 2 for a usage error (unknown or missing flag, unparsable value) and 1 for anything else
//! (unreadable file, wrong dtype or shape, an invalid call, no GPU, a failed `--check`).
//!
//! It never loses a file: an output path that names an input or another output (compared as
//! canonical paths, so `./q.npy` is `q.npy`) is refused before anything is read; each `.npy`
//! header is checked before its data is read; outputs are written to temporary files beside
//! their targets and renamed into place only once everything (including `--check`) succeeded,
//! so a failed run leaves every existing file as it was.
//!
//! The command line is parsed with clap; its contract (tested in `tests/attend.rs`) is a one-line
//! error naming the flag, so clap's multi-line usage errors are cut to their first line (and
//! `--help` prints clap's full help).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use selattn::reference::{self, HostInputs, HostOutputs};
use selattn::reference_backward;
use selattn::spec::check_kv_len;
use selattn::{
    Context, DType, Error, Grads, Options, Outputs, Path as KernelPath, Shape, Spec, Switches,
};
use selattn_tools::npy::{self, NpyArray, NpyError};
use selattn_tools::testing::{compare, round_f16, Cmp, DeviceInputs};

/// f32 storage: norm-wise relative error bound (DESIGN.md §4), for O, LSE and F_out.
const F32_NORM_TOL: f64 = 1e-5;
/// f16 storage of O: norm-wise relative error bound (DESIGN.md §4).
const F16_NORM_TOL: f64 = 5e-3;
/// Element-wise bound passed to `compare`, only to count outliers in the report; the pass/fail
/// decision is the norm-wise bound above, as the command-line contract says.
const ELEM_TOL: f64 = 1e-4;

/// Why the program stops: the message is one line, the kind decides the exit status.
#[derive(Debug)]
enum Fail {
    /// Bad command line: exit 2.
    Usage(String),
    /// Anything else: exit 1.
    Run(String),
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Usage(m) => write!(f, "{m} (see --help)"),
            Fail::Run(m) => f.write_str(m),
        }
    }
}

fn main() -> ExitCode {
    match parse(std::env::args_os()) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(a)) => match run(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Err(e) => fail(&e),
    }
}

fn fail(e: &Fail) -> ExitCode {
    // Messages quote file names and library errors, which are single lines; make sure anyway.
    let line = e.to_string().replace('\n', " ");
    eprintln!("attend: {line}");
    ExitCode::from(match e {
        Fail::Usage(_) => 2,
        Fail::Run(_) => 1,
    })
}

// ---- Command line ------------------------------------------------------------------------------

/// Runs selattn's fused attention on .npy files (little-endian, C order) and writes O as f32
/// .npy; optionally its backward pass.
#[derive(clap::Parser, Debug)]
#[command(
    name = "attend",
    allow_negative_numbers = true,
    override_usage = "attend --q Q.npy --k K.npy --v V.npy --out O.npy [options]",
    after_help = "Inputs are float32 (float16 is accepted and widened); outputs are float32.\n\
                  The adapter is picked as in the library (SELATTN_ADAPTER, WGPU_BACKEND) and \
                  named on stderr.\nExit status: 0 ok, 1 error or failed check, 2 usage error."
)]
struct Cli {
    /// Queries [B, Hq, Nq, D] (required).
    #[arg(long, value_name = "FILE", help_heading = "Inputs")]
    q: Option<PathBuf>,
    /// Keys [B, Hkv, Nk, D] (Hq a multiple of Hkv; required).
    #[arg(long, value_name = "FILE", help_heading = "Inputs")]
    k: Option<PathBuf>,
    /// Values [B, Hkv, Nk, D] (required).
    #[arg(long, value_name = "FILE", help_heading = "Inputs")]
    v: Option<PathBuf>,
    /// Per-query temperature [B, Hq, Nq].
    #[arg(long, value_name = "FILE", help_heading = "Inputs")]
    tau: Option<PathBuf>,
    /// Positional temperature [Hq].
    #[arg(long, value_name = "FILE", help_heading = "Inputs")]
    alpha: Option<PathBuf>,
    /// Per-key value gate [B, Hkv, Nk].
    #[arg(long, value_name = "FILE", help_heading = "Inputs")]
    gate: Option<PathBuf>,
    /// Valid keys per batch [B] (int32, int64 or uint32).
    #[arg(long, value_name = "FILE", help_heading = "Inputs")]
    kv_len: Option<PathBuf>,
    /// Selective state carried in [B, Nk] (needs --selective).
    #[arg(long, value_name = "FILE", help_heading = "Inputs")]
    f0: Option<PathBuf>,
    /// Mask keys after each query's position.
    #[arg(long)]
    causal: bool,
    /// Selective masking with this selection head (needs --causal).
    #[arg(long, value_name = "HEAD")]
    selective: Option<u32>,
    /// Logit scale (default 1/sqrt(D)).
    #[arg(long, value_name = "X")]
    scale: Option<f32>,
    /// Position of the first query (default Nk - Nq).
    #[arg(long, value_name = "N")]
    start: Option<u32>,
    /// Store Q, K, V, O (and dO, dQ, dK, dV) as f16 on the GPU (needs SHADER_F16).
    #[arg(long)]
    f16: bool,
    /// Kernel path.
    #[arg(long, value_enum, default_value = "auto")]
    path: PathArg,
    /// Also run the f64 CPU reference (and reference backward) and print the errors; exit 1 if
    /// a norm-wise relative error exceeds 1e-5 (with --f16: 5e-3 for O and every gradient;
    /// dalpha 10x either).
    #[arg(long)]
    check: bool,
    /// O [B, Hq, Nq, D] (required).
    #[arg(long, value_name = "FILE", help_heading = "Outputs")]
    out: Option<PathBuf>,
    /// LSE [B, Hq, Nq] (natural log; -inf for rows with no allowed key).
    #[arg(long, value_name = "FILE", help_heading = "Outputs")]
    lse: Option<PathBuf>,
    /// F_out [B, Nk] (needs --selective).
    #[arg(long, value_name = "FILE", help_heading = "Outputs")]
    f_out: Option<PathBuf>,
    /// Upstream gradient dO [B, Hq, Nq, D]: runs the backward pass.
    #[arg(long, value_name = "FILE", help_heading = "Backward")]
    grad_o: Option<PathBuf>,
    /// Upstream gradient dF_out [B, Nk] (needs --selective and --grad-o; default zero).
    #[arg(long, value_name = "FILE", help_heading = "Backward")]
    grad_f_out: Option<PathBuf>,
    /// dQ [B, Hq, Nq, D] (needs --grad-o).
    #[arg(long, value_name = "FILE", help_heading = "Backward")]
    dq: Option<PathBuf>,
    /// dK [B, Hkv, Nk, D] (needs --grad-o).
    #[arg(long, value_name = "FILE", help_heading = "Backward")]
    dk: Option<PathBuf>,
    /// dV [B, Hkv, Nk, D] (needs --grad-o).
    #[arg(long, value_name = "FILE", help_heading = "Backward")]
    dv: Option<PathBuf>,
    /// dtau [B, Hq, Nq] (at tau = 1 without --tau; needs --grad-o).
    #[arg(long, value_name = "FILE", help_heading = "Backward")]
    dtau: Option<PathBuf>,
    /// dalpha [Hq] (at alpha = 0 without --alpha; needs --grad-o).
    #[arg(long, value_name = "FILE", help_heading = "Backward")]
    dalpha: Option<PathBuf>,
    /// dgate [B, Hkv, Nk] (at gate = 1 without --gate; needs --grad-o).
    #[arg(long, value_name = "FILE", help_heading = "Backward")]
    dgate: Option<PathBuf>,
    /// dF0 [B, Nk] (needs --selective and --grad-o).
    #[arg(long, value_name = "FILE", help_heading = "Backward")]
    df0: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PathArg {
    Auto,
    Scalar,
    Coop,
}

/// The parsed command line.
#[derive(Debug, Default)]
struct Args {
    q: PathBuf,
    k: PathBuf,
    v: PathBuf,
    tau: Option<PathBuf>,
    alpha: Option<PathBuf>,
    gate: Option<PathBuf>,
    kv_len: Option<PathBuf>,
    f0: Option<PathBuf>,
    out: PathBuf,
    lse: Option<PathBuf>,
    f_out: Option<PathBuf>,
    options: Options,
    f16: bool,
    check: bool,
    grad: GradArgs,
}

/// The backward part of the command line.
#[derive(Debug, Default)]
struct GradArgs {
    /// dO: the backward pass runs when it is given.
    grad_o: Option<PathBuf>,
    grad_f_out: Option<PathBuf>,
    dq: Option<PathBuf>,
    dk: Option<PathBuf>,
    dv: Option<PathBuf>,
    dtau: Option<PathBuf>,
    dalpha: Option<PathBuf>,
    dgate: Option<PathBuf>,
    df0: Option<PathBuf>,
}

impl GradArgs {
    /// (flag, path) of every gradient output asked for.
    fn outputs(&self) -> Vec<(&'static str, &PathBuf)> {
        [
            ("dq", self.dq.as_ref()),
            ("dk", self.dk.as_ref()),
            ("dv", self.dv.as_ref()),
            ("dtau", self.dtau.as_ref()),
            ("dalpha", self.dalpha.as_ref()),
            ("dgate", self.dgate.as_ref()),
            ("df0", self.df0.as_ref()),
        ]
        .into_iter()
        .filter_map(|(f, p)| p.map(|p| (f, p)))
        .collect()
    }
}

/// A clap parse error as a one-line usage failure.
fn usage_error(e: &clap::Error) -> Fail {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    Fail::Usage(match e.kind() {
        ErrorKind::UnknownArgument if arg.starts_with('-') => {
            format!("unknown flag {arg}")
        }
        ErrorKind::UnknownArgument => format!("unexpected argument {arg:?}"),
        ErrorKind::ArgumentConflict if !arg.is_empty() => {
            format!("{arg} given more than once")
        }
        // clap's own message, cut to its first line.
        _ => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            first.trim_start_matches("error: ").to_string()
        }
    })
}

/// Parses the arguments (program name first); `Ok(None)` means help was printed. Accepts
/// `--flag value` and `--flag=value`; a flag given twice is an error rather than silently
/// last-wins.
fn parse<I, T>(argv: I) -> Result<Option<Args>, Fail>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::ErrorKind;
    let c = match <Cli as clap::Parser>::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return Ok(None);
        }
        Err(e) => return Err(usage_error(&e)),
    };
    let need = |p: Option<PathBuf>, flag: &str| {
        p.ok_or_else(|| Fail::Usage(format!("missing required flag {flag}")))
    };
    let grad = GradArgs {
        grad_o: c.grad_o,
        grad_f_out: c.grad_f_out,
        dq: c.dq,
        dk: c.dk,
        dv: c.dv,
        dtau: c.dtau,
        dalpha: c.dalpha,
        dgate: c.dgate,
        df0: c.df0,
    };
    if grad.grad_o.is_none() {
        if let Some((flag, _)) = grad.outputs().first() {
            return Err(Fail::Usage(format!("--{flag} needs --grad-o")));
        }
        if grad.grad_f_out.is_some() {
            return Err(Fail::Usage("--grad-f-out needs --grad-o".into()));
        }
    }
    let options = Options {
        causal: c.causal,
        scale: c.scale,
        start: c.start,
        selective: c.selective,
        path: match c.path {
            PathArg::Auto => KernelPath::Auto,
            PathArg::Scalar => KernelPath::Scalar,
            PathArg::Coop => KernelPath::Coop,
        },
    };
    Ok(Some(Args {
        q: need(c.q, "--q")?,
        k: need(c.k, "--k")?,
        v: need(c.v, "--v")?,
        tau: c.tau,
        alpha: c.alpha,
        gate: c.gate,
        kv_len: c.kv_len,
        f0: c.f0,
        out: need(c.out, "--out")?,
        lse: c.lse,
        f_out: c.f_out,
        options,
        f16: c.f16,
        check: c.check,
        grad,
    }))
}

// ---- Files -------------------------------------------------------------------------------------

/// `--q q.npy` as it appears in messages.
fn name(flag: &str, path: &Path) -> String {
    format!("--{flag} {}", path.display())
}

/// numpy's way of writing a shape: `(2, 3)`, `(4,)`, `()`.
fn tuple<T: fmt::Display>(dims: &[T]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    match parts.len() {
        1 => format!("({},)", parts[0]),
        _ => format!("({})", parts.join(", ")),
    }
}

fn npy_fail(flag: &str, path: &Path, e: NpyError) -> Fail {
    match e {
        // The I/O message already starts with the path.
        NpyError::Io { .. } => Fail::Run(format!("--{flag} {e}")),
        e => Fail::Run(format!("{}: {e}", name(flag, path))),
    }
}

fn load(flag: &str, path: &Path) -> Result<NpyArray, Fail> {
    npy::read(path).map_err(|e| npy_fail(flag, path, e))
}

/// An f32 tensor of exactly `dims` (f16 files are widened, which is exact).
fn load_f32(flag: &str, path: &Path, dims: &[u64]) -> Result<Vec<f32>, Fail> {
    let arr = load(flag, path)?;
    check_dims(flag, path, &arr.shape, dims, "")?;
    arr.into_f32().map_err(|e| npy_fail(flag, path, e))
}

fn check_dims(flag: &str, path: &Path, got: &[usize], want: &[u64], why: &str) -> Result<(), Fail> {
    if got.len() == want.len() && got.iter().zip(want).all(|(&g, &w)| g as u64 == w) {
        return Ok(());
    }
    Err(Fail::Run(format!(
        "{}: shape {}, expected {}{why}",
        name(flag, path),
        tuple(got),
        tuple(want)
    )))
}

fn dim(flag: &str, path: &Path, x: usize) -> Result<u32, Fail> {
    u32::try_from(x).map_err(|_| {
        Fail::Run(format!(
            "{}: dimension {x} exceeds {}",
            name(flag, path),
            u32::MAX
        ))
    })
}

/// Outputs written to temporary files beside their targets, renamed into place by
/// [`Staged::commit`]; dropped without it, the temporary files are removed and no target is
/// touched.
#[derive(Default)]
struct Staged {
    /// (flag, temporary file, target)
    files: Vec<(&'static str, PathBuf, PathBuf)>,
}

impl Staged {
    fn save(
        &mut self,
        flag: &'static str,
        path: &Path,
        dims: &[u64],
        data: &[f32],
    ) -> Result<(), Fail> {
        let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.attend-{}.tmp", std::process::id()));
        // Pushed before writing, so a partly written file is removed too.
        self.files.push((flag, tmp.clone(), path.to_path_buf()));
        npy::write_f32(&tmp, &dims, data).map_err(|e| npy_fail(flag, path, e))
    }

    /// Renames every temporary file onto its target. A rename within one directory replaces the
    /// target atomically, so each target holds either its old contents or the new ones.
    fn commit(mut self) -> Result<(), Fail> {
        for (flag, tmp, target) in std::mem::take(&mut self.files) {
            std::fs::rename(&tmp, &target).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Fail::Run(format!("{}: {e}", name(flag, &target)))
            })?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (_, tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// A path as the file system resolves it: the canonical path of the file if it exists, else the
/// canonical path of its directory joined with its name (an output not written yet).
fn resolve(flag: &str, path: &Path) -> Result<PathBuf, Fail> {
    if let Ok(p) = path.canonicalize() {
        return Ok(p);
    }
    let file = path
        .file_name()
        .ok_or_else(|| Fail::Run(format!("{}: not a file name", name(flag, path))))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = dir.canonicalize().map_err(|e| {
        Fail::Run(format!(
            "{}: directory {}: {e}",
            name(flag, path),
            dir.display()
        ))
    })?;
    Ok(dir.join(file))
}

/// Refuses outputs that name an input or another output (by canonical path, and for files that
/// exist also by device and inode, which catches hard links), before anything is read.
fn check_paths(a: &Args) -> Result<(), Fail> {
    let inputs: Vec<(&str, &PathBuf)> = [
        ("q", Some(&a.q)),
        ("k", Some(&a.k)),
        ("v", Some(&a.v)),
        ("tau", a.tau.as_ref()),
        ("alpha", a.alpha.as_ref()),
        ("gate", a.gate.as_ref()),
        ("kv-len", a.kv_len.as_ref()),
        ("f0", a.f0.as_ref()),
        ("grad-o", a.grad.grad_o.as_ref()),
        ("grad-f-out", a.grad.grad_f_out.as_ref()),
    ]
    .into_iter()
    .filter_map(|(f, p)| p.map(|p| (f, p)))
    .collect();
    let mut outputs: Vec<(&str, &PathBuf)> = [
        ("out", Some(&a.out)),
        ("lse", a.lse.as_ref()),
        ("f-out", a.f_out.as_ref()),
    ]
    .into_iter()
    .filter_map(|(f, p)| p.map(|p| (f, p)))
    .collect();
    outputs.extend(a.grad.outputs());
    let mut seen: Vec<(&str, &PathBuf, PathBuf)> = Vec::new();
    for &(flag, path) in &inputs {
        // An input that does not resolve is reported when it is read.
        if let Ok(p) = path.canonicalize() {
            seen.push((flag, path, p));
        }
    }
    for &(flag, path) in &outputs {
        let p = resolve(flag, path)?;
        if p.is_dir() {
            return Err(Fail::Run(format!("{}: is a directory", name(flag, path))));
        }
        for (other, other_path, q) in &seen {
            if *q == p || same_file(q, &p) {
                return Err(Fail::Run(format!(
                    "{} names the same file as {}: refusing to overwrite it",
                    name(flag, path),
                    name(other, other_path)
                )));
            }
        }
        seen.push((flag, path, p));
    }
    Ok(())
}

/// Whether two existing paths are one file (hard links included).
#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &Path, _: &Path) -> bool {
    false
}

/// The call's sizes: Q fixes B, Hq, Nq and D; K fixes Hkv and Nk and must agree on B and D.
fn shape_of(a: &Args, q: &NpyArray, k: &NpyArray) -> Result<Shape, Fail> {
    if q.shape.len() != 4 {
        return Err(Fail::Run(format!(
            "{}: shape {}, expected 4 dimensions [B, Hq, Nq, D]",
            name("q", &a.q),
            tuple(&q.shape)
        )));
    }
    if k.shape.len() != 4 || k.shape[0] != q.shape[0] || k.shape[3] != q.shape[3] {
        let want = [
            q.shape[0].to_string(),
            "Hkv".into(),
            "Nk".into(),
            q.shape[3].to_string(),
        ];
        return Err(Fail::Run(format!(
            "{}: shape {}, expected {} (B and D as in --q {})",
            name("k", &a.k),
            tuple(&k.shape),
            tuple(&want),
            tuple(&q.shape)
        )));
    }
    Ok(Shape {
        batch: dim("q", &a.q, q.shape[0])?,
        q_heads: dim("q", &a.q, q.shape[1])?,
        kv_heads: dim("k", &a.k, k.shape[1])?,
        q_len: dim("q", &a.q, q.shape[2])?,
        k_len: dim("k", &a.k, k.shape[2])?,
        head_dim: dim("q", &a.q, q.shape[3])?,
    })
}

/// Reads every input and checks the shapes against each other and the options. Nothing touches
/// the GPU until this has passed.
fn load_inputs(a: &Args) -> Result<(Spec, HostInputs, Upstream), Fail> {
    // Q and K fix the sizes (shape_of); everything else is checked against them.
    let q = load("q", &a.q)?;
    let k = load("k", &a.k)?;
    let shape = shape_of(a, &q, &k)?;
    let present = Switches {
        causal: a.options.causal,
        selective: a.options.selective.is_some(),
        tau: a.tau.is_some(),
        alpha: a.alpha.is_some(),
        gate: a.gate.is_some(),
        kv_len: a.kv_len.is_some(),
        f0: a.f0.is_some(),
        // LSE is always computed: --check compares it even when it is not written.
        lse: true,
        f_out: a.f_out.is_some(),
    };
    let spec = Spec {
        shape,
        options: a.options,
        present,
    };
    // Options and sizes before reading the rest: a call that cannot run fails fast.
    spec.validate().map_err(|e| call_fail(&e))?;
    if a.options.selective.is_none() {
        for (flag, given) in [
            ("grad-f-out", a.grad.grad_f_out.is_some()),
            ("df0", a.grad.df0.is_some()),
        ] {
            if given {
                return Err(Fail::Run(format!(
                    "invalid call: --{flag}: needs selective masking (--selective)"
                )));
            }
        }
    }

    let q = q.into_f32().map_err(|e| npy_fail("q", &a.q, e))?;
    let k = k.into_f32().map_err(|e| npy_fail("k", &a.k, e))?;
    let v = load_f32("v", &a.v, &shape.kv_dims())?;
    let opt = |flag: &str, p: &Option<PathBuf>, dims: Vec<u64>| {
        p.as_deref().map(|p| load_f32(flag, p, &dims)).transpose()
    };
    let tau = opt("tau", &a.tau, shape.row_dims())?;
    let alpha = opt("alpha", &a.alpha, shape.alpha_dims())?;
    let gate = opt("gate", &a.gate, shape.gate_dims())?;
    let f0 = opt("f0", &a.f0, shape.f_dims())?;
    let kv_len = match &a.kv_len {
        Some(p) => {
            let arr = load("kv-len", p)?;
            check_dims("kv-len", p, &arr.shape, &shape.kv_len_dims(), "")?;
            let l = arr
                .into_u32_lossless()
                .map_err(|e| npy_fail("kv-len", p, e))?;
            check_kv_len(&l, &shape)
                .map_err(|e| Fail::Run(format!("{}: {e}", name("kv-len", p))))?;
            Some(l)
        }
        None => None,
    };
    let up = Upstream {
        d_o: opt("grad-o", &a.grad.grad_o, shape.q_dims())?,
        df_out: opt("grad-f-out", &a.grad.grad_f_out, shape.f_dims())?,
    };
    Ok((
        spec,
        HostInputs {
            q,
            k,
            v,
            tau,
            alpha,
            gate,
            kv_len,
            f0,
        },
        up,
    ))
}

/// The upstream gradients read from `--grad-o` and `--grad-f-out`.
struct Upstream {
    d_o: Option<Vec<f32>>,
    df_out: Option<Vec<f32>>,
}

/// Gradients downloaded from the GPU, in the order of [`GradArgs::outputs`]: (flag, dims, data).
type GotGrads = Vec<(&'static str, Vec<u64>, Vec<f32>)>;

/// An invalid call, named by the flag that asks for it where there is one.
fn call_fail(e: &Error) -> Fail {
    let flag = match e {
        Error::SelectiveNeedsCausal | Error::SelectionHeadOutOfRange { .. } => "--selective: ",
        Error::BadScale { .. } => "--scale: ",
        Error::StartOutOfRange { .. } => "--start: ",
        Error::HeadsNotMultiple { .. } => "--q/--k heads: ",
        Error::HeadDimUnsupported { .. } => "--q head dim: ",
        Error::InputWithoutUse { what: "F0", .. } => "--f0: ",
        Error::InputWithoutUse { what: "F_out", .. } => "--f-out: ",
        Error::FeatureMissing { .. } => "--f16: ",
        Error::PathUnavailable { .. } => "--path: ",
        Error::InputWithoutUse { what: "dF_out", .. } => "--grad-f-out: ",
        _ => "",
    };
    match e {
        Error::Gpu { .. } => Fail::Run(e.to_string()),
        _ => Fail::Run(format!("invalid call: {flag}{e}")),
    }
}

// ---- Run ---------------------------------------------------------------------------------------

fn run(a: &Args) -> Result<(), Fail> {
    check_paths(a)?;
    let (spec, host, upstream) = load_inputs(a)?;
    let shape = spec.shape;

    let ctx = Context::new().map_err(|e| Fail::Run(format!("no GPU: {e}")))?;
    eprintln!("adapter: {}", ctx.describe());
    let elem = if a.f16 { DType::F16 } else { DType::F32 };
    if a.f16 && !ctx.capabilities().f16 {
        return Err(Fail::Run(
            "--f16: the adapter does not have the SHADER_F16 feature".into(),
        ));
    }
    let gpu = |e: Error| Fail::Run(format!("GPU: {e}"));
    let dev = DeviceInputs::upload(&ctx, &shape, &host, elem).map_err(gpu)?;
    let o = ctx.empty(&shape.q_dims(), elem).map_err(gpu)?;
    let lse = ctx.empty(&shape.row_dims(), DType::F32).map_err(gpu)?;
    let f_out = match a.f_out {
        Some(_) => Some(ctx.empty(&shape.f_dims(), DType::F32).map_err(gpu)?),
        None => None,
    };
    // Poisoned, so that anything the kernels leave unwritten shows as NaN.
    for t in [Some(&o), Some(&lse), f_out.as_ref()].into_iter().flatten() {
        ctx.poison(t).map_err(gpu)?;
    }
    let mut outs = Outputs::new(&o).lse(&lse);
    if let Some(f) = &f_out {
        outs = outs.f_out(f);
    }
    ctx.attention(&dev.inputs(), &spec.options, &outs)
        .map_err(|e| call_fail(&e))?;
    let got_o = ctx.download(&o).map_err(gpu)?;
    let got_lse = ctx.download(&lse).map_err(gpu)?;
    let got_f = f_out
        .as_ref()
        .map(|f| ctx.download(f))
        .transpose()
        .map_err(gpu)?;

    let grads = match &upstream.d_o {
        Some(d_o) => backward(a, &ctx, &spec, &dev, &o, &lse, d_o, &upstream)?,
        None => Vec::new(),
    };

    if a.check {
        check(a, &spec, &host, &got_o, &got_lse, got_f.as_deref())?;
        if let Some(d_o) = &upstream.d_o {
            check_grads(a, &spec, host, d_o, upstream.df_out.as_deref(), &grads)?;
        }
    }
    let mut staged = Staged::default();
    staged.save("out", &a.out, &shape.q_dims(), &got_o)?;
    if let Some(p) = &a.lse {
        staged.save("lse", p, &shape.row_dims(), &got_lse)?;
    }
    if let (Some(p), Some(f)) = (&a.f_out, &got_f) {
        staged.save("f-out", p, &shape.f_dims(), f)?;
    }
    for ((flag, path), (_, dims, data)) in a.grad.outputs().into_iter().zip(&grads) {
        staged.save(flag, path, dims, data)?;
    }
    staged.commit()?;
    eprintln!(
        "attend: B={} Hq={} Hkv={} Nq={} Nk={} D={} {} -> {}",
        shape.batch,
        shape.q_heads,
        shape.kv_heads,
        shape.q_len,
        shape.k_len,
        shape.head_dim,
        if a.f16 { "f16" } else { "f32" },
        a.out.display()
    );
    Ok(())
}

/// Runs the backward pass on the GPU and downloads the gradients asked for.
#[allow(clippy::too_many_arguments)]
fn backward(
    a: &Args,
    ctx: &Context,
    spec: &Spec,
    dev: &DeviceInputs,
    o: &selattn::Tensor,
    lse: &selattn::Tensor,
    d_o: &[f32],
    upstream: &Upstream,
) -> Result<GotGrads, Fail> {
    let shape = spec.shape;
    let elem = o.dtype();
    let gpu = |e: Error| Fail::Run(format!("GPU: {e}"));
    let g_o = match elem {
        DType::F16 => ctx.upload_f16(&shape.q_dims(), d_o),
        _ => ctx.upload(&shape.q_dims(), d_o),
    }
    .map_err(gpu)?;
    let df_out = match &upstream.df_out {
        Some(d) => Some(ctx.upload(&shape.f_dims(), d).map_err(gpu)?),
        None => None,
    };
    // dQ, dK, dV have Q's element type; the others are f32.
    let mut tensors = Vec::new();
    for (flag, _) in a.grad.outputs() {
        let (dims, dtype) = match flag {
            "dq" => (shape.q_dims(), elem),
            "dk" | "dv" => (shape.kv_dims(), elem),
            "dtau" => (shape.row_dims(), DType::F32),
            "dalpha" => (shape.alpha_dims(), DType::F32),
            "dgate" => (shape.gate_dims(), DType::F32),
            _ => (shape.f_dims(), DType::F32),
        };
        let t = ctx.empty(&dims, dtype).map_err(gpu)?;
        // Poisoned, so that anything the kernels leave unwritten shows as NaN.
        ctx.poison(&t).map_err(gpu)?;
        tensors.push((flag, dims, t));
    }
    let mut grads = Grads::new();
    for (flag, _, t) in &tensors {
        grads = match *flag {
            "dq" => grads.dq(t),
            "dk" => grads.dk(t),
            "dv" => grads.dv(t),
            "dtau" => grads.dtau(t),
            "dalpha" => grads.dalpha(t),
            "dgate" => grads.dgate(t),
            _ => grads.df0(t),
        };
    }
    let mut up = selattn::Upstream::new(o, lse, &g_o);
    if let Some(d) = &df_out {
        up = up.df_out(d);
    }
    ctx.backward(&dev.inputs(), &spec.options, &up, &grads)
        .map_err(|e| call_fail(&e))?;
    tensors
        .into_iter()
        .map(|(flag, dims, t)| Ok((flag, dims, ctx.download(&t).map_err(gpu)?)))
        .collect()
}

/// Prints one comparison line; whether it is within `tol` (norm-wise, no NaN, finite).
fn report(what: &str, c: &Cmp, tol: f64) -> bool {
    let Cmp {
        max_abs,
        at,
        rel_norm,
        nan,
        ..
    } = *c;
    let ok = rel_norm <= tol && nan == 0 && max_abs.is_finite();
    println!(
        "check {what}: max abs error {max_abs:.3e} at {at}, norm-wise relative {rel_norm:.3e} (bound {tol:.0e}), NaN {nan}: {}",
        if ok { "ok" } else { "FAILED" }
    );
    ok
}

fn check_failed(failed: &[&str]) -> Result<(), Fail> {
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Fail::Run(format!(
            "--check failed for {} against the f64 reference",
            failed.join(", ")
        )))
    }
}

/// Runs the f64 reference backward and compares every gradient written; fails when a norm-wise
/// error is over its bound.
fn check_grads(
    a: &Args,
    spec: &Spec,
    mut host: HostInputs,
    d_o: &[f32],
    df_out: Option<&[f32]>,
    grads: &GotGrads,
) -> Result<(), Fail> {
    let mut d_o = d_o.to_vec();
    if a.f16 {
        // The kernels see f16-rounded Q, K, V and dO; so does the reference.
        host.q = round_f16(&host.q);
        host.k = round_f16(&host.k);
        host.v = round_f16(&host.v);
        d_o = round_f16(&d_o);
    }
    let want = reference_backward::backward(spec, &host, &d_o, df_out)
        .map_err(|e| Fail::Run(format!("reference backward: {e}")))?;
    let mut failed = Vec::new();
    for (flag, _, got) in grads {
        let (exp, name) = match *flag {
            "dq" => (&want.dq, "dQ"),
            "dk" => (&want.dk, "dK"),
            "dv" => (&want.dv, "dV"),
            "dtau" => (&want.dtau, "dtau"),
            "dalpha" => (&want.dalpha, "dalpha"),
            "dgate" => (&want.dgate, "dgate"),
            _ => (&want.df0, "dF0"),
        };
        let tol = if a.f16 { F16_NORM_TOL } else { F32_NORM_TOL };
        // dalpha sums over every row of a head: 10x the bound, as tests/backward.rs.
        let tol = if *flag == "dalpha" { 10.0 * tol } else { tol };
        if !report(name, &compare(got, exp, ELEM_TOL, ELEM_TOL), tol) {
            failed.push(name);
        }
    }
    check_failed(&failed)
}

/// Runs the f64 reference and compares; fails when a norm-wise error is over its bound.
fn check(
    a: &Args,
    spec: &Spec,
    host: &HostInputs,
    o: &[f32],
    lse: &[f32],
    f_out: Option<&[f32]>,
) -> Result<(), Fail> {
    let mut host = host.clone();
    if a.f16 {
        // The kernels see f16-rounded Q, K and V; so does the reference.
        host.q = round_f16(&host.q);
        host.k = round_f16(&host.k);
        host.v = round_f16(&host.v);
    }
    let mut spec = *spec;
    spec.present.f_out = spec.options.selective.is_some();
    let want: HostOutputs =
        reference::attention(&spec, &host).map_err(|e| Fail::Run(format!("reference: {e}")))?;
    let o_tol = if a.f16 { F16_NORM_TOL } else { F32_NORM_TOL };
    let mut rows = vec![("O", compare(o, &want.o, ELEM_TOL, ELEM_TOL), o_tol)];
    rows.push((
        "LSE",
        compare(lse, &want.lse, ELEM_TOL, ELEM_TOL),
        F32_NORM_TOL,
    ));
    if let Some(f) = f_out {
        rows.push((
            "F_out",
            compare(f, &want.f_out, ELEM_TOL, ELEM_TOL),
            F32_NORM_TOL,
        ));
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|(what, c, tol)| !report(what, c, *tol))
        .map(|(what, _, _)| *what)
        .collect();
    check_failed(&failed)
}
