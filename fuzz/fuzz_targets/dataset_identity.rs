//! Fuzz target `dataset_identity`: see `dicom_gateway::fuzzing::dataset_identity` for its input and properties.
#![no_main]

// The allocation cap (fuzz/src/lib.rs).
use dicom_gateway_fuzz as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| dicom_gateway::fuzzing::dataset_identity(data));
