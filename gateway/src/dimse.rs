//! The DIMSE command set: codec, request/response builders and status codes.
//!
//! `dicom-ul` has no DIMSE layer, so this module owns it. A command set is always encoded in
//! implicit VR little endian (PS3.7 §6.3.1). Invariants:
//! - decoding never allocates more than the input it was handed, and the caller bounds that
//!   input ([`MAX_COMMAND_BYTES`]); [`CommandAssembler`] is the one place that gathers a
//!   command set from its PDV fragments, and it enforces that bound before it copies;
//! - unknown command elements are skipped, not rejected;
//! - encoding always writes a correct Command Group Length (0000,0000).

use std::fmt;

/// Largest command set we reassemble from PDVs. Real command sets are a few hundred bytes.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Command Field values (PS3.7 §E.1).
pub mod field {
    /// C-STORE-RQ
    pub const C_STORE_RQ: u16 = 0x0001;
    /// C-STORE-RSP
    pub const C_STORE_RSP: u16 = 0x8001;
    /// C-ECHO-RQ
    pub const C_ECHO_RQ: u16 = 0x0030;
    /// C-ECHO-RSP
    pub const C_ECHO_RSP: u16 = 0x8030;
    /// C-CANCEL-RQ (never answered)
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
}

/// DIMSE status codes used by the gateway (PS3.4 Annex B, PS3.7 Annex C).
pub mod status {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: out of resources (the spool could not persist the object).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: data set does not match SOP class.
    pub const DATASET_DOES_NOT_MATCH: u16 = 0xA900;
    /// Error: cannot understand.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Failure: processing failure.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// Failure: SOP class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Failure: unrecognized operation.
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// Failure: invalid argument value (e.g. a malformed UID).
    pub const INVALID_ARGUMENT_VALUE: u16 = 0x0115;
}

/// How a peer's status is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// 0x0000.
    Success,
    /// 0x0001, 0x0107, 0x0116 or 0xBxxx: stored, with a remark.
    Warning,
    /// 0xFF00 / 0xFF01.
    Pending,
    /// 0xFE00.
    Cancel,
    /// Anything else.
    Failure,
}

/// Classify a DIMSE status.
pub fn classify(status: u16) -> StatusClass {
    match status {
        0x0000 => StatusClass::Success,
        0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF => StatusClass::Warning,
        0xFF00 | 0xFF01 => StatusClass::Pending,
        0xFE00 => StatusClass::Cancel,
        _ => StatusClass::Failure,
    }
}

/// Value of Command Data Set Type meaning "no data set follows".
pub const NO_DATA_SET: u16 = 0x0101;

/// A decoded command set, holding the elements the gateway uses. `Debug` redacts the
/// Affected SOP Instance UID and the peer's error comment.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Command {
    /// (0000,0100) Command Field.
    pub field: u16,
    /// (0000,0110) Message ID.
    pub message_id: Option<u16>,
    /// (0000,0120) Message ID Being Responded To.
    pub responded_to: Option<u16>,
    /// (0000,0002) Affected SOP Class UID.
    pub affected_sop_class: Option<String>,
    /// (0000,1000) Affected SOP Instance UID.
    pub affected_sop_instance: Option<String>,
    /// (0000,0700) Priority.
    pub priority: Option<u16>,
    /// (0000,0800) Command Data Set Type != 0x0101.
    pub has_data_set: bool,
    /// (0000,0900) Status.
    pub status: Option<u16>,
    /// (0000,0902) Error Comment.
    pub error_comment: Option<String>,
    /// (0000,1030) Move Originator Application Entity Title.
    pub move_originator_ae: Option<String>,
    /// (0000,1031) Move Originator Message ID.
    pub move_originator_id: Option<u16>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::dataset::RedactedUid;
        f.debug_struct("Command")
            .field("field", &format_args!("0x{:04X}", self.field))
            .field("message_id", &self.message_id)
            .field("responded_to", &self.responded_to)
            .field("affected_sop_class", &self.affected_sop_class)
            .field(
                "affected_sop_instance",
                &RedactedUid(self.affected_sop_instance.as_deref()),
            )
            .field("priority", &self.priority)
            .field("has_data_set", &self.has_data_set)
            .field("status", &self.status)
            .field(
                "error_comment",
                &self
                    .error_comment
                    .as_ref()
                    .map(|c| format!("<{} bytes>", c.len())),
            )
            .field("move_originator_ae", &self.move_originator_ae)
            .field("move_originator_id", &self.move_originator_id)
            .finish()
    }
}

/// Why a command set could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DimseError {
    /// The bytes end inside an element.
    #[error("command set truncated at offset {0}")]
    Truncated(usize),
    /// An element outside group 0000, or an undefined length.
    #[error("element ({group:04X},{element:04X}) is not allowed in a command set")]
    BadElement {
        /// Group.
        group: u16,
        /// Element.
        element: u16,
    },
    /// A US element whose length is not 2.
    #[error("element (0000,{0:04X}) has a bad length")]
    BadLength(u16),
    /// No Command Field.
    #[error("command set has no Command Field (0000,0100)")]
    NoCommandField,
    /// Larger than [`MAX_COMMAND_BYTES`].
    #[error("command set exceeds {MAX_COMMAND_BYTES} bytes")]
    TooLarge,
}

impl fmt::Display for Command {
    /// A log-safe summary: no UIDs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "command 0x{:04X}", self.field)?;
        if let Some(id) = self.message_id {
            write!(f, " id {id}")?;
        }
        if let Some(s) = self.status {
            write!(f, " status 0x{s:04X}")?;
        }
        Ok(())
    }
}

fn text(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .trim_end_matches(['\0', ' '])
        .trim_start_matches(' ')
        .to_owned()
}

fn us(element: u16, value: &[u8]) -> Result<u16, DimseError> {
    match value {
        [a, b] => Ok(u16::from_le_bytes([*a, *b])),
        _ => Err(DimseError::BadLength(element)),
    }
}

impl Command {
    /// Decode an implicit-VR-LE command set.
    pub fn decode(bytes: &[u8]) -> Result<Command, DimseError> {
        if bytes.len() > MAX_COMMAND_BYTES {
            return Err(DimseError::TooLarge);
        }
        let mut cmd = Command::default();
        let mut has_field = false;
        let mut pos = 0usize;
        while pos < bytes.len() {
            let header = bytes.get(pos..pos + 8).ok_or(DimseError::Truncated(pos))?;
            let group = u16::from_le_bytes([header[0], header[1]]);
            let element = u16::from_le_bytes([header[2], header[3]]);
            let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            if group != 0x0000 || len == u32::MAX {
                return Err(DimseError::BadElement { group, element });
            }
            let start = pos + 8;
            let end = start
                .checked_add(len as usize)
                .filter(|e| *e <= bytes.len())
                .ok_or(DimseError::Truncated(pos))?;
            let value = &bytes[start..end];
            match element {
                0x0002 => cmd.affected_sop_class = Some(text(value)),
                0x0100 => {
                    cmd.field = us(element, value)?;
                    has_field = true;
                }
                0x0110 => cmd.message_id = Some(us(element, value)?),
                0x0120 => cmd.responded_to = Some(us(element, value)?),
                0x0700 => cmd.priority = Some(us(element, value)?),
                0x0800 => cmd.has_data_set = us(element, value)? != NO_DATA_SET,
                0x0900 => cmd.status = Some(us(element, value)?),
                0x0902 => cmd.error_comment = Some(text(value)),
                0x1000 => cmd.affected_sop_instance = Some(text(value)),
                0x1030 => cmd.move_originator_ae = Some(text(value)),
                0x1031 => cmd.move_originator_id = Some(us(element, value)?),
                _ => {}
            }
            pos = end;
        }
        if !has_field {
            return Err(DimseError::NoCommandField);
        }
        Ok(cmd)
    }

    /// Encode as an implicit-VR-LE command set with its group length.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(256);
        let mut put = |element: u16, value: &[u8]| {
            body.extend_from_slice(&0u16.to_le_bytes());
            body.extend_from_slice(&element.to_le_bytes());
            body.extend_from_slice(&(value.len() as u32).to_le_bytes());
            body.extend_from_slice(value);
        };
        // Elements in ascending tag order.
        if let Some(uid) = &self.affected_sop_class {
            put(0x0002, &pad(uid, 0));
        }
        put(0x0100, &self.field.to_le_bytes());
        if let Some(v) = self.message_id {
            put(0x0110, &v.to_le_bytes());
        }
        if let Some(v) = self.responded_to {
            put(0x0120, &v.to_le_bytes());
        }
        if let Some(v) = self.priority {
            put(0x0700, &v.to_le_bytes());
        }
        let ds_type: u16 = if self.has_data_set {
            0x0000
        } else {
            NO_DATA_SET
        };
        put(0x0800, &ds_type.to_le_bytes());
        if let Some(v) = self.status {
            put(0x0900, &v.to_le_bytes());
        }
        if let Some(c) = &self.error_comment {
            let c: String = c
                .chars()
                .filter(|c| c.is_ascii() && !c.is_control())
                .take(64)
                .collect();
            put(0x0902, &pad(&c, b' '));
        }
        if let Some(uid) = &self.affected_sop_instance {
            put(0x1000, &pad(uid, 0));
        }
        if let Some(ae) = &self.move_originator_ae {
            put(0x1030, &pad(ae, b' '));
        }
        if let Some(v) = self.move_originator_id {
            put(0x1031, &v.to_le_bytes());
        }
        let mut out = Vec::with_capacity(body.len() + 12);
        out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// C-ECHO-RQ.
    pub fn echo_rq(message_id: u16) -> Command {
        Command {
            field: field::C_ECHO_RQ,
            message_id: Some(message_id),
            affected_sop_class: Some(VERIFICATION_SOP_CLASS.to_owned()),
            ..Default::default()
        }
    }

    /// C-STORE-RQ with priority medium.
    pub fn store_rq(message_id: u16, sop_class: &str, sop_instance: &str) -> Command {
        Command {
            field: field::C_STORE_RQ,
            message_id: Some(message_id),
            affected_sop_class: Some(sop_class.to_owned()),
            affected_sop_instance: Some(sop_instance.to_owned()),
            priority: Some(0),
            has_data_set: true,
            ..Default::default()
        }
    }

    /// The response to this request with the given status. Echoes the affected SOP class
    /// and instance, as PS3.7 requires for C-STORE-RSP and C-ECHO-RSP. For an unknown
    /// command, the response field is the request field with bit 15 set.
    pub fn response(&self, status: u16) -> Command {
        Command {
            field: self.field | 0x8000,
            responded_to: Some(self.message_id.unwrap_or(0)),
            affected_sop_class: self.affected_sop_class.clone(),
            affected_sop_instance: self.affected_sop_instance.clone(),
            status: Some(status),
            ..Default::default()
        }
    }

    /// True for a request (bit 15 clear).
    pub fn is_request(&self) -> bool {
        self.field & 0x8000 == 0
    }
}

/// Gathers a command set from its PDV fragments (PS3.8 §9.3.5: a command may span several
/// P-DATA PDVs, the last one flagged) and decodes it. Both directions use it: the C-STORE
/// SCP for requests ([`crate::receive`]) and the SCU for responses ([`crate::deliver`]).
///
/// Invariant: the buffered fragments never exceed [`MAX_COMMAND_BYTES`]; a fragment that
/// would pass the bound is refused before it is copied, and the buffer is emptied.
#[derive(Debug, Default)]
pub struct CommandAssembler {
    /// The fragments received so far of the command being assembled.
    buf: Vec<u8>,
}

impl CommandAssembler {
    /// Add the next fragment. `Ok(Some(command))` once the fragment flagged `is_last` is in
    /// (the assembler is then empty again), `Ok(None)` while more are to come.
    pub fn push(&mut self, fragment: &[u8], is_last: bool) -> Result<Option<Command>, DimseError> {
        if self.buf.len().saturating_add(fragment.len()) > MAX_COMMAND_BYTES {
            self.buf = Vec::new();
            return Err(DimseError::TooLarge);
        }
        self.buf.extend_from_slice(fragment);
        if !is_last {
            return Ok(None);
        }
        let bytes = std::mem::take(&mut self.buf);
        Command::decode(&bytes).map(Some)
    }

    /// Bytes buffered for the command being assembled.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True between commands.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// The Verification SOP Class (C-ECHO).
pub const VERIFICATION_SOP_CLASS: &str = "1.2.840.10008.1.1";

/// Pad a value to even length, as DICOM requires (`0` for UI, space for text).
fn pad(s: &str, with: u8) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    if v.len() % 2 == 1 {
        v.push(with);
    }
    v
}

/// A valid DICOM UID: 1–64 characters, digits and dots, no empty component, and no leading
/// zero in a multi-digit component.
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && !(c.len() > 1 && c.starts_with('0'))
        })
}

/// Message ids for requests we send: start at 1 and wrap, skipping 0.
#[derive(Debug, Default)]
pub struct MessageIds(u16);

impl MessageIds {
    /// The next id.
    pub fn next_id(&mut self) -> u16 {
        self.0 = self.0.wrapping_add(1);
        if self.0 == 0 {
            self.0 = 1;
        }
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_request_round_trips_with_group_length() {
        let mut rq = Command::store_rq(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5");
        rq.move_originator_ae = Some("MOVER".into());
        rq.move_originator_id = Some(99);
        let bytes = rq.encode();
        // (0000,0000) UL, length 4, value = rest of the bytes
        assert_eq!(&bytes[..8], &[0, 0, 0, 0, 4, 0, 0, 0]);
        let gl = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(gl, bytes.len() - 12);
        // every value has even length
        let decoded = Command::decode(&bytes).unwrap();
        assert_eq!(decoded, rq);
        assert!(decoded.has_data_set);
    }

    #[test]
    fn debug_output_redacts_the_instance_uid() {
        let mut rq = Command::store_rq(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5");
        rq.error_comment = Some("DOE^JANE not found".into());
        let shown = format!("{rq:?}");
        assert!(
            !shown.contains("1.2.3.4.5") && !shown.contains("DOE"),
            "{shown}"
        );
        assert!(shown.contains("1.2.840.10008.5.1.4.1.1.2"), "{shown}");
    }

    #[test]
    fn response_echoes_ids_and_sets_bit_15() {
        let rq = Command::store_rq(513, "1.2.3", "4.5.6");
        let rsp = rq.response(status::OUT_OF_RESOURCES);
        assert_eq!(rsp.field, field::C_STORE_RSP);
        assert_eq!(rsp.responded_to, Some(513));
        assert_eq!(rsp.affected_sop_instance.as_deref(), Some("4.5.6"));
        let back = Command::decode(&rsp.encode()).unwrap();
        assert_eq!(back.status, Some(0xA700));
        assert!(!back.has_data_set);
        // An unknown command gets a response with bit 15 set
        let odd = Command {
            field: 0x0020,
            message_id: Some(3),
            ..Default::default()
        };
        assert_eq!(odd.response(status::UNRECOGNIZED_OPERATION).field, 0x8020);
    }

    #[test]
    fn echo_round_trip() {
        let rq = Command::echo_rq(1);
        let d = Command::decode(&rq.encode()).unwrap();
        assert_eq!(d.field, field::C_ECHO_RQ);
        assert!(!d.has_data_set);
        assert_eq!(
            d.affected_sop_class.as_deref(),
            Some(VERIFICATION_SOP_CLASS)
        );
    }

    #[test]
    fn hostile_inputs_are_errors_not_panics() {
        let good = Command::echo_rq(1).encode();
        for cut in 0..good.len() {
            let _ = Command::decode(&good[..cut]);
        }
        assert!(matches!(
            Command::decode(&good[..good.len() - 1]),
            Err(DimseError::Truncated(_))
        ));
        // huge declared length
        let mut evil = vec![0, 0, 0, 1];
        evil.extend_from_slice(&u32::MAX.wrapping_sub(1).to_le_bytes());
        assert!(matches!(
            Command::decode(&evil),
            Err(DimseError::Truncated(_))
        ));
        // undefined length
        let mut evil = vec![0, 0, 0, 1];
        evil.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Command::decode(&evil),
            Err(DimseError::BadElement { .. })
        ));
        // data-set element in a command
        let evil = [8, 0, 0x18, 0, 0, 0, 0, 0];
        assert!(matches!(
            Command::decode(&evil),
            Err(DimseError::BadElement { .. })
        ));
        // US with bad length
        let evil = [0, 0, 0, 1, 1, 0, 0, 0, 5];
        assert_eq!(Command::decode(&evil), Err(DimseError::BadLength(0x0100)));
        // no command field
        assert_eq!(Command::decode(&[]), Err(DimseError::NoCommandField));
        assert_eq!(
            Command::decode(&vec![0; MAX_COMMAND_BYTES + 1]),
            Err(DimseError::TooLarge)
        );
    }

    #[test]
    fn fragments_assemble_and_the_bound_holds_before_copying() {
        let bytes = Command::echo_rq(9).encode();
        let mut a = CommandAssembler::default();
        let (head, tail) = bytes.split_at(5);
        assert_eq!(a.push(head, false), Ok(None));
        assert_eq!(a.push(&[], false), Ok(None));
        let cmd = a.push(tail, true).unwrap().expect("complete");
        assert_eq!(cmd.message_id, Some(9));
        assert!(a.is_empty());
        // one byte over the bound, spread over fragments: refused, and nothing kept
        assert_eq!(a.push(&vec![0; MAX_COMMAND_BYTES], false), Ok(None));
        assert_eq!(a.push(&[0], true), Err(DimseError::TooLarge));
        assert!(a.is_empty());
        // and the next command assembles normally
        assert!(a.push(&bytes, true).unwrap().is_some());
    }

    #[test]
    fn statuses() {
        assert_eq!(classify(0), StatusClass::Success);
        assert_eq!(classify(0xB000), StatusClass::Warning);
        assert_eq!(classify(0xA700), StatusClass::Failure);
        assert_eq!(classify(0xC000), StatusClass::Failure);
        assert_eq!(classify(0xFF00), StatusClass::Pending);
    }

    #[test]
    fn uids() {
        assert!(is_valid_uid("1.2.840.10008.5.1.4.1.1.2"));
        assert!(is_valid_uid("2.25.0"));
        assert!(!is_valid_uid(""));
        assert!(!is_valid_uid("1..2"));
        assert!(!is_valid_uid("1.02"));
        assert!(!is_valid_uid("1.2.a"));
        assert!(!is_valid_uid("../etc/passwd"));
        assert!(!is_valid_uid(&"1.".repeat(40)));
    }

    #[test]
    fn message_ids_wrap_and_skip_zero() {
        let mut ids = MessageIds(u16::MAX - 1);
        assert_eq!(ids.next_id(), u16::MAX);
        assert_eq!(ids.next_id(), 1);
    }
}
