//! Tooling shared by selattn's tests, examples and benches; not part of the library and never
//! published: `.npy` I/O ([`npy`]), the seeded RNG and test data, comparison against the f64
//! reference ([`testing`]), and every pipeline variant the library can create ([`variants`]).
#![deny(missing_docs)]

pub mod npy;
pub mod testing;
pub mod variants;
