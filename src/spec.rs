//! Shapes and options of one attention call (DESIGN.md §1), and their validation into typed errors.
//!
//! Production shaders run with naga's runtime bounds checks off, so the checks in this module are
//! what keeps every GPU memory access in bounds: every index a kernel computes is derived from a
//! [`Shape`] that passed [`Spec::validate`], and every buffer bound to a kernel was checked to hold
//! exactly the elements that shape implies. Any new input or size must be validated here first.

use crate::{Error, Result};

/// Head dimensions the kernels support: every multiple of 8 from 8 to 256.
pub const SUPPORTED_HEAD_DIMS: &str = "multiples of 8 from 8 to 256";

/// Sizes of one call. Q is `[batch, q_heads, q_len, head_dim]`, K and V are
/// `[batch, kv_heads, k_len, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    /// B.
    pub batch: u32,
    /// Hq, a multiple of `kv_heads`.
    pub q_heads: u32,
    /// Hkv.
    pub kv_heads: u32,
    /// Nq.
    pub q_len: u32,
    /// Nk.
    pub k_len: u32,
    /// D.
    pub head_dim: u32,
}

/// The role of a tensor in a call; with a [`Shape`] it fixes the tensor's dims
/// ([`Shape::dims`]), so a tensor can be uploaded by role ([`crate::Context::upload_as`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Queries `[B, Hq, Nq, D]`.
    Q,
    /// Keys `[B, Hkv, Nk, D]`.
    K,
    /// Values `[B, Hkv, Nk, D]`.
    V,
    /// Per-query temperature `[B, Hq, Nq]`.
    Tau,
    /// Positional-temperature coefficient `[Hq]`.
    Alpha,
    /// Per-key value gate `[B, Hkv, Nk]`.
    Gate,
    /// Valid keys per batch element `[B]` (u32).
    KvLen,
    /// Selective state carried in `[B, Nk]`.
    F0,
    /// Output `[B, Hq, Nq, D]`.
    O,
    /// Log-sum-exp per row `[B, Hq, Nq]`.
    Lse,
    /// Selective state carried out `[B, Nk]`.
    FOut,
}

impl Shape {
    /// Self-attention shape: `Hq = Hkv = heads`, `Nq = Nk = len`.
    pub fn new(batch: u32, heads: u32, len: u32, head_dim: u32) -> Self {
        Shape {
            batch,
            q_heads: heads,
            kv_heads: heads,
            q_len: len,
            k_len: len,
            head_dim,
        }
    }

    /// The same shape with `kv_heads` KV heads (grouped-query attention).
    pub fn with_kv_heads(mut self, kv_heads: u32) -> Self {
        self.kv_heads = kv_heads;
        self
    }

    /// The same shape with `q_len` queries (chunked prefill, decode).
    pub fn with_q_len(mut self, q_len: u32) -> Self {
        self.q_len = q_len;
        self
    }

    /// Query heads per KV head.
    pub fn group(&self) -> u32 {
        self.q_heads / self.kv_heads.max(1)
    }

    /// Dims of the tensor with role `role` in a call of this shape.
    pub fn dims(&self, role: Role) -> Vec<u64> {
        match role {
            Role::Q | Role::O => self.q_dims(),
            Role::K | Role::V => self.kv_dims(),
            Role::Tau | Role::Lse => self.row_dims(),
            Role::Alpha => self.alpha_dims(),
            Role::Gate => self.gate_dims(),
            Role::KvLen => self.kv_len_dims(),
            Role::F0 | Role::FOut => self.f_dims(),
        }
    }

    /// Shape of Q.
    pub fn q_dims(&self) -> Vec<u64> {
        dims(&[self.batch, self.q_heads, self.q_len, self.head_dim])
    }
    /// Shape of K and V.
    pub fn kv_dims(&self) -> Vec<u64> {
        dims(&[self.batch, self.kv_heads, self.k_len, self.head_dim])
    }
    /// Shape of tau and LSE.
    pub fn row_dims(&self) -> Vec<u64> {
        dims(&[self.batch, self.q_heads, self.q_len])
    }
    /// Shape of alpha.
    pub fn alpha_dims(&self) -> Vec<u64> {
        dims(&[self.q_heads])
    }
    /// Shape of the gate.
    pub fn gate_dims(&self) -> Vec<u64> {
        dims(&[self.batch, self.kv_heads, self.k_len])
    }
    /// Shape of kv_len.
    pub fn kv_len_dims(&self) -> Vec<u64> {
        dims(&[self.batch])
    }
    /// Shape of F0 and F_out.
    pub fn f_dims(&self) -> Vec<u64> {
        dims(&[self.batch, self.k_len])
    }
}

fn dims(d: &[u32]) -> Vec<u64> {
    d.iter().map(|&x| x as u64).collect()
}

/// Number of elements of a shape (saturating at `u64::MAX`; tensors are made only with shapes
/// whose count fits, see [`checked_numel`]).
pub fn numel(dims: &[u64]) -> u64 {
    dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
}

/// Number of elements of a shape, `None` when the product overflows u64.
pub fn checked_numel(dims: &[u64]) -> Option<u64> {
    dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// The switches of one attention call: causal and selective masking, which optional inputs it
/// carries and which optional outputs it wants. The one description of "which features are on"
/// shared by [`Spec`], the kernels' specialisation keys, and the test and tooling crates.
///
/// In a [`Spec`], `causal` and `selective` are decided by its [`Options`] (which also carry the
/// selection head); [`Spec::validate`] copies them in, so [`Resolved::present`] has every field
/// set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Switches {
    /// Causal masking.
    pub causal: bool,
    /// Selective masking (causal only).
    pub selective: bool,
    /// Per-query temperature `[B, Hq, Nq]`.
    pub tau: bool,
    /// Positional-temperature coefficient `[Hq]`.
    pub alpha: bool,
    /// Per-key value gate `[B, Hkv, Nk]`.
    pub gate: bool,
    /// Valid keys per batch element `[B]` (u32).
    pub kv_len: bool,
    /// Selective state carried in `[B, Nk]`.
    pub f0: bool,
    /// Log-sum-exp output `[B, Hq, Nq]`.
    pub lse: bool,
    /// Selective state out `[B, Nk]`.
    pub f_out: bool,
}

impl Switches {
    /// Every switch off: non-causal attention with no optional tensor.
    pub const NONE: Switches = Switches {
        causal: false,
        selective: false,
        tau: false,
        alpha: false,
        gate: false,
        kv_len: false,
        f0: false,
        lse: false,
        f_out: false,
    };
    /// Every switch on: causal selective attention with every optional input and output.
    pub const ALL: Switches = Switches {
        causal: true,
        selective: true,
        tau: true,
        alpha: true,
        gate: true,
        kv_len: true,
        f0: true,
        lse: true,
        f_out: true,
    };

    /// Whether the combination can occur: selective only with causal, F0 and F_out only with
    /// selective.
    pub fn is_consistent(&self) -> bool {
        (!self.selective || self.causal) && (self.selective || !(self.f0 || self.f_out))
    }

    /// Every consistent combination ([`Switches::is_consistent`]), in a fixed order (bit `i` of
    /// a counter sets, in order, causal, selective, tau, alpha, gate, kv_len, lse, f0, f_out).
    pub fn all() -> Vec<Switches> {
        (0u32..512)
            .map(|bits| {
                let b = |i: u32| bits & (1 << i) != 0;
                Switches {
                    causal: b(0),
                    selective: b(1),
                    tau: b(2),
                    alpha: b(3),
                    gate: b(4),
                    kv_len: b(5),
                    lse: b(6),
                    f0: b(7),
                    f_out: b(8),
                }
            })
            .filter(Switches::is_consistent)
            .collect()
    }

    /// Only the optional inputs a forward kernel reads (tau, alpha, gate, kv_len); every other
    /// switch off.
    pub fn inputs(&self) -> Switches {
        Switches {
            tau: self.tau,
            alpha: self.alpha,
            gate: self.gate,
            kv_len: self.kv_len,
            ..Switches::NONE
        }
    }
}

/// Which kernel implementation runs a call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Path {
    /// The fastest the device supports: cooperative matrices where reported, else scalar.
    /// The environment variable `SELATTN_PATH` (`scalar` or `coop`) overrides `Auto`.
    #[default]
    Auto,
    /// The portable scalar kernels (any adapter).
    Scalar,
    /// Cooperative-matrix (tensor core) kernels; an error where the adapter lacks them.
    Coop,
}

/// Environment variable that forces a [`Path`] where a call asks for [`Path::Auto`].
pub const PATH_ENV: &str = "SELATTN_PATH";

impl Path {
    /// `Auto` replaced by what `SELATTN_PATH` says, if anything.
    pub fn from_env(self) -> Path {
        if self != Path::Auto {
            return self;
        }
        match std::env::var(PATH_ENV).ok().as_deref() {
            Some("scalar") => Path::Scalar,
            Some("coop") => Path::Coop,
            _ => Path::Auto,
        }
    }
}

/// Options of one call. They read as sentences: `Options::causal().selective(0).start(7)`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Options {
    /// Mask keys after each query's position.
    pub causal: bool,
    /// Logit scale; `1/sqrt(D)` when `None`.
    pub scale: Option<f32>,
    /// Position of the first query; `Nk - Nq` when `None`.
    pub start: Option<u32>,
    /// Selective masking with this selection head (causal only).
    pub selective: Option<u32>,
    /// Kernel implementation.
    pub path: Path,
}

impl Options {
    /// Non-causal attention with every control off.
    pub fn new() -> Self {
        Self::default()
    }
    /// Causal attention with every control off.
    pub fn causal() -> Self {
        Options {
            causal: true,
            ..Self::default()
        }
    }
    /// Use this logit scale instead of `1/sqrt(D)`.
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    /// The first query sits at absolute position `start`.
    pub fn start(mut self, start: u32) -> Self {
        self.start = Some(start);
        self
    }
    /// Run on this kernel path.
    pub fn path(mut self, path: Path) -> Self {
        self.path = path;
        self
    }
    /// Enable selective masking with `head` as the selection head.
    pub fn selective(mut self, head: u32) -> Self {
        self.selective = Some(head);
        self
    }
}

/// One call: shape, options and which optional tensors take part.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spec {
    /// Sizes.
    pub shape: Shape,
    /// Options.
    pub options: Options,
    /// Optional inputs and outputs present (`causal` and `selective` are taken from `options`).
    pub present: Switches,
}

/// A validated [`Spec`] with every derived value resolved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resolved {
    /// Sizes.
    pub shape: Shape,
    /// Options.
    pub options: Options,
    /// Every switch of the call, `causal` and `selective` included.
    pub present: Switches,
    /// The logit scale in use.
    pub scale: f32,
    /// Absolute position of query row 0.
    pub start: u32,
}

impl Spec {
    // Long on purpose: one flat list of checks in the order their errors are reported.
    /// Checks every size and option; see the module docs for why this is the safety boundary.
    pub fn validate(&self) -> Result<Resolved> {
        let s = self.shape;
        for (what, v) in [
            ("batch", s.batch),
            ("q_heads", s.q_heads),
            ("kv_heads", s.kv_heads),
            ("q_len", s.q_len),
            ("k_len", s.k_len),
            ("head_dim", s.head_dim),
        ] {
            if v == 0 {
                return Err(Error::ZeroSize { what });
            }
        }
        if !s.head_dim.is_multiple_of(8) || s.head_dim > 256 {
            return Err(Error::HeadDimUnsupported {
                got: s.head_dim,
                supported: SUPPORTED_HEAD_DIMS,
            });
        }
        if !s.q_heads.is_multiple_of(s.kv_heads) {
            return Err(Error::HeadsNotMultiple {
                q_heads: s.q_heads,
                kv_heads: s.kv_heads,
            });
        }
        let scale = match self.options.scale {
            Some(x) if !(x.is_finite() && x > 0.0) => return Err(Error::BadScale { scale: x }),
            Some(x) => x,
            None => 1.0 / (s.head_dim as f32).sqrt(),
        };
        let start = match self.options.start {
            Some(st) => st,
            None => s.k_len.saturating_sub(s.q_len),
        };
        // Positions are formed as start + i in u32 arithmetic on the GPU: keep them in range.
        if (start as u64) + (s.q_len as u64) > u32::MAX as u64 / 2 {
            return Err(Error::CountTooLarge {
                what: "query positions (start + Nq)",
                count: start as u64 + s.q_len as u64,
                limit: u32::MAX as u64 / 2,
            });
        }
        if self.options.causal && (start as u64) + (s.q_len as u64) > s.k_len as u64 {
            return Err(Error::StartOutOfRange {
                start,
                queries: s.q_len,
                keys: s.k_len,
            });
        }
        match self.options.selective {
            Some(_) if !self.options.causal => return Err(Error::SelectiveNeedsCausal),
            Some(h) if h >= s.q_heads => {
                return Err(Error::SelectionHeadOutOfRange {
                    head: h,
                    q_heads: s.q_heads,
                })
            }
            _ => {}
        }
        if self.options.selective.is_none() {
            if self.present.f0 {
                return Err(Error::InputWithoutUse {
                    what: "F0",
                    why: "selective masking is off",
                });
            }
            if self.present.f_out {
                return Err(Error::InputWithoutUse {
                    what: "F_out",
                    why: "selective masking is off",
                });
            }
        }
        Ok(Resolved {
            shape: s,
            options: self.options,
            present: Switches {
                causal: self.options.causal,
                selective: self.options.selective.is_some(),
                ..self.present
            },
            scale,
            start,
        })
    }
}

impl Resolved {
    /// Whether selective masking is on.
    pub fn selective(&self) -> bool {
        self.options.selective.is_some()
    }
}

/// Checks per-batch valid key counts against Nk.
pub fn check_kv_len(kv_len: &[u32], shape: &Shape) -> Result<()> {
    if kv_len.len() as u64 != shape.batch as u64 {
        return Err(Error::LengthMismatch {
            what: "kv_len",
            expected: shape.batch as u64,
            got: kv_len.len() as u64,
        });
    }
    for (b, &l) in kv_len.iter().enumerate() {
        if l > shape.k_len {
            return Err(Error::KvLenTooLarge {
                batch: b as u32,
                kv_len: l,
                keys: shape.k_len,
            });
        }
    }
    Ok(())
}
