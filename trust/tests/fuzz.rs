//! Fuzzing of trust's parsers that see what peers send, with proptest on the stable toolchain:
//! join tokens (`"...".parse::<JoinToken>()`: typed by operators, sent by joining nodes),
//! certificates (`Identity::from_der` on every peer certificate, `Identity::from_pem` on what a
//! manager issues), signing requests (`Ca::sign_request` on a joining or renewing node's CSR),
//! and the CA bundle a joining node receives (`tls::client_config`).
//!
//! Properties: none panics; token errors are short whatever the input; valid tokens round-trip;
//! a certificate or request that still parses after mutation yields a coherent answer.
//!
//! Every property runs `PROPTEST_CASES` cases (proptest's default, 256, when unset). A long run:
//!
//! ```text
//! PROPTEST_CASES=200000 cargo test --release -p trust --test fuzz
//! ```

use std::sync::OnceLock;
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use trust::{Ca, CertRole, Identity, JoinToken, KeyRequest, Subject};

/// What a token error may weigh, whatever the input: it is echoed to operators and logs. (This
/// fuzzer found 64-character excerpts of escaped control characters reaching 522 bytes; the
/// token's excerpt is 24 characters now.)
const TOKEN_ERROR_BYTES: usize = 400;

struct Fixture {
    ca: Ca,
    /// A node certificate of `ca`, PEM and DER.
    cert_pem: String,
    cert_der: Vec<u8>,
    /// A signing request, PEM and DER.
    csr_pem: String,
    csr_der: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let ca = Ca::generate("fuzz").unwrap();
        let req = KeyRequest::generate().unwrap();
        let cert_pem = ca
            .sign_request(&req.csr_pem, &subject(), Duration::from_secs(3600))
            .unwrap();
        let cert_der = pem_body(&cert_pem);
        let csr_der = pem_body(&req.csr_pem);
        Fixture {
            ca,
            cert_pem,
            cert_der,
            csr_pem: req.csr_pem,
            csr_der,
        }
    })
}

fn subject() -> Subject {
    Subject {
        common_name: "n1".into(),
        role: CertRole::Worker,
        cluster_id: "fuzz".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Base64 and PEM armour, to reach the DER parsers through the PEM entry points.

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(text: &str) -> Vec<u8> {
    let digits: Vec<u32> = text
        .bytes()
        .filter_map(|c| B64.iter().position(|&b| b == c).map(|p| p as u32))
        .collect();
    let mut out = Vec::new();
    for group in digits.chunks(4) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &d)| acc | (d << (18 - 6 * i)));
        for i in 0..group.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

fn armour(label: &str, der: &[u8]) -> String {
    let body = b64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_body(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    unb64(&body)
}

// ---------------------------------------------------------------------------------------------
// Strategies.

/// Characters that matter to the token parser and to the error's excerpt: the token alphabet
/// in both cases, its separators, whitespace, control characters (escaped when echoed, so they
/// weigh more), and wide characters.
const TOKEN_CHARS: &str = "SWMTKN-1-0123456789abcdefghijklmnopqrstuvwxyzABCXYZ";

/// Bytes that mean something in DER: lengths (0x80 indefinite, 0x81-0x88 long forms), tags.
const DER_BYTES: &[u8] = &[
    0, 1, 0x7f, 0x80, 0x81, 0x82, 0x83, 0x84, 0x88, 0xff, 0x30, 0x06, 0x02, 0x03, 0x04, 0x05, 0xa0,
    0xa3,
];

fn token_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => select(TOKEN_CHARS.chars().collect::<Vec<_>>()),
        2 => any::<char>(),
        1 => (0u32..0xa0).prop_map(|c| char::from_u32(c).unwrap()),
        1 => select(vec![' ', '\t', '\n', '\u{85}', '\u{a0}', '\u{2028}', '\u{3000}', '\u{feff}']),
        1 => select(vec!['é', '€', '𝄞', '\u{10ffff}', '\u{fffd}']),
    ]
}

fn any_token_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => vec(token_char(), 0..100).prop_map(String::from_iter),
        2 => vec(token_char(), 0..2000).prop_map(String::from_iter),
        1 => (token_char(), 1usize..100_000).prop_map(|(c, n)| c.to_string().repeat(n)),
        1 => (vec(token_char(), 0..80), 0usize..5000)
            .prop_map(|(cs, n)| {
                format!("SWMTKN-1-{}", String::from_iter(cs).repeat(n / 40 + 1))
            }),
    ]
}

fn token() -> impl Strategy<Value = JoinToken> {
    (any::<[u8; 32]>(), any::<[u8; 16]>())
        .prop_map(|(ca_digest, secret)| JoinToken { ca_digest, secret })
}

#[derive(Debug, Clone)]
enum TextEdit {
    Replace { at: usize, with: char },
    Insert { at: usize, with: char },
    Remove { at: usize },
    Truncate { at: usize },
    Upper,
    Pad { before: String, after: String },
}

fn text_edit() -> impl Strategy<Value = TextEdit> {
    prop_oneof![
        3 => (any::<usize>(), token_char()).prop_map(|(at, with)| TextEdit::Replace { at, with }),
        2 => (any::<usize>(), token_char()).prop_map(|(at, with)| TextEdit::Insert { at, with }),
        2 => any::<usize>().prop_map(|at| TextEdit::Remove { at }),
        1 => any::<usize>().prop_map(|at| TextEdit::Truncate { at }),
        1 => Just(TextEdit::Upper),
        1 => (
            vec(token_char(), 0..4).prop_map(String::from_iter),
            vec(token_char(), 0..4).prop_map(String::from_iter)
        )
            .prop_map(|(before, after)| TextEdit::Pad { before, after }),
    ]
}

fn edit(text: &str, e: &TextEdit) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    match e {
        TextEdit::Replace { at, with } if n > 0 => chars[at % n] = *with,
        TextEdit::Insert { at, with } => chars.insert(at % (n + 1), *with),
        TextEdit::Remove { at } if n > 0 => {
            chars.remove(at % n);
        }
        TextEdit::Truncate { at } => chars.truncate(at % (n + 1)),
        TextEdit::Upper => return text.to_uppercase(),
        TextEdit::Pad { before, after } => return format!("{before}{text}{after}"),
        _ => {}
    }
    chars.into_iter().collect()
}

#[derive(Debug, Clone)]
enum ByteEdit {
    Flip { at: usize, xor: u8 },
    Set { at: usize, to: u8 },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
    Truncate { at: usize },
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..).prop_map(|(at, xor)| ByteEdit::Flip { at, xor }),
        2 => (any::<usize>(), select(DER_BYTES))
            .prop_map(|(at, to)| ByteEdit::Set { at, to }),
        2 => (any::<usize>(), vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| ByteEdit::Insert { at, bytes }),
        2 => (any::<usize>(), 1usize..32).prop_map(|(at, len)| ByteEdit::Remove { at, len }),
        1 => any::<usize>().prop_map(|at| ByteEdit::Truncate { at }),
    ]
}

fn edit_bytes(bytes: &mut Vec<u8>, e: &ByteEdit) {
    let n = bytes.len();
    match e {
        ByteEdit::Flip { at, xor } if n > 0 => bytes[at % n] ^= xor,
        ByteEdit::Set { at, to } if n > 0 => bytes[at % n] = *to,
        ByteEdit::Insert { at, bytes: b } => {
            let at = at % (n + 1);
            bytes.splice(at..at, b.iter().copied());
        }
        ByteEdit::Remove { at, len } => {
            let at = at % (n + 1);
            bytes.drain(at..(at + len).min(n));
        }
        ByteEdit::Truncate { at } => bytes.truncate(at % (n + 1)),
        _ => {}
    }
}

fn mutated(original: &[u8], edits: &[ByteEdit]) -> Vec<u8> {
    let mut out = original.to_vec();
    for e in edits {
        edit_bytes(&mut out, e);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Properties.

fn check_token_text(text: &str) -> Result<(), TestCaseError> {
    match text.parse::<JoinToken>() {
        Ok(t) => {
            // Whatever was accepted prints as a canonical token that reads back the same.
            let shown = t.to_string();
            prop_assert_eq!(shown.parse::<JoinToken>().unwrap(), t);
        }
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(msg.starts_with("invalid join token"), "{}", msg);
            prop_assert!(
                msg.len() < TOKEN_ERROR_BYTES,
                "a token error of {} bytes for an input of {} bytes: {}",
                msg.len(),
                text.len(),
                msg
            );
        }
    }
    Ok(())
}

/// A certificate that parsed has a validity the renewal schedule can use (no overflow on odd
/// dates), and its error otherwise is short.
fn check_identity(id: Result<Identity, trust::Error>) -> Result<(), TestCaseError> {
    match id {
        Ok(id) => {
            let _ = id.renew_at(0.5);
        }
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(msg.len() < 4096, "an error of {} bytes", msg.len());
        }
    }
    Ok(())
}

/// A signing request that was signed gives a certificate naming the subject the CA chose,
/// whatever the request said.
fn check_sign(csr: &str) -> Result<(), TestCaseError> {
    let f = fixture();
    if let Ok(cert) =
        f.ca.sign_request(csr, &subject(), Duration::from_secs(3600))
    {
        let id = Identity::from_pem(&cert)
            .map_err(|e| TestCaseError::fail(format!("a certificate the CA issued: {e}")))?;
        prop_assert_eq!(id.common_name, "n1");
        prop_assert_eq!(id.role, Some(CertRole::Worker));
        prop_assert_eq!(id.cluster_id, "fuzz");
    }
    Ok(())
}

fn config() -> ProptestConfig {
    // Cases from PROPTEST_CASES (256 when unset).
    ProptestConfig::default()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn token_parser_survives_any_text(text in any_token_text()) {
        check_token_text(&text)?;
    }

    #[test]
    fn token_parser_survives_edited_tokens(t in token(), edits in vec(text_edit(), 1..4)) {
        let mut text = t.to_string();
        for e in &edits {
            text = edit(&text, e);
        }
        check_token_text(&text)?;
    }

    #[test]
    fn valid_tokens_round_trip(t in token(), pad in "[ \t\n]{0,3}") {
        let text = t.to_string();
        prop_assert_eq!(text.len(), "SWMTKN-1-".len() + 50 + 1 + 25);
        prop_assert_eq!(text.parse::<JoinToken>().unwrap(), t);
        // Digits read in either case; surrounding whitespace (a pasted line) is ignored.
        prop_assert_eq!(text.to_uppercase().parse::<JoinToken>().unwrap(), t);
        prop_assert_eq!(format!("{pad}{text}{pad}").parse::<JoinToken>().unwrap(), t);
        prop_assert!(t.secret_is(&t.secret));
    }

    #[test]
    fn certificate_parsers_survive_random_bytes(bytes in vec(any::<u8>(), 0..2048)) {
        check_identity(Identity::from_der(&bytes))?;
        check_identity(Identity::from_pem(&armour("CERTIFICATE", &bytes)))?;
        let _ = trust::tls::client_config(&armour("CERTIFICATE", &bytes), None);
    }

    #[test]
    fn certificate_parsers_survive_mutated_certificates(edits in vec(byte_edit(), 1..6)) {
        let der = mutated(&fixture().cert_der, &edits);
        check_identity(Identity::from_der(&der))?;
        let pem = armour("CERTIFICATE", &der);
        check_identity(Identity::from_pem(&pem))?;
        let _ = trust::tls::client_config(&pem, None);
    }

    #[test]
    fn pem_parsers_survive_random_and_edited_text(
        text in prop_oneof![
            vec(any::<char>(), 0..512).prop_map(String::from_iter),
            vec(text_edit(), 1..6).prop_map(|edits| {
                let mut text = fixture().cert_pem.clone();
                for e in &edits {
                    text = edit(&text, e);
                }
                text
            }),
        ]
    ) {
        check_identity(Identity::from_pem(&text))?;
        let _ = trust::tls::client_config(&text, None);
        check_sign(&text)?;
    }

    #[test]
    fn sign_request_survives_random_requests(bytes in vec(any::<u8>(), 0..1024)) {
        check_sign(&armour("CERTIFICATE REQUEST", &bytes))?;
    }

    #[test]
    fn sign_request_survives_mutated_requests(
        edits in vec(byte_edit(), 1..6),
        text_edits in vec(text_edit(), 0..2),
    ) {
        let der = mutated(&fixture().csr_der, &edits);
        check_sign(&armour("CERTIFICATE REQUEST", &der))?;
        let mut pem = fixture().csr_pem.clone();
        for e in &text_edits {
            pem = edit(&pem, e);
        }
        check_sign(&pem)?;
    }
}

#[test]
fn the_fixtures_are_what_they_claim() {
    let f = fixture();
    assert_eq!(armour("CERTIFICATE", &f.cert_der), f.cert_pem);
    let id = Identity::from_der(&f.cert_der).unwrap();
    assert_eq!(id.common_name, "n1");
    check_sign(&armour("CERTIFICATE REQUEST", &f.csr_der)).unwrap();
    assert!(f
        .ca
        .sign_request(
            &armour("CERTIFICATE REQUEST", &f.csr_der),
            &subject(),
            Duration::from_secs(60)
        )
        .is_ok());
}

/// The inputs that made token errors largest (characters the excerpt escapes, or wide ones).
#[test]
fn token_errors_stay_under_400_bytes() {
    let mut worst = (0, String::new());
    for input in [
        "\u{7f}".repeat(47),
        "\u{80}".repeat(64),
        "\u{80}".repeat(100_000),
        "\u{1}".repeat(64),
        "𝄞".repeat(64),
    ] {
        let err = input.parse::<JoinToken>().unwrap_err().to_string();
        if err.len() > worst.0 {
            worst = (err.len(), format!("{:?}…", &input[..input.len().min(24)]));
        }
        assert!(err.len() < TOKEN_ERROR_BYTES, "{} bytes", err.len());
    }
    assert!(
        worst.0 < TOKEN_ERROR_BYTES,
        "a token error of {} bytes for the input {}",
        worst.0,
        worst.1
    );
}
