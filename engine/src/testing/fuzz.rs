//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the tests
//! that replay their corpora on the stable toolchain.
