//! Selective masking passes 1 and 2 (`shaders/selective.wgsl`), and pass 1 on cooperative
//! matrices (`shaders/coop_colsum.wgsl`) where the forward kernel runs on them.

use std::fmt::Write;

use super::flag;

/// Key tiles per workgroup of the cooperative-matrix column sums (see [`ColsumConfig::kpw`]).
pub const DEFAULT_KPW: u32 = 4;

/// Specialisation of the column-sum pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ColsumConfig {
    /// Head dim.
    pub d: u32,
    /// Query rows per tile: equal to the forward kernel's.
    pub br: u32,
    /// Keys per tile.
    pub bc: u32,
    /// Threads per workgroup.
    pub wg: u32,
    /// kv_len given.
    pub kv_len: bool,
    /// 0: the scalar kernel. Otherwise the cooperative-matrix kernel for this fixed subgroup
    /// size (16 rows per subgroup, `wg = br / 16 * coop_sgs`).
    pub coop_sgs: u32,
    /// Cooperative-matrix kernel: key tiles walked by one workgroup (Q loaded once, the next
    /// K tile prefetched into registers). 1 on the scalar kernel.
    pub kpw: u32,
    /// Cooperative-matrix kernel: one scratch row per 16 query rows (for the forward's
    /// subgroup prefix) instead of one per query tile.
    pub sub16: bool,
}

impl ColsumConfig {
    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        let mut c = vec![
            ("D", self.d as f64),
            ("BR", self.br as f64),
            ("BC", self.bc as f64),
            ("WG", self.wg as f64),
            ("HAS_KVLEN", flag(self.kv_len)),
        ];
        if self.coop_sgs > 0 {
            c.push(("SGS", self.coop_sgs as f64));
            c.push(("KPW", self.kpw as f64));
            c.push(("SUB16", super::flag(self.sub16)));
            // Ablation knob (see `coop::ABLATE_ENV`): `colsum` turns the interior fast path off.
            let ablate = std::env::var(super::coop::ABLATE_ENV).unwrap_or_default();
            if ablate.split(',').any(|w| w.trim() == "colsum") {
                c.push(("FAST", 0.0));
            }
        }
        c
    }

    /// Workgroup memory in bytes, as declared in the shader.
    pub fn workgroup_bytes(&self) -> u64 {
        let (br, bc, d) = (self.br as u64, self.bc as u64, self.d as u64);
        if self.coop_sgs > 0 {
            let chunks = if self.sub16 {
                br / 16
            } else {
                (self.wg as u64 / bc).max(1)
            };
            br.max(bc) * (d + 8) * 2 + br * (bc + 4) * 4 + 4 * chunks * bc
        } else {
            4 * (br * d + bc * d + br * bc)
        }
    }

    /// Workgroups along the keys for `k_len` keys (the dispatch's x).
    pub fn key_groups(&self, k_len: u32) -> u32 {
        k_len.div_ceil(self.bc * self.kpw.max(1))
    }

    /// The cooperative-matrix configuration of pass 1 for a cooperative-matrix forward kernel
    /// with `br` rows per query tile and subgroup size `sgs`, if it fits in `memory` bytes.
    /// Key tiles per workgroup: [`DEFAULT_KPW`], or `colkpwN` (N in 1, 2, 4, 8, 16) in
    /// `SELATTN_COOP_ABLATE`.
    pub fn coop(d: u32, br: u32, sgs: u32, kv_len: bool, memory: u64) -> Option<ColsumConfig> {
        let ablate = std::env::var(super::coop::ABLATE_ENV).unwrap_or_default();
        let kpw = [1u32, 2, 4, 8, 16]
            .into_iter()
            .find(|n| ablate.split(',').any(|w| w.trim() == format!("colkpw{n}")))
            .unwrap_or(DEFAULT_KPW);
        [64, 32, 16]
            .into_iter()
            .map(|bc| ColsumConfig {
                d,
                br,
                bc,
                wg: br / 16 * sgs,
                kv_len,
                coop_sgs: sgs,
                kpw,
                sub16: false,
            })
            // The column sums split BR rows into WG / BC chunks.
            .filter(|c| c.wg < c.bc || br.is_multiple_of(c.wg / c.bc))
            .find(|c| c.workgroup_bytes() <= memory)
    }

    /// The WGSL of the cooperative-matrix kernel: the template with its fragments unrolled for
    /// D. The scalar kernel's text is returned unchanged.
    pub fn wgsl(&self, template: &str) -> String {
        if self.coop_sgs == 0 {
            return template.to_string();
        }
        let n = self.d / 16;
        let (mut qdecl, mut qload) = (String::new(), String::new());
        let mut scomp = String::new();
        for d in 0..n {
            let _ = writeln!(qdecl, "        var qf{d} = coop_mat16x16<f16, A>();");
            let _ = writeln!(
                qload,
                "        let qi{d} = qoff + {o}u;\n        qf{d} = coopLoadT<coop_mat16x16<f16, A>>(&stage[qi{d}], DP);",
                o = d * 16
            );
        }
        let _ = writeln!(scomp, "            var acc = coop_mat16x16<f32, C>();");
        for d in 0..n {
            let _ = writeln!(
                scomp,
                "            let ki{d} = koff + {o}u;\n            acc = coopMultiplyAdd(qf{d}, coopLoad<coop_mat16x16<f16, B>>(&stage[ki{d}], DP), acc);",
                o = d * 16
            );
        }
        let _ = writeln!(scomp, "            coopStoreT(acc, &sbuf[soff], SP);");
        template
            .replace("{{QDECL}}", &qdecl)
            .replace("{{QLOAD}}", &qload)
            .replace("{{SCOMP}}", &scomp)
    }
}

/// Specialisation of the scan pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScanConfig {
    /// Threads per workgroup.
    pub wg: u32,
    /// F0 given.
    pub f0: bool,
    /// F_out wanted.
    pub f_out: bool,
}

impl ScanConfig {
    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("WG", self.wg as f64),
            ("HAS_F0", flag(self.f0)),
            ("WRITE_F", flag(self.f_out)),
        ]
    }
}
