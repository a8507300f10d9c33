//! The test kit of dicom-gateway: the fixtures that the end-to-end tests (`tests/*.rs`,
//! package `dicom-gateway-e2e`) and the benchmarks (`benches/`) share.
//!
//! Nothing here stands in for a component: nodes are started from config files exactly as
//! `dicom-gateway serve` does, the receiving PACS is DCMTK's `storescp` in bit-preserving
//! mode, objects go in by C-STORE (the gateway's own sender, or pynetdicom), with real TLS
//! and a real RocksDB, in a temporary folder per test.
//!
//! What each module owns:
//! - [`sites`]: the two-site fixture ([`TwoSites`], [`Fixture`]): PKI, KEKs and configs
//!   (through [`dicom_gateway::twosite`], the layout the demo uses too), node start, stop
//!   and restart, and the ports the nodes listen on;
//! - [`storescp`]: a DCMTK `storescp` process as the PACS, on a port it is seen to listen on;
//! - [`objects`]: generated studies, sending them, waiting for a condition, metrics;
//! - [`files`]: Part-10 files on disk: writing, finding, hashing their data sets;
//! - [`peers`]: independent tools (pynetdicom, DCMTK's `dcmconv`);
//! - [`disk`]: small disks (a tmpfs) and filling them;
//! - [`hl7`]: HL7 v2 over two sites, python-hl7 as sender and receiving system, raw MLLP;
//! - [`logs`]: capturing what the nodes of the test process log;
//! - [`openssl`]: certificates made by the `openssl` command (a hospital PKI), for DICOM TLS.
//!
//! Invariants:
//! - no node listener is given a guessed port: the configs say port 0 and the fixture reads
//!   what each node bound (see [`sites`] for site B's restarts, the one place a port is named
//!   again);
//! - the fixtures panic with a message that says what failed; they are for tests only, and
//!   the crate is never published.
//!
//! Everything is re-exported at the root, so a test says `use dicom_gateway_testkit::*;`.

pub mod disk;
pub mod faults;
pub mod files;
pub mod hl7;
pub mod logs;
pub mod objects;
pub mod openssl;
pub mod peers;
pub mod sites;
pub mod storescp;

pub use disk::*;
pub use faults::*;
pub use files::*;
pub use hl7::*;
pub use logs::*;
pub use objects::*;
pub use openssl::*;
pub use peers::*;
pub use sites::*;
pub use storescp::*;
