//! The merge kernel's specialisation and parameters (`shaders/merge.wgsl`); the public
//! [`crate::merge::merge_partials`] validates and dispatches it.

/// Specialisation of the merge kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MergePairConfig {
    /// Threads per workgroup.
    pub wg: u32,
    /// The first fold (`out = merge(a, b)`); otherwise `out = merge(out, b)`.
    pub first: bool,
    /// Only one partial: `out = a`.
    pub single: bool,
}

impl MergePairConfig {
    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("WG", self.wg as f64),
            ("FIRST", if self.first { 1.0 } else { 0.0 }),
            ("SINGLE", if self.single { 1.0 } else { 0.0 }),
        ]
    }
}

/// Uniform parameters of `shaders/merge.wgsl`, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MergeParams {
    /// Rows (elements of LSE).
    pub rows: u32,
    /// vec4 per row of O.
    pub d4: u32,
    /// Workgroups along x.
    pub groups_x: u32,
    /// Bits of -inf (written for rows empty in every partial).
    pub neg_inf_bits: u32,
}
