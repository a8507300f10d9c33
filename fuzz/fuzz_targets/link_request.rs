//! Fuzz target `link_request`: see `dicom_gateway::fuzzing::link_request` for its input and properties.
#![no_main]

// The allocation cap (fuzz/src/lib.rs).
use dicom_gateway_fuzz as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| dicom_gateway::fuzzing::link_request(data));
