//! Selective masking passes 1 and 2 (`shaders/selective.wgsl`).

use super::flag;

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
}

impl ColsumConfig {
    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("D", self.d as f64),
            ("BR", self.br as f64),
            ("BC", self.bc as f64),
            ("WG", self.wg as f64),
            ("HAS_KVLEN", flag(self.kv_len)),
        ]
    }

    /// Workgroup memory in bytes.
    pub fn workgroup_bytes(&self) -> u64 {
        4 * (self.br as u64 * self.d as u64
            + self.bc as u64 * self.d as u64
            + self.br as u64 * self.bc as u64)
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
