//! Benchmarks for dicom-gateway live in `benches/*.rs` (criterion). This library is empty;
//! it exists so the benchmarks form one workspace member with their own dependencies. Their
//! set-up (a scratch spool) comes from the test kit, `dicom-gateway-testkit`.
