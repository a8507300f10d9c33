//! The on-disk formats are the same under both crypto backends.
//!
//! CI runs this file twice: in the default build (aws-lc-rs) and in the `ring` build
//! (`--no-default-features --features ring`). The derived values (KEK check value, index
//! ids, SHA-256) are pinned to bytes, and data sealed under each backend (random nonces,
//! recorded once) must open under the build's backend: a spool written by a node of one
//! build opens in a node of the other.

use keystore::{Kek, Sha256, open_record, open_segment};

/// The KEK of every fixture below.
const KEK: [u8; 32] = [0x42; 32];
/// Context of the wrapped DEK (the spool binds the study key id there).
const CONTEXT: &[u8] = b"study-key fixture";
/// Identity the segments were sealed for.
const IDENTITY: &[u8] = b"object fixture identity";
/// Associated data of the record.
const RECORD_AD: &[u8] = b"meta fixture";
const SEGMENT0: &[u8] = b"first segment of the fixture object";
const SEGMENT1: &[u8] = b"last segment";
const RECORD: &[u8] = b"a metadata record";

/// Data sealed by one backend: a DEK wrapped under [`KEK`], two segments of one object and
/// a record, all under that DEK.
struct Sealed {
    backend: &'static str,
    wrapped: &'static str,
    segment0: &'static str,
    segment1: &'static str,
    record: &'static str,
}

const SEALED: [Sealed; 2] = [
    Sealed {
        backend: "aws-lc-rs",
        wrapped: concat!(
            "01000000019ff9013f48e55619e07e053b3860858c3eba8ccaa12b9e461700ca5d",
            "711cf295fefab479c258616ba74de84158a1e9072e664b3d369262280d8e4172"
        ),
        segment0: concat!(
            "0100846ad1bf7b7e4c326b519ffec1dc6b3e15a0e07a4910c4c96dc08cb21f6c53",
            "33479068e0b61bf995371830a7dbc53f13c50c827a3b54d6096e9e6f64ef00f2"
        ),
        segment1: "010128faf3c98128c2910f74cf7f76f528d4a1de0e3935ceb70e4deb2b62c8173e039cdf5ae7855c1fc1",
        record: "016f22a5570f9db55dd426c34b0ecb8a9298481a65165f15f1f11fa0b15fcc34127cf325ac1a32268d2e2d3077b7",
    },
    Sealed {
        backend: "ring",
        wrapped: concat!(
            "01000000010b415ba417c83fcc7c5977568b2734113ee96f5fd8292a2394042b1a",
            "acb3ad0cd6c9fa688906a1eae6c96d20d99f8e3398ff817a59d6882792125791"
        ),
        segment0: concat!(
            "01007f5c955999d75c14961aed5ba8d8b8725d295ae681932cc31b3f67eb8993ba",
            "c36134dba01c49e2653adcef3f8a5d55511e133209598cbae467cf4e749ca069"
        ),
        segment1: "0101c2d1daefd65765c0f9ce8c4bf8997cd231e0278b3db094fd6c5ef624c63ef4d602131495c65a56e8",
        record: "01767459d9c55a9103a10450641cf746ccacf3c29f4fba6a67c5c9bcc6ec0c08c8a3c061a5423e1a6ea0d431eb73",
    },
];

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex fixture"))
        .collect()
}

#[test]
fn derived_values_are_the_same_bytes_under_every_backend() {
    let kek = Kek::from_bytes(KEK);
    assert_eq!(
        hex(&kek.check_value()),
        "9a745913a30055e5c0fd9dccbcad277bde2166cf3d43a1aa7979dfd5ea3d9de6",
        "KEK check value under {}",
        keystore::BACKEND
    );
    let ids = kek.index_hasher();
    assert_eq!(
        hex(&ids.id("study", b"1.2.840.10008.1")),
        "71841c08abdfba23b9282e8938f0b824",
        "index id under {}",
        keystore::BACKEND
    );
    let mut h = Sha256::new();
    h.update(b"abc");
    assert_eq!(
        hex(&h.finish()),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn data_sealed_under_each_backend_opens_under_this_one() {
    let kek = Kek::from_bytes(KEK);
    for s in &SEALED {
        let dek = kek.unwrap(&unhex(s.wrapped), CONTEXT).unwrap_or_else(|e| {
            panic!(
                "DEK wrapped under {} unwraps under {}: {e}",
                s.backend,
                keystore::BACKEND
            )
        });
        let (p0, final0) = open_segment(&dek, IDENTITY, 0, &unhex(s.segment0)).expect("segment 0");
        let (p1, final1) = open_segment(&dek, IDENTITY, 1, &unhex(s.segment1)).expect("segment 1");
        assert_eq!(
            (p0.as_slice(), final0),
            (SEGMENT0, false),
            "segment 0 of {}",
            s.backend
        );
        assert_eq!(
            (p1.as_slice(), final1),
            (SEGMENT1, true),
            "segment 1 of {}",
            s.backend
        );
        assert_eq!(
            open_record(&dek, RECORD_AD, &unhex(s.record)).expect("record"),
            RECORD
        );
        // The fixtures are live: the same bytes under another context, index or AD fail.
        assert!(kek.unwrap(&unhex(s.wrapped), b"another study").is_err());
        assert!(open_segment(&dek, IDENTITY, 1, &unhex(s.segment0)).is_err());
        assert!(open_record(&dek, b"other", &unhex(s.record)).is_err());
    }
}

/// Prints a fresh set of [`SEALED`] fixtures under this build's backend
/// (`cargo test -p dicom-gateway-keystore --test backends -- --ignored --nocapture`).
#[test]
#[ignore = "prints fixtures; not a check"]
fn print_fixtures() {
    let kek = Kek::from_bytes(KEK);
    let dek = keystore::Dek::generate().expect("dek");
    println!("backend: {}", keystore::BACKEND);
    println!("check value: {}", hex(&kek.check_value()));
    println!(
        "index id: {}",
        hex(&kek.index_hasher().id("study", b"1.2.840.10008.1"))
    );
    println!("wrapped: {}", hex(&kek.wrap(&dek, CONTEXT).expect("wrap")));
    let s0 = keystore::seal_segment(&dek, IDENTITY, 0, false, SEGMENT0).expect("seal");
    let s1 = keystore::seal_segment(&dek, IDENTITY, 1, true, SEGMENT1).expect("seal");
    println!("segment0: {}", hex(&s0));
    println!("segment1: {}", hex(&s1));
    println!(
        "record: {}",
        hex(&keystore::seal_record(&dek, RECORD_AD, RECORD).expect("seal"))
    );
}
