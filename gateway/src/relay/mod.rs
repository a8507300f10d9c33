//! Relay: the site link between two gateways.
//!
//! Each object travels as one DICOMweb STOW-RS request (`POST /dicomweb/studies`,
//! `multipart/related; type="application/dicom"`, one Part-10 instance in one part) over
//! HTTP/2 with TLS 1.3 and mutual authentication. Many requests share one connection, so a
//! high-latency link stays full.
//!
//! The part carries two standard MIME/HTTP headers besides its content type:
//! - `Content-ID: <object-id@node>`: the sender's transfer id, stable across retries, which
//!   the receiver uses to recognise an identical re-send;
//! - `Content-Digest: sha-256=:…:` (RFC 9530): SHA-256 of the part content, computed by the
//!   sender when it received the object and checked by the receiver before it commits.
//!
//! HL7 v2 messages travel on the same link as a request type of their own: `POST
//! /hl7/v2/messages` ([`HL7_PATH`]) with the message, byte for byte, as the body
//! ([`HL7_MEDIA_TYPE`]), and the same `Content-ID` and `Content-Digest` headers as a STOW
//! part (on the request). Deduplication and statuses are those of a STOW part: an identical
//! re-send is a 200 without a second copy, the same transfer with other bytes a 409.
//!
//! Invariants: the receiver answers 200 only after its own synced commit, and the sender
//! deletes its copy only after that 200 (see [`crate::dispatch`]). The sender is
//! [`crate::deliver::gateway`].

pub mod server;

/// The STOW-RS path.
pub const STOW_PATH: &str = "/dicomweb/studies";

/// The path HL7 v2 messages are posted to.
pub const HL7_PATH: &str = "/hl7/v2/messages";

/// The media type of an HL7 v2 message in its ER7 (pipe) encoding.
pub const HL7_MEDIA_TYPE: &str = "x-application/hl7-v2+er7";

/// Format a `Content-Digest` value for a SHA-256.
pub fn content_digest(digest: &[u8; 32]) -> String {
    use base64::Engine as _;
    format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// Parse the `sha-256` member of a `Content-Digest` value.
pub fn parse_content_digest(value: &str) -> Option<[u8; 32]> {
    use base64::Engine as _;
    value.split(',').find_map(|member| {
        let (alg, v) = member.trim().split_once('=')?;
        if !alg.trim().eq_ignore_ascii_case("sha-256") {
            return None;
        }
        let b64 = v.trim().strip_prefix(':')?.strip_suffix(':')?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        bytes.try_into().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_header_round_trips() {
        let d = [7u8; 32];
        let v = content_digest(&d);
        assert!(v.starts_with("sha-256=:") && v.ends_with(':'));
        assert_eq!(parse_content_digest(&v), Some(d));
        assert_eq!(
            parse_content_digest(&format!("sha-512=:AAAA:, {v}")),
            Some(d)
        );
        assert_eq!(parse_content_digest("sha-256=:AAAA:"), None);
        assert_eq!(parse_content_digest("garbage"), None);
    }
}
