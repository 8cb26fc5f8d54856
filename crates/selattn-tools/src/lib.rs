//! Tooling shared by selattn's tests, examples and benches; not part of the library and never
//! published: `.npy` I/O ([`npy`]), the seeded RNG and test data, comparison against the f64
//! reference ([`testing`]), every pipeline variant the library can create ([`variants`]), and
//! the cross-adapter validation suite of `examples/validate` and `web/` ([`validation`]).
#![deny(missing_docs)]

pub mod npy;
pub mod testing;
pub mod validation;
pub mod variants;
