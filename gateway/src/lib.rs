//! # dicom-gateway
//!
//! A secure DICOM store-and-forward gateway. One binary plays both ends of a site link:
//!
//! ```text
//!  modality / PACS                site A                          site B                 PACS
//!  ───────────────   C-STORE   ┌──────────┐  STOW-RS over    ┌──────────┐   C-STORE   ───────
//!                  ──────────▶ │ receive  │  HTTP/2 + mTLS   │  relay   │ ──────────▶
//!                              │  spool   │ ───────────────▶ │  spool   │   deliver
//!                              │  relay   │   (TLS 1.3)      │ deliver  │
//!                              └──────────┘                  └──────────┘
//! ```
//!
//! Modules follow the data flow:
//! - [`receive`]: the DICOM upper-layer acceptor (C-ECHO, C-STORE SCP). Streams data PDVs
//!   straight into the spool and answers only after a synced commit.
//! - [`spool`]: the encrypted, persistent object store and per-destination queues
//!   (RocksDB lives only in `spool/rocks.rs`).
//! - [`relay`]: the site link's wire format and its listener, which receives objects from a
//!   peer gateway (the sending side is [`deliver::gateway`]).
//! - [`deliver`]: delivery to destinations, behind one interface with a typed failure
//!   taxonomy: the peer gateway (STOW-RS client of the site link), a C-STORE SCU towards a
//!   PACS, or a folder.
//! - [`dispatch`]: per-destination workers that drain the queues: retry budgets, circuit
//!   breaking and dead letters.
//!
//! - [`hl7`]: HL7 v2 messages (orders, reports) over MLLP: the parser of the few fields the
//!   gateway needs, ACKs, framing, and the `[[hl7_listener]]`. Messages share the spool,
//!   the keystore, the queues and the site link with DICOM objects (see
//!   [`relay`] for the link's HL7 request type and [`deliver::hl7`] for MLLP delivery).
//!
//! Dependency arrows follow the data: `receive` → `spool` ← `dispatch` → `deliver`; the
//! link listener in `relay` writes into the spool like `receive` does.
//!
//! Supporting modules: [`config`] (TOML), [`dimse`] (command-set codec and statuses),
//! [`dataset`] (Part-10 framing and the identity scanner), [`sop`] (storage SOP classes and
//! transfer syntaxes), [`tls`] (rustls configs and peer identity), [`metrics`] (every metric
//! name), [`observe`] (scrape-time gauges and zero series), [`admin_http`] (`/healthz`,
//! `/readyz`, `/metrics`), [`admin`] (the operator's Unix socket: status, queues, dead
//! letters, KEK versions), [`rotation`] (KEK rotation on a running node: new versions, the
//! background rewrap, retirement), [`verify`] (every stored object opened and checked, and
//! failures quarantined), [`cli`] (the `status`, `queue` and `keys` commands),
//! [`node`] (wiring one node),
//! [`pki`] (development PKI), [`demo`] (the two-site demo), [`twosite`] (the two-site
//! layout and configs the demo and the end-to-end tests share), [`exit`] (exit codes),
//! [`healthcheck`] (the container's probe of `/healthz`). `fuzzing` (hidden) holds the
//! entry points of the `cargo fuzz` targets in `fuzz/`.
//!
//! ## Invariants
//! 1. A C-STORE or STOW-RS request (or an HL7 message, with AA) is acknowledged with
//!    success only after the object, its metadata and its queue entries for every
//!    destination are committed with a synced write.
//! 2. An object leaves the spool only after every destination it was queued for confirmed it
//!    (a success status from the PACS, a 200 from the peer gateway after *its* synced commit,
//!    or a synced file in a hand-off folder).
//! 3. Plaintext exists only in memory, between opening a segment and sending it (and in the
//!    `folder` destination's output, which is plaintext by design).
//! 4. Every ciphertext is bound to its identity: a segment opened under another object's
//!    identity, at another index, or without its final segment fails.
//! 5. Nothing that identifies a patient is written to logs at info level, to metric labels,
//!    or to the data directory in plaintext (database keys are keyed hashes or random ids).

pub mod admin;
pub mod admin_http;
pub mod check;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod deliver;
pub mod demo;
pub mod dimse;
pub mod dispatch;
pub mod exit;
#[doc(hidden)]
pub mod fuzzing;
pub mod healthcheck;
pub mod hl7;
pub mod metrics;
pub mod node;
pub mod observe;
pub mod pki;
pub mod receive;
pub mod relay;
pub mod rotation;
pub mod routing;
pub mod sop;
pub mod spool;
pub mod tls;
pub mod twosite;
pub mod verify;

/// Our implementation class UID (a UUID-derived UID under 2.25) and version name,
/// written into the Part-10 file meta of every object the gateway frames.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.255974823395624851129187612541364455613";
/// Implementation version name (at most 16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = "DICOMGW_0_1";
