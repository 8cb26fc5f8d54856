//! Support for checking kernels against the reference, shared by the tests and
//! `examples/validate.rs`: a seeded RNG, seeded random inputs, and an element-wise comparison
//! that reports the max error, where it is, and the norm-wise relative error (DESIGN.md §4).

use selattn::reference::HostInputs;
use selattn::spec::Shape;
use selattn::Switches;

/// splitmix64: small, seeded, reproducible on every platform. The only copy of the generator in
/// the project: tests, examples and benches all draw from it, and its stream never changes (a
/// test's inputs are fixed by its seed).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (the state starts at `seed ^ 0x9E3779B97F4A7C15`).
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// A generator whose state starts at exactly `state` (no mixing of the seed).
    pub fn from_state(state: u64) -> Self {
        Rng(state)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in (0, 1]: never 0, so a logarithm of it stays finite.
    pub fn uniform_open(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, 1) with 24 random bits, as an f32.
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    /// `n` standard normals.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
    /// `n` values uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| lo + (hi - lo) * self.uniform() as f32)
            .collect()
    }
    /// Uniform in [0, n); 0 when `n` is 0.
    pub fn below(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as u32
    }
}

/// `plain`, or the optional inputs `c` switches on joined by `+` (`tau+gate`).
pub fn inputs_name(c: &Switches) -> String {
    let mut v = vec![];
    if c.tau {
        v.push("tau");
    }
    if c.alpha {
        v.push("alpha");
    }
    if c.gate {
        v.push("gate");
    }
    if c.kv_len {
        v.push("kvlen");
    }
    if v.is_empty() {
        "plain".into()
    } else {
        v.join("+")
    }
}

/// Seeded random inputs for a shape: normals for Q/K/V, tau in [0.5, 1.5), alpha in [0, 0.3),
/// gate in [0.05, 1), kv_len in [1, Nk], for the inputs `c` switches on (its other switches are
/// not read; F0 is never made).
pub fn random_inputs(shape: &Shape, c: Switches, seed: u64) -> HostInputs {
    let mut rng = Rng::new(seed);
    let s = shape;
    let n = |d: Vec<u64>| d.iter().product::<u64>() as usize;
    HostInputs {
        q: rng.normals(n(s.q_dims())),
        k: rng.normals(n(s.kv_dims())),
        v: rng.normals(n(s.kv_dims())),
        tau: c.tau.then(|| rng.range(0.5, 1.5, n(s.row_dims()))),
        alpha: c.alpha.then(|| rng.range(0.0, 0.3, n(s.alpha_dims()))),
        gate: c.gate.then(|| rng.range(0.05, 1.0, n(s.gate_dims()))),
        kv_len: c
            .kv_len
            .then(|| (0..s.batch).map(|_| 1 + rng.below(s.k_len)).collect()),
        f0: None,
    }
}

/// Each value rounded to the nearest f16 and back: what an f16 tensor stores.
pub fn round_f16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
}

/// Result of comparing a GPU output with the reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cmp {
    /// Largest |gpu - ref| (infinite where an infinity or a length differs).
    pub max_abs: f64,
    /// Index of the largest error.
    pub at: usize,
    /// Norm-wise relative error ‖gpu - ref‖ / ‖ref‖ over finite elements (‖gpu - ref‖ when
    /// ‖ref‖ is 0).
    pub rel_norm: f64,
    /// Elements outside `atol + rtol·|ref|`, NaN, mismatched infinities, or missing.
    pub bad: usize,
    /// NaN elements (unwritten outputs stay NaN after poisoning).
    pub nan: usize,
}

/// Compares every element: |gpu - ref| <= atol + rtol |ref|; infinities must match exactly.
/// Elements one side lacks count as bad.
pub fn compare(gpu: &[f32], reference: &[f64], atol: f64, rtol: f64) -> Cmp {
    let (mut max_abs, mut at, mut num, mut den, mut bad, mut nan) = (0.0f64, 0, 0.0, 0.0, 0, 0);
    for (i, (&g, &r)) in gpu.iter().zip(reference).enumerate() {
        let g = g as f64;
        if g.is_nan() {
            nan += 1;
            bad += 1;
            continue;
        }
        if r.is_infinite() || g.is_infinite() {
            if g != r {
                bad += 1;
                if max_abs != f64::INFINITY {
                    max_abs = f64::INFINITY;
                    at = i;
                }
            }
            continue;
        }
        let e = (g - r).abs();
        if e > max_abs {
            max_abs = e;
            at = i;
        }
        if e > atol + rtol * r.abs() {
            bad += 1;
        }
        num += e * e;
        den += r * r;
    }
    if gpu.len() != reference.len() {
        bad += gpu.len().abs_diff(reference.len());
        max_abs = f64::INFINITY;
        at = gpu.len().min(reference.len());
    }
    let rel_norm = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    Cmp {
        max_abs,
        at,
        rel_norm,
        bad,
        nan,
    }
}

/// Host inputs uploaded to a device, f16 or f32 for Q, K and V as asked.
#[derive(Debug)]
pub struct DeviceInputs {
    /// Q.
    pub q: selattn::Tensor,
    /// K.
    pub k: selattn::Tensor,
    /// V.
    pub v: selattn::Tensor,
    /// tau.
    pub tau: Option<selattn::Tensor>,
    /// alpha.
    pub alpha: Option<selattn::Tensor>,
    /// gate.
    pub gate: Option<selattn::Tensor>,
    /// kv_len.
    pub kv_len: Option<selattn::Tensor>,
    /// F0.
    pub f0: Option<selattn::Tensor>,
}

impl DeviceInputs {
    /// Uploads `x` for `shape`; Q, K and V are stored as `elem` (f16 rounds to nearest).
    pub fn upload(
        ctx: &selattn::Context,
        shape: &Shape,
        x: &HostInputs,
        elem: selattn::DType,
    ) -> selattn::Result<Self> {
        let qkv = |dims: Vec<u64>, d: &[f32]| match elem {
            selattn::DType::F16 => ctx.upload_f16(&dims, d),
            _ => ctx.upload(&dims, d),
        };
        let opt = |dims: Vec<u64>, d: &Option<Vec<f32>>| {
            d.as_ref().map(|d| ctx.upload(&dims, d)).transpose()
        };
        Ok(DeviceInputs {
            q: qkv(shape.q_dims(), &x.q)?,
            k: qkv(shape.kv_dims(), &x.k)?,
            v: qkv(shape.kv_dims(), &x.v)?,
            tau: opt(shape.row_dims(), &x.tau)?,
            alpha: opt(shape.alpha_dims(), &x.alpha)?,
            gate: opt(shape.gate_dims(), &x.gate)?,
            kv_len: x
                .kv_len
                .as_ref()
                .map(|t| ctx.upload_u32(&shape.kv_len_dims(), t))
                .transpose()?,
            f0: opt(shape.f_dims(), &x.f0)?,
        })
    }

    /// The call's inputs.
    pub fn inputs(&self) -> selattn::Inputs<'_> {
        selattn::Inputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            tau: self.tau.as_ref(),
            alpha: self.alpha.as_ref(),
            gate: self.gate.as_ref(),
            kv_len: self.kv_len.as_ref(),
            f0: self.f0.as_ref(),
        }
    }
}
