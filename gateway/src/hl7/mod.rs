//! HL7 v2: the parts of the standard the gateway needs to carry messages, no more.
//!
//! Owns three things, all on bytes from a peer:
//! - [`parse`]: reads a message only as far as routing, keying and acknowledging need: the
//!   MSH segment (separators, sending and receiving application and facility, message
//!   type, control id, version) and PID-3 (the patient identifier list). The rest of the
//!   message is carried byte for byte and never interpreted.
//! - [`ack`]: builds the original-mode acknowledgement (`MSH` + `MSA`) for a message.
//! - [`read_frame`] / [`write_frame`]: MLLP framing (`<VT> message <FS><CR>`).
//!
//! Invariants:
//! - nothing here panics on any input: every index is checked, every length bounded;
//! - [`read_frame`] never buffers more than its `max` bytes (plus one read) and waits at
//!   most its deadline; bytes before a start block or after the limit end the frame with a
//!   typed [`FrameError`];
//! - an ACK echoes only MSH fields of the message it answers (control characters removed,
//!   each at most [`MAX_ECHO`] bytes) and our own fixed words: never PID or any other
//!   segment, so an ACK carries no patient data;
//! - [`Message::patient`] is the key material for the patient's data key and the in-order
//!   grouping; it is held in memory and sealed in the spool, never logged or written in
//!   plaintext.
//!
//! The listener is [`listener`]; the destination that delivers over MLLP is
//! [`crate::deliver::hl7`].

pub mod listener;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// MLLP start block.
pub const START: u8 = 0x0b;
/// MLLP end block (followed by [`CR`]).
pub const END: u8 = 0x1c;
/// Segment terminator.
pub const CR: u8 = 0x0d;

/// The `sop_class_uid` the spool records for an HL7 v2 message (not a UID, so it can never
/// be taken for a DICOM object's).
pub const SPOOL_CLASS: &str = "hl7v2";

/// The largest message any HL7 listener or the link accepts (16 MiB): a cap on
/// `max_message_size`.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Longest control id (MSH-10) accepted (HL7 v2.7 allows 199).
pub const MAX_CONTROL_ID: usize = 199;
/// Longest patient key (PID-3.1 and PID-3.4) accepted.
pub const MAX_PATIENT_KEY: usize = 250;
/// Longest MSH field echoed into an ACK.
pub const MAX_ECHO: usize = 180;

/// Why a message was refused (an `AR`). The words are ours; none carries message content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The message does not start with an MSH segment and its separators.
    #[error("the message does not start with a valid MSH segment")]
    NoMsh,
    /// The encoding characters (MSH-2) are missing or unusable.
    #[error("MSH-2 (encoding characters) is invalid")]
    BadEncoding,
    /// A byte that has no place in an HL7 message (NUL, an MLLP block character).
    #[error("the message holds a control byte that HL7 does not allow")]
    ControlByte,
    /// MSH-9 (message type) is missing or malformed.
    #[error("MSH-9 (message type) is missing or invalid")]
    NoMessageType,
    /// MSH-10 (control id) is missing or too long.
    #[error("MSH-10 (message control id) is missing, too long or not printable")]
    NoControlId,
    /// An acknowledgement sent to us: it is not a message to store.
    #[error("an ACK is not a message the gateway stores")]
    IsAck,
    /// No PID segment, or PID-3 has no identifier.
    #[error("no patient identifier (PID-3.1)")]
    NoPatient,
    /// PID-3 is longer than we key on.
    #[error("the patient identifier (PID-3) is too long")]
    PatientTooLong,
    /// A segment name that is not three upper-case letters or digits.
    #[error("a segment has an invalid name")]
    BadSegment,
}

/// What the gateway reads of a message.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    /// Field separator (MSH-1).
    pub field_sep: u8,
    /// Encoding characters (MSH-2): component, repetition, escape, subcomponent.
    pub encoding: Vec<u8>,
    /// MSH-3..MSH-6: sending application and facility, receiving application and facility.
    pub sending_app: String,
    /// MSH-4.
    pub sending_facility: String,
    /// MSH-5.
    pub receiving_app: String,
    /// MSH-6.
    pub receiving_facility: String,
    /// MSH-9.1 and MSH-9.2, joined by `^` (e.g. `ORM^O01`).
    pub message_type: String,
    /// MSH-9.2, the trigger event (may be empty).
    pub trigger: String,
    /// MSH-10.
    pub control_id: String,
    /// MSH-11 (processing id), `P` when absent.
    pub processing_id: String,
    /// MSH-12 (version id), `2.5` when absent.
    pub version: String,
    /// The patient key: PID-3.1 of the first repetition, and `^` PID-3.4 (assigning
    /// authority) when present. Patient data: never log it.
    pub patient: String,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The patient key stays out of debug output.
        f.debug_struct("Message")
            .field("message_type", &self.message_type)
            .field("control_id", &self.control_id)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `s` without control characters, at most [`MAX_ECHO`] bytes (on a character boundary).
fn echo(s: &str) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).collect();
    if out.len() > MAX_ECHO {
        let mut end = MAX_ECHO;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// Read a message as far as the gateway needs (see the module docs).
pub fn parse(raw: &[u8]) -> Result<Message, ParseError> {
    if raw.len() < 8 || !raw.starts_with(b"MSH") {
        return Err(ParseError::NoMsh);
    }
    if raw.iter().any(|&b| b == 0 || b == START || b == END) {
        return Err(ParseError::ControlByte);
    }
    let field_sep = raw[3];
    if field_sep.is_ascii_alphanumeric() || field_sep.is_ascii_control() || field_sep == b' ' {
        return Err(ParseError::NoMsh);
    }
    // Segments end with CR; LF and CRLF are tolerated.
    let mut segments = raw
        .split(|&b| b == CR || b == b'\n')
        .filter(|s| !s.is_empty());
    let msh = segments.next().ok_or(ParseError::NoMsh)?;
    let fields: Vec<&[u8]> = msh.split(|&b| b == field_sep).collect();
    // fields[0] = "MSH", fields[1] = MSH-2, fields[n-1] = MSH-n.
    let encoding = fields.get(1).copied().unwrap_or_default();
    if !(4..=5).contains(&encoding.len())
        || encoding
            .iter()
            .any(|&b| b.is_ascii_alphanumeric() || b.is_ascii_control() || b == field_sep)
        || (1..encoding.len()).any(|i| encoding[..i].contains(&encoding[i]))
    {
        return Err(ParseError::BadEncoding);
    }
    let (component, repetition) = (encoding[0], encoding[1]);
    let field = |n: usize| fields.get(n - 1).copied().unwrap_or_default();
    let msg_type = field(9);
    let mut parts = msg_type.split(|&b| b == component);
    let code = parts.next().unwrap_or_default();
    let trigger = parts.next().unwrap_or_default();
    if code.len() != 3 || !code.iter().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ParseError::NoMessageType);
    }
    if trigger.len() > 3 || !trigger.iter().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ParseError::NoMessageType);
    }
    if code.eq_ignore_ascii_case(b"ACK") {
        return Err(ParseError::IsAck);
    }
    let control = field(10);
    if control.is_empty()
        || control.len() > MAX_CONTROL_ID
        || !control.iter().all(|b| b.is_ascii_graphic() || *b == b' ')
    {
        return Err(ParseError::NoControlId);
    }
    let mut patient = None;
    for seg in segments {
        let name = seg.get(..3).ok_or(ParseError::BadSegment)?;
        if !name
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            || seg.get(3).is_some_and(|&b| b != field_sep)
        {
            return Err(ParseError::BadSegment);
        }
        if name == b"PID" && patient.is_none() {
            let pid3 = seg.split(|&b| b == field_sep).nth(3).unwrap_or_default();
            let first = pid3.split(|&b| b == repetition).next().unwrap_or_default();
            let comps: Vec<&[u8]> = first.split(|&b| b == component).collect();
            let id = comps.first().copied().unwrap_or_default();
            if id.is_empty() || id.iter().all(|b| *b == b' ') {
                return Err(ParseError::NoPatient);
            }
            let mut key = text(id);
            if let Some(auth) = comps.get(3).filter(|a| !a.is_empty()) {
                key.push('^');
                key.push_str(&text(auth));
            }
            if key.len() > MAX_PATIENT_KEY {
                return Err(ParseError::PatientTooLong);
            }
            patient = Some(key);
        }
    }
    let patient = patient.ok_or(ParseError::NoPatient)?;
    let or = |b: &[u8], d: &str| {
        if b.is_empty() {
            d.to_owned()
        } else {
            echo(&text(b))
        }
    };
    let trigger = text(trigger);
    let message_type = if trigger.is_empty() {
        text(code)
    } else {
        format!("{}^{trigger}", text(code))
    };
    Ok(Message {
        field_sep,
        encoding: encoding.to_vec(),
        sending_app: echo(&text(field(3))),
        sending_facility: echo(&text(field(4))),
        receiving_app: echo(&text(field(5))),
        receiving_facility: echo(&text(field(6))),
        message_type,
        trigger,
        control_id: text(control),
        processing_id: or(field(11), "P"),
        version: or(field(12), "2.5"),
        patient,
    })
}

/// An acknowledgement code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    /// Application Accept: stored (after a synced commit).
    Accept,
    /// Application Error: not stored now; sending it again later may succeed.
    Error,
    /// Application Reject: refused; sending it again will not help.
    Reject,
}

impl AckCode {
    /// `AA`, `AE` or `AR`.
    pub fn as_str(self) -> &'static str {
        match self {
            AckCode::Accept => "AA",
            AckCode::Error => "AE",
            AckCode::Reject => "AR",
        }
    }
}

/// The separators and MSH fields an ACK echoes: those of the message answered, or
/// defaults when it had no readable MSH.
#[derive(Debug, Clone, Default)]
pub struct AckContext {
    field_sep: Option<u8>,
    encoding: Vec<u8>,
    sending_app: String,
    sending_facility: String,
    receiving_app: String,
    receiving_facility: String,
    trigger: String,
    control_id: String,
    processing_id: String,
    version: String,
}

impl AckContext {
    /// The context of a parsed message.
    pub fn of(m: &Message) -> AckContext {
        AckContext {
            field_sep: Some(m.field_sep),
            encoding: m.encoding.clone(),
            sending_app: m.sending_app.clone(),
            sending_facility: m.sending_facility.clone(),
            receiving_app: m.receiving_app.clone(),
            receiving_facility: m.receiving_facility.clone(),
            trigger: m.trigger.clone(),
            control_id: echo(&m.control_id),
            processing_id: m.processing_id.clone(),
            version: m.version.clone(),
        }
    }

    /// What can be read of the MSH of a message that did not parse (for an `AR` that
    /// still names the control id when there is one).
    pub fn salvage(raw: &[u8]) -> AckContext {
        let head = &raw[..raw.len().min(4096)];
        if head.len() < 8 || !head.starts_with(b"MSH") {
            return AckContext::default();
        }
        let sep = head[3];
        if sep.is_ascii_alphanumeric() || sep.is_ascii_control() || sep == b' ' {
            return AckContext::default();
        }
        let msh = head
            .split(|&b| b == CR || b == b'\n')
            .next()
            .unwrap_or_default();
        let fields: Vec<&[u8]> = msh.split(|&b| b == sep).collect();
        let field = |n: usize| echo(&text(fields.get(n - 1).copied().unwrap_or_default()));
        let encoding = fields.get(1).copied().unwrap_or_default();
        let usable = (4..=5).contains(&encoding.len())
            && encoding
                .iter()
                .all(|&b| !b.is_ascii_alphanumeric() && !b.is_ascii_control() && b != sep);
        if !usable {
            return AckContext::default();
        }
        // Echo fields only when they cannot break the ACK's structure.
        let clean = |s: String| {
            if s.bytes().any(|b| encoding.contains(&b)) {
                String::new()
            } else {
                s
            }
        };
        AckContext {
            field_sep: Some(sep),
            encoding: encoding.to_vec(),
            sending_app: clean(field(3)),
            sending_facility: clean(field(4)),
            receiving_app: clean(field(5)),
            receiving_facility: clean(field(6)),
            trigger: String::new(),
            control_id: clean(field(10)),
            processing_id: clean(field(11)),
            version: clean(field(12)),
        }
    }
}

/// An original-mode ACK for `ctx` with `code`; `text` (our own words, never peer data)
/// goes into MSA-3. `control_id` is the ACK's own MSH-10.
pub fn ack(ctx: &AckContext, code: AckCode, text: &str, control_id: &str) -> Vec<u8> {
    let sep = ctx.field_sep.unwrap_or(b'|') as char;
    let enc = if ctx.encoding.is_empty() {
        "^~\\&".to_owned()
    } else {
        String::from_utf8_lossy(&ctx.encoding).into_owned()
    };
    let comp = enc.chars().next().unwrap_or('^');
    let now = timestamp();
    let msg_type = if ctx.trigger.is_empty() {
        "ACK".to_owned()
    } else {
        format!("ACK{comp}{}{comp}ACK", ctx.trigger)
    };
    let processing = if ctx.processing_id.is_empty() {
        "P"
    } else {
        &ctx.processing_id
    };
    let version = if ctx.version.is_empty() {
        "2.5"
    } else {
        &ctx.version
    };
    // Our words: strip anything that is a separator in this message's encoding.
    let text: String = text
        .chars()
        .filter(|c| *c != sep && !enc.contains(*c) && !c.is_control())
        .collect();
    let mut out = format!(
        "MSH{sep}{enc}{sep}{ra}{sep}{rf}{sep}{sa}{sep}{sf}{sep}{now}{sep}{sep}{msg_type}{sep}{control_id}{sep}{processing}{sep}{version}\r\
         MSA{sep}{code}{sep}{orig}",
        ra = ctx.receiving_app,
        rf = ctx.receiving_facility,
        sa = ctx.sending_app,
        sf = ctx.sending_facility,
        code = code.as_str(),
        orig = ctx.control_id,
    );
    if !text.is_empty() {
        out.push(sep);
        out.push_str(&text);
    }
    out.push('\r');
    out.into_bytes()
}

/// `YYYYMMDDHHMMSS` in UTC, for MSH-7.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// What an acknowledgement we received says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedAck {
    /// MSA-1 folded to original mode (`CA` counts as `AA`, `CE` as `AE`, `CR` as `AR`).
    pub code: AckCode,
    /// MSA-2: the control id it acknowledges.
    pub control_id: String,
    /// Why, as far as the ACK says it in codes (see [`AckReason`]).
    pub reason: AckReason,
}

/// The coded part of a negative ACK's reason: what can be kept in a dead letter's reason,
/// shown to an operator and logged. Free text (MSA-3, ERR-3.2, ERR-7, ERR-8) is never
/// taken: a receiving system may well write a patient's name or id there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckReason {
    /// The error code: ERR-3.1 (v2.5 and later), else ERR-1.4.1 or MSA-6.1 (v2.3 and
    /// v2.4). Only a number of at most 4 digits is taken (HL7 table 0357 and the
    /// site-defined ranges are numeric); anything else is left out.
    pub code: Option<u16>,
    /// ERR-4, the severity: `E`, `W`, `I` or `F`.
    pub severity: Option<char>,
    /// Where the receiving system found the error (ERR-2, else ERR-1): segment id and
    /// field position, e.g. `PID-3`.
    pub location: Option<String>,
}

/// The meaning of an HL7 table 0357 code (message error condition codes).
pub fn error_code_meaning(code: u16) -> Option<&'static str> {
    Some(match code {
        0 => "message accepted",
        100 => "segment sequence error",
        101 => "required field missing",
        102 => "data type error",
        103 => "table value not found",
        104 => "value too long",
        200 => "unsupported message type",
        201 => "unsupported event code",
        202 => "unsupported processing id",
        203 => "unsupported version id",
        204 => "unknown key identifier",
        205 => "duplicate key identifier",
        206 => "application record locked",
        207 => "application internal error",
        _ => return None,
    })
}

impl std::fmt::Display for AckReason {
    /// `error 204 (unknown key identifier), severity E, at PID-3`; empty when the ACK said
    /// nothing coded.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(c) = self.code {
            parts.push(match error_code_meaning(c) {
                Some(m) => format!("error {c} ({m})"),
                None => format!("error {c}"),
            });
        }
        if let Some(s) = self.severity {
            parts.push(format!("severity {s}"));
        }
        if let Some(l) = &self.location {
            parts.push(format!("at {l}"));
        }
        f.write_str(&parts.join(", "))
    }
}

/// A numeric code of at most 4 digits.
fn numeric_code(b: &[u8]) -> Option<u16> {
    let b = b.trim_ascii();
    if b.is_empty() || b.len() > 4 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// `SEG-n` from a segment id and a field position, both checked.
fn location(segment: &[u8], field: &[u8]) -> Option<String> {
    let seg_ok = segment.len() == 3
        && segment
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if !seg_ok {
        return None;
    }
    let seg = String::from_utf8_lossy(segment);
    match numeric_code(field) {
        Some(n) => Some(format!("{seg}-{n}")),
        None if field.is_empty() => Some(seg.into_owned()),
        None => None,
    }
}

/// Read an ACK's MSH separators, its MSA segment and the coded part of its ERR segments;
/// `None` if it is not an ACK we can read.
pub fn parse_ack(raw: &[u8]) -> Option<ReceivedAck> {
    if raw.len() < 8 || !raw.starts_with(b"MSH") {
        return None;
    }
    let sep = raw[3];
    // MSH-2: component, repetition, escape, subcomponent; the usual ones if unreadable.
    let enc = raw.get(4..8).unwrap_or(&b"^~\\&"[..]);
    let (comp, sub) = (enc[0], enc.get(3).copied().unwrap_or(b'&'));
    let segments = || raw.split(|&b| b == CR || b == b'\n');
    let msa = segments().find(|s| s.starts_with(b"MSA") && s.get(3) == Some(&sep))?;
    let msa: Vec<&[u8]> = msa.split(|&b| b == sep).collect();
    let code = match msa.get(1).copied()? {
        b"AA" | b"CA" => AckCode::Accept,
        b"AE" | b"CE" => AckCode::Error,
        b"AR" | b"CR" => AckCode::Reject,
        _ => return None,
    };
    let control_id = text(msa.get(2).copied().unwrap_or_default());
    let first = |f: &[u8], c: u8| f.split(|&b| b == c).next().unwrap_or_default().to_vec();
    let component =
        |f: &[u8], n: usize| f.split(|&b| b == comp).nth(n).unwrap_or_default().to_vec();
    let mut reason = AckReason {
        // MSA-6 (v2.3, v2.4): the error condition, a CE.
        code: msa.get(6).and_then(|f| numeric_code(&first(f, comp))),
        ..AckReason::default()
    };
    // The first ERR segment that says anything coded.
    for err in segments().filter(|s| s.starts_with(b"ERR") && s.get(3) == Some(&sep)) {
        let f: Vec<&[u8]> = err.split(|&b| b == sep).collect();
        let field = |n: usize| f.get(n).copied().unwrap_or_default();
        // ERR-1 (v2.3 style): segment^sequence^field^code&text&system.
        let err1 = first(field(1), b'~');
        let err2 = first(field(2), b'~');
        let code = numeric_code(&first(field(3), comp))
            .or_else(|| numeric_code(&first(&component(&err1, 3), sub)));
        let severity = match field(4) {
            [s @ (b'E' | b'W' | b'I' | b'F')] => Some(*s as char),
            _ => None,
        };
        let loc = location(&component(&err2, 0), &component(&err2, 2))
            .or_else(|| location(&component(&err1, 0), &component(&err1, 2)));
        if code.is_some() || severity.is_some() || loc.is_some() {
            reason.code = code.or(reason.code);
            reason.severity = severity;
            reason.location = loc;
            break;
        }
    }
    Some(ReceivedAck {
        code,
        control_id,
        reason,
    })
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection between frames (a normal end).
    #[error("connection closed")]
    Closed,
    /// The peer closed the connection inside a frame.
    #[error("connection closed inside a frame")]
    Truncated,
    /// Bytes before a start block, or an end block not followed by CR.
    #[error("MLLP framing error")]
    Framing,
    /// The frame is longer than allowed; `prefix` holds its first bytes (for an ACK).
    #[error("message larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
        /// The first bytes of the message (at most 4 KiB), to salvage an MSH from.
        prefix: Vec<u8>,
    },
    /// No complete frame within the deadline.
    #[error("timed out")]
    Timeout,
    /// The socket failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Read one MLLP frame's content: at most `max` bytes, within `deadline` of the call.
/// Idle time before the start block counts against `idle`, not `deadline`.
///
/// Cancellation: dropping the future loses the bytes read so far; callers drop the
/// connection with it.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    idle: Duration,
    deadline: Duration,
) -> Result<Vec<u8>, FrameError> {
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(idle, r.read(&mut first))
        .await
        .map_err(|_| FrameError::Timeout)??;
    if n == 0 {
        return Err(FrameError::Closed);
    }
    if first[0] != START {
        return Err(FrameError::Framing);
    }
    tokio::time::timeout(deadline, read_body(r, max))
        .await
        .map_err(|_| FrameError::Timeout)?
}

async fn read_body<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out: Vec<u8> = Vec::with_capacity(max.min(64 * 1024));
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Err(FrameError::Truncated);
        }
        let chunk = &buf[..n];
        if let Some(pos) = chunk.iter().position(|&b| b == END) {
            if out.len() + pos > max {
                return Err(too_large(out, max));
            }
            out.extend_from_slice(&chunk[..pos]);
            // The CR after FS may arrive in the next read.
            let after = match chunk.get(pos + 1) {
                Some(&b) => b,
                None => {
                    let mut one = [0u8; 1];
                    if r.read(&mut one).await? == 0 {
                        return Err(FrameError::Truncated);
                    }
                    one[0]
                }
            };
            if after != CR {
                return Err(FrameError::Framing);
            }
            // Bytes after <FS><CR> in the same read would be the next frame: a peer must
            // wait for its ACK first (MLLP is one message at a time).
            if chunk.len() > pos + 2 {
                return Err(FrameError::Framing);
            }
            return Ok(out);
        }
        if chunk.contains(&START) {
            return Err(FrameError::Framing);
        }
        if out.len() + n > max {
            out.extend_from_slice(&chunk[..chunk.len().min(4096)]);
            return Err(too_large(out, max));
        }
        out.extend_from_slice(chunk);
    }
}

fn too_large(mut prefix: Vec<u8>, max: usize) -> FrameError {
    prefix.truncate(4096);
    FrameError::TooLarge { max, prefix }
}

/// Write one MLLP frame and flush it.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, msg: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(msg.len() + 3);
    out.push(START);
    out.extend_from_slice(msg);
    out.push(END);
    out.push(CR);
    w.write_all(&out).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORM: &str = "MSH|^~\\&|RIS|HOSP|GW|TELE|20261203120000||ORM^O01^ORM_O01|MSG00001|P|2.5\r\
PID|1||PAT123^^^HOSP^MR~OTHER^^^X||DOE^JOHN||19700101|M\r\
ORC|NW|ORD1\r\
OBR|1|ORD1||CT^CT HEAD\r";

    #[test]
    fn an_order_parses_to_its_routing_fields() {
        let m = parse(ORM.as_bytes()).unwrap();
        assert_eq!(m.message_type, "ORM^O01");
        assert_eq!(m.trigger, "O01");
        assert_eq!(m.control_id, "MSG00001");
        assert_eq!(m.patient, "PAT123^HOSP");
        assert_eq!(m.version, "2.5");
        assert_eq!(m.sending_app, "RIS");
        // The patient key is not in the debug output.
        assert!(!format!("{m:?}").contains("PAT123"));
    }

    #[test]
    fn other_separators_and_lf_segments_parse() {
        let msg = ORM.replace('|', "#").replace('\r', "\n");
        let m = parse(msg.as_bytes()).unwrap();
        assert_eq!(m.field_sep, b'#');
        assert_eq!(m.patient, "PAT123^HOSP");
        let ack = ack(&AckContext::of(&m), AckCode::Accept, "", "A1");
        let s = String::from_utf8(ack).unwrap();
        assert!(s.starts_with("MSH#^~\\&#GW#TELE#RIS#HOSP#"), "{s}");
        assert!(s.contains("\rMSA#AA#MSG00001\r"), "{s}");
    }

    #[test]
    fn bad_messages_are_refused_with_a_reason() {
        let cases: Vec<(Vec<u8>, ParseError)> = vec![
            (b"hello world".to_vec(), ParseError::NoMsh),
            (b"MSH".to_vec(), ParseError::NoMsh),
            (b"MSHA^~\\&|x".to_vec(), ParseError::NoMsh),
            (
                b"MSH|^^\\&|A|B|C|D|T||ORM^O01|1|P|2.5\r".to_vec(),
                ParseError::BadEncoding,
            ),
            (
                ORM.replace("ORM^O01^ORM_O01", "").into_bytes(),
                ParseError::NoMessageType,
            ),
            (
                ORM.replace("MSG00001", "").into_bytes(),
                ParseError::NoControlId,
            ),
            (
                ORM.replace("MSG00001", &"x".repeat(200)).into_bytes(),
                ParseError::NoControlId,
            ),
            (
                ORM.replace("PAT123^^^HOSP^MR~", "")
                    .replace("OTHER^^^X", "")
                    .into_bytes(),
                ParseError::NoPatient,
            ),
            (
                ORM.replace("PID|", "XXX|").into_bytes(),
                ParseError::NoPatient,
            ),
            (
                ORM.replace("ORC|", "orc|").into_bytes(),
                ParseError::BadSegment,
            ),
            (
                ORM.replace("ORM^O01^ORM_O01", "ACK^O01").into_bytes(),
                ParseError::IsAck,
            ),
            (
                ORM.replace("DOE", "D\u{1c}E").into_bytes(),
                ParseError::ControlByte,
            ),
            (
                ORM.replace("PAT123", &"9".repeat(300)).into_bytes(),
                ParseError::PatientTooLong,
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(
                parse(&raw),
                Err(want.clone()),
                "{}",
                String::from_utf8_lossy(&raw)
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 7u64;
        for len in 0..2000 {
            let mut b: Vec<u8> = (0..len % 300)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 33) as u8
                })
                .collect();
            if len % 3 == 0 && b.len() > 8 {
                b[..4].copy_from_slice(b"MSH|");
            }
            let _ = parse(&b);
            let _ = parse_ack(&b);
            let _ = ack(&AckContext::salvage(&b), AckCode::Reject, "x", "1");
        }
    }

    #[test]
    fn acks_round_trip_and_carry_no_patient_data() {
        let m = parse(ORM.as_bytes()).unwrap();
        for code in [AckCode::Accept, AckCode::Error, AckCode::Reject] {
            let a = ack(&AckContext::of(&m), code, "disk | low", "GW1");
            let s = String::from_utf8(a.clone()).unwrap();
            assert!(!s.contains("PAT123") && !s.contains("DOE"), "{s}");
            assert_eq!(
                parse_ack(&a),
                Some(ReceivedAck {
                    code,
                    control_id: "MSG00001".into(),
                    reason: AckReason::default(),
                })
            );
        }
        // An AR for garbage still reads as an ACK.
        let a = ack(
            &AckContext::salvage(b"garbage"),
            AckCode::Reject,
            "no MSH",
            "GW2",
        );
        assert_eq!(parse_ack(&a).map(|a| a.code), Some(AckCode::Reject));
        // A salvaged control id is echoed.
        let bad = ORM.replace("PID|", "XXX|");
        let a = ack(
            &AckContext::salvage(bad.as_bytes()),
            AckCode::Reject,
            "",
            "GW3",
        );
        assert_eq!(parse_ack(&a).unwrap().control_id, "MSG00001");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_790), (2026, 12, 3));
    }

    #[test]
    fn a_negative_ack_gives_its_codes_and_never_its_text() {
        // v2.5: ERR-2 location, ERR-3 code with text, ERR-4 severity, ERR-8 user message.
        let v25 = "MSH|^~\\&|RIS|B|GW|A|20261203||ACK^O01^ACK|R1|P|2.5\r\
                   MSA|AE|MSG1|Patient DOE^JANE (PAT123) is unknown\r\
                   ERR||PID^1^3^1|204^Unknown key PAT123^HL70357|E||||call DOE\r";
        let a = parse_ack(v25.as_bytes()).unwrap();
        assert_eq!(a.code, AckCode::Error);
        assert_eq!(a.control_id, "MSG1");
        assert_eq!(
            a.reason.to_string(),
            "error 204 (unknown key identifier), severity E, at PID-3"
        );
        // v2.3: ERR-1 (segment^seq^field^code&text&system), MSA-6.
        let v23 = "MSH|^~\\&|RIS|B|GW|A|20261203||ACK|R2|P|2.3\r\
                   MSA|AR|MSG2|bad|||101^Required field missing\r\
                   ERR|OBR^1^4^101&Required field missing&HL70357\r";
        let a = parse_ack(v23.as_bytes()).unwrap();
        assert_eq!(a.code, AckCode::Reject);
        assert_eq!(
            a.reason.to_string(),
            "error 101 (required field missing), at OBR-4"
        );
        // Codes that are not small numbers, and locations that are not segment ids, are
        // left out (they could be anything).
        let odd = "MSH|^~\\&|R|B|G|A|1||ACK|R3|P|2.5\r\
                   MSA|AE|MSG3\r\
                   ERR||SMITH^1^3|PAT123456^x|Q\r";
        let a = parse_ack(odd.as_bytes()).unwrap();
        assert_eq!(a.reason, AckReason::default());
        assert_eq!(a.reason.to_string(), "");
        // A site-defined code has no meaning of ours.
        let own = "MSH|^~\\&|R|B|G|A|1||ACK|R4|P|2.5\r\
                   MSA|AE|MSG4\r\
                   ERR|||9001|W\r";
        assert_eq!(
            parse_ack(own.as_bytes()).unwrap().reason.to_string(),
            "error 9001, severity W"
        );
    }

    #[tokio::test]
    async fn frames_are_bounded_and_checked() {
        let t = Duration::from_secs(5);
        let mut ok: &[u8] = b"\x0bMSH|abc\x1c\x0d";
        assert_eq!(read_frame(&mut ok, 100, t, t).await.unwrap(), b"MSH|abc");
        let mut empty: &[u8] = b"";
        assert!(matches!(
            read_frame(&mut empty, 100, t, t).await,
            Err(FrameError::Closed)
        ));
        let mut junk: &[u8] = b"GET / HTTP/1.1\r\n";
        assert!(matches!(
            read_frame(&mut junk, 100, t, t).await,
            Err(FrameError::Framing)
        ));
        let big = [&[START][..], &[b'x'; 300][..], &[END, CR][..]].concat();
        let mut big: &[u8] = &big;
        assert!(matches!(
            read_frame(&mut big, 100, t, t).await,
            Err(FrameError::TooLarge { max: 100, .. })
        ));
        let mut cut: &[u8] = b"\x0bMSH|abc";
        assert!(matches!(
            read_frame(&mut cut, 100, t, t).await,
            Err(FrameError::Truncated)
        ));
        let mut nocr: &[u8] = b"\x0bMSH|abc\x1cX";
        assert!(matches!(
            read_frame(&mut nocr, 100, t, t).await,
            Err(FrameError::Framing)
        ));
        // A silent peer inside a frame meets the deadline.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"\x0bMSH|").await.unwrap();
        let r = read_frame(&mut server, 100, t, Duration::from_millis(50)).await;
        assert!(matches!(r, Err(FrameError::Timeout)));
        let mut out = Vec::new();
        write_frame(&mut out, b"MSH|x").await.unwrap();
        assert_eq!(out, b"\x0bMSH|x\x1c\x0d");
    }
}
