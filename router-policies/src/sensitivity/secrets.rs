//! Recognizers for credentials: PEM private keys, JWTs, connection strings, SAS tokens,
//! `key=value` assignments whose key names a secret, Azure and AWS keys, tokens with a known
//! issuer prefix, and high-entropy tokens next to a context word.
//!
//! A long random-looking token alone is not reported (UUIDs, git hashes and content hashes
//! look the same): it needs a word such as `password`, `token` or `api key` before it on the
//! same line, a key that names a secret, or a format that only keys have.

use super::EntityType;
use super::scan::{
    Scanner, byte_at, context_before, is_alphanumeric, is_token, run_end, whole_word_context_before,
};

/// The shortest token looked at as a possible key or secret, in bytes.
pub(super) const TOKEN_BYTES_MIN: usize = 20;
/// The longest token measured for entropy, in bytes.
const TOKEN_BYTES_MAX: usize = 512;
/// The longest PEM block looked for, in bytes; a longer or unterminated one is reported up
/// to the end of its base64 body.
const PEM_BYTES_MAX: usize = 16 * 1024;
/// The longest JWT segment, in bytes.
const JWT_SEGMENT_BYTES_MAX: usize = 8 * 1024;
/// The longest JWT header decoded, in bytes.
const JWT_HEADER_BYTES_MAX: usize = 1024;
/// The longest key of a `key=value` assignment, in bytes.
const KEY_BYTES_MAX: usize = 48;
/// The longest value of an assignment or connection-string pair, in bytes.
const VALUE_BYTES_MAX: usize = 2048;
/// The longest template read whole as a value (`<your database password here>`), in bytes.
const TEMPLATE_BYTES_MAX: usize = 128;
/// The most `key=value` pairs read from one connection string or SAS query.
const PAIRS_MAX: usize = 32;
/// How far before a token its context word may stand, in bytes.
const CONTEXT_BYTES: usize = 48;

/// Shannon entropy, in bits per byte, above which a token with a context word is a secret.
const ENTROPY_BITS_MIN: f32 = 3.5;
/// Letters after `hf_` in a Hugging Face access token.
const HUGGING_FACE_TOKEN_LETTERS: usize = 34;
/// Entropy above which the value of a secret-named key is a secret.
const VALUE_ENTROPY_BITS_MIN: f32 = 3.0;
/// The shortest password value, in bytes.
const PASSWORD_BYTES_MIN: usize = 6;
/// The shortest password told without `is` (`password Summer2024!`).
const BARE_PASSWORD_BYTES_MIN: usize = 8;
/// The shortest token value of a secret-named key, in bytes.
const SECRET_VALUE_BYTES_MIN: usize = 12;

const PRIVATE_KEY_CONFIDENCE: f32 = 0.99;
const JWT_CONFIDENCE: f32 = 0.95;
const CONNECTION_STRING_CONFIDENCE: f32 = 0.95;
const SAS_CONFIDENCE: f32 = 0.95;
const ACCOUNT_KEY_CONFIDENCE: f32 = 0.95;
const ASSIGNED_AWS_SECRET_CONFIDENCE: f32 = 0.9;
const STORAGE_KEY_CONFIDENCE: f32 = 0.85;
const AWS_SECRET_CONFIDENCE: f32 = 0.85;
const PREFIXED_TOKEN_CONFIDENCE: f32 = 0.9;
const ASSIGNED_SECRET_CONFIDENCE: f32 = 0.8;
const CONTEXT_SECRET_CONFIDENCE: f32 = 0.7;

/// Words that make a nearby high-entropy token a secret, each matched whole.
const SECRET_CONTEXT: &[&str] = &[
    "password",
    "passwords",
    "passwd",
    "pwd",
    "secret",
    "secrets",
    "token",
    "api_key",
    "apikey",
    "api-key",
    "api key",
    "access key",
    "access_key",
    "private key",
    "credential",
    "credentials",
    "bearer",
    "auth",
    "authorization",
    "key",
    "keys",
];
/// Words that make a nearby 40-character base64 token an AWS secret access key.
const AWS_CONTEXT: &[&str] = &["aws", "secret"];

/// Issuer prefixes of tokens, each with the fewest characters its tokens have after it
/// (fewer than the issuer writes, so that a cut copy still counts, but enough that a name
/// such as `xai-grok-2-vision-1212` does not).
const TOKEN_PREFIXES: &[(&str, usize)] = &[
    // GitHub
    ("ghp_", 16),
    ("gho_", 16),
    ("ghu_", 16),
    ("ghs_", 16),
    ("ghr_", 16),
    ("github_pat_", 16),
    // GitLab: personal, runner, deploy and trigger tokens
    ("glpat-", 16),
    ("glrt-", 16),
    ("gldt-", 16),
    ("glptt-", 16),
    // Slack: bot, user, app, refresh
    ("xoxb-", 16),
    ("xoxp-", 16),
    ("xoxa-", 16),
    ("xoxs-", 16),
    ("xoxe-", 16),
    ("xapp-", 30),
    // OpenAI, Anthropic (`sk-ant-`), OpenRouter (`sk-or-`), Stripe
    ("sk-", 16),
    ("sk_live_", 16),
    ("rk_live_", 16),
    ("sk_test_", 16),
    // Other model providers: Hugging Face, Groq, xAI, Perplexity, NVIDIA, Replicate
    ("hf_", 16),
    ("gsk_", 40),
    ("xai-", 60),
    ("pplx-", 40),
    ("nvapi-", 50),
    ("r8_", 30),
    // Google API keys and OAuth client secrets
    ("AIza", 16),
    ("GOCSPX-", 20),
    // Package registries and developer services
    ("npm_", 36),
    ("pypi-AgEIcHlwaS5vcmc", 16),
    ("dckr_pat_", 20),
    ("dop_v1_", 40),
    ("doo_v1_", 40),
    ("dor_v1_", 40),
    ("lin_api_", 30),
    ("figd_", 30),
    ("shpat_", 32),
    ("shpss_", 32),
    ("shpca_", 32),
    ("shppa_", 32),
    ("sq0atp-", 20),
    ("sq0csp-", 20),
    // age encryption keys
    ("AGE-SECRET-KEY-1", 40),
];

/// For each byte, the [`TOKEN_PREFIXES`] that start with it (bit `i` for entry `i`): a long
/// token (code is full of them) is compared with its few candidates, not the whole list.
static PREFIXES_BY_FIRST_BYTE: [u64; 256] = prefixes_by_first_byte();

const fn prefixes_by_first_byte() -> [u64; 256] {
    assert!(TOKEN_PREFIXES.len() <= 64);
    let mut table = [0_u64; 256];
    let mut index = 0;
    while index < TOKEN_PREFIXES.len() {
        let first = TOKEN_PREFIXES[index].0.as_bytes()[0];
        table[first as usize] |= 1 << index;
        index += 1;
    }
    table
}

/// Key suffixes (lower case, without `-`, `_`, `.`) whose value is a password.
const PASSWORD_KEYS: &[&str] = &["password", "passwd", "pwd", "passphrase"];
/// Key suffixes whose value is a token when it is long and random enough.
const SECRET_KEYS: &[&str] = &[
    "secret",
    "token",
    "apikey",
    "secretkey",
    "accesskey",
    "privatekey",
    "credential",
    "credentials",
    "authkey",
    "signingkey",
    "encryptionkey",
    "masterkey",
    "sharedaccesskey",
    "accountkey",
];
/// Keys that start a connection string.
const CONNECTION_STRING_KEYS: &[&str] = &[
    "defaultendpointsprotocol",
    "accountname",
    "accountkey",
    "blobendpoint",
    "queueendpoint",
    "tableendpoint",
    "fileendpoint",
    "endpoint",
    "sharedaccesskeyname",
    "sharedaccesskey",
    "server",
    "datasource",
    "host",
    "database",
    "initialcatalog",
    "userid",
    "uid",
    "username",
    "user",
    "password",
    "pwd",
];
/// Keys of a connection string that carry its secret.
const CONNECTION_STRING_SECRETS: &[&str] = &[
    "accountkey",
    "sharedaccesskey",
    "sharedaccesssignature",
    "password",
    "pwd",
];
/// Parameter names of an Azure shared access signature.
const SAS_PARAMETERS: &[&str] = &[
    "sv", "ss", "srt", "sp", "se", "st", "spr", "sig", "sr", "si", "sip", "skoid", "sktid", "skt",
    "ske", "sks", "skv", "sdd", "rscc", "rscd", "rsce", "rscl", "rsct", "ses",
];
/// Values that stand for a password rather than being one.
const PLACEHOLDERS: &[&str] = &[
    "password",
    "changeme",
    "secret",
    "null",
    "none",
    "nil",
    "true",
    "false",
    "redacted",
    "example",
    "placeholder",
    "yourpassword",
    "your_password",
    "mypassword",
    "xxxxxx",
    "string",
    "undefined",
    "required",
    "optional",
];

/// A PEM block from `-----BEGIN LABEL-----` through its `-----END LABEL-----` line, reported
/// when its label names a private key; any other block (a certificate, a public key) is
/// skipped whole so that its base64 is not taken for tokens. An unterminated block runs to
/// the end of its paragraph.
pub(super) fn pem_block(scanner: &mut Scanner<'_>, start: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    if !bytes[start..].starts_with(b"-----BEGIN ") {
        return None;
    }
    let header_end = run_end(bytes, start + 11, 40, |byte| {
        byte.is_ascii_uppercase() || byte == b' '
    });
    if !bytes[header_end..].starts_with(b"-----") {
        return None;
    }
    let label = &bytes[start + 11..header_end];
    let private = label.ends_with(b"PRIVATE KEY") || label == b"PGP PRIVATE KEY BLOCK";
    let body_start = header_end + 5;
    let limit = bytes.len().min(start.saturating_add(PEM_BYTES_MAX));
    let body = &bytes[body_start..limit];
    let end = match body.windows(8).position(|window| window == b"-----END") {
        Some(offset) => {
            let footer = body_start + offset + 8;
            let dashes = bytes[footer..limit]
                .windows(5)
                .position(|window| window == b"-----")
                .filter(|&offset| offset <= 40);
            dashes.map_or(footer, |offset| footer + offset + 5)
        }
        None => paragraph_end(bytes, body_start, limit),
    };
    if private {
        scanner.push(EntityType::PrivateKey, start, end, PRIVATE_KEY_CONFIDENCE);
    }
    Some(end)
}

/// The end of the paragraph that `from` is in (a blank line or `limit`), trailing
/// whitespace left out.
fn paragraph_end(bytes: &[u8], from: usize, limit: usize) -> usize {
    let paragraph = bytes[from..limit]
        .windows(2)
        .position(|window| window == b"\n\n")
        .map_or(limit, |offset| from + offset);
    let mut end = paragraph;
    while end > from && bytes[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    end.max(from)
}

/// A PuTTY private key file from its `PuTTY-User-Key-File-2:` (or `-3:`) line through its
/// `Private-MAC:` line, or to the end of its paragraph when that is missing.
pub(super) fn putty_key(scanner: &mut Scanner<'_>, start: usize) -> Option<usize> {
    const HEADER: &[u8] = b"PuTTY-User-Key-File-";
    const MAC: &[u8] = b"Private-MAC:";
    let bytes = scanner.bytes;
    if !bytes[start..].starts_with(HEADER)
        || !byte_at(bytes, start + HEADER.len()).is_ascii_digit()
        || byte_at(bytes, start + HEADER.len() + 1) != b':'
    {
        return None;
    }
    let body_start = start + HEADER.len() + 2;
    let limit = bytes.len().min(start.saturating_add(PEM_BYTES_MAX));
    let end = match bytes[body_start..limit]
        .windows(MAC.len())
        .position(|window| window == MAC)
    {
        Some(offset) => {
            let mac = body_start + offset + MAC.len();
            bytes[mac..limit]
                .iter()
                .position(|&byte| byte == b'\n')
                .map_or(limit, |offset| mac + offset)
        }
        None => paragraph_end(bytes, body_start, limit),
    };
    let mut end = end;
    while end > body_start && bytes[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    scanner.push(EntityType::PrivateKey, start, end, PRIVATE_KEY_CONFIDENCE);
    Some(end)
}

fn is_base64url(byte: u8) -> bool {
    is_alphanumeric(byte) || byte == b'-' || byte == b'_'
}

/// `header.payload.signature` in base64url, the header decoding to a JSON object with `alg`.
/// The signature may be empty (`alg: none`).
pub(super) fn jwt(scanner: &mut Scanner<'_>, start: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    if !bytes[start..].starts_with(b"eyJ") || (start > 0 && is_base64url(bytes[start - 1])) {
        return None;
    }
    let header_end = run_end(bytes, start, JWT_SEGMENT_BYTES_MAX, is_base64url);
    if byte_at(bytes, header_end) != b'.' || header_end - start > JWT_HEADER_BYTES_MAX * 4 / 3 {
        return None;
    }
    let payload_end = run_end(bytes, header_end + 1, JWT_SEGMENT_BYTES_MAX, is_base64url);
    if payload_end - header_end < 3 || byte_at(bytes, payload_end) != b'.' {
        return None;
    }
    let end = run_end(bytes, payload_end + 1, JWT_SEGMENT_BYTES_MAX, is_base64url);
    if is_alphanumeric(byte_at(bytes, end)) || byte_at(bytes, end) == b'.' {
        return None;
    }
    // The run holds base64url bytes only, so the decoder's other alphabet never applies.
    let mut decoded = [0_u8; JWT_HEADER_BYTES_MAX];
    let length = super::scan::decode_into(&bytes[start..header_end], &mut decoded)?;
    let header = &decoded[..length];
    let trimmed = header.trim_ascii_start();
    if !trimmed.starts_with(b"{") || !header.windows(5).any(|window| window == b"\"alg\"") {
        return None;
    }
    scanner.push(EntityType::Jwt, start, end, JWT_CONFIDENCE);
    Some(end)
}

/// A key at `start..key_end` followed by `=` or `:` (or `"key":`): a connection string, a
/// SAS query, an Azure account key, or the value of a secret-named key. Also `Bearer TOKEN`
/// and `Data Source=...`.
///
/// Called for nearly every word of a text: this part turns away, inline, the words that can
/// be none of these (most prose words, followed by a blank and no `=` or `:`).
#[inline]
pub(super) fn keyed(scanner: &mut Scanner<'_>, start: usize, key_end: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let next = byte_at(bytes, key_end);
    if next == b' ' {
        let operator = run_end(bytes, key_end, 2, |byte| byte == b' ');
        // `Bearer`, `Data Source`, `password is`, `passwd`, `pwd`, `passphrase`, an option.
        let word = &bytes[start..key_end];
        let spoken = match word.len() {
            3 => word.eq_ignore_ascii_case(b"pwd"),
            4 => word.eq_ignore_ascii_case(b"data"),
            6 => word.eq_ignore_ascii_case(b"bearer") || word.eq_ignore_ascii_case(b"passwd"),
            8 => word.eq_ignore_ascii_case(b"password"),
            10 => word.eq_ignore_ascii_case(b"passphrase"),
            _ => false,
        } || byte_at(bytes, start.wrapping_sub(1)) == b'-';
        if !spoken && !matches!(byte_at(bytes, operator), b'=' | b':') {
            return None;
        }
    } else if !matches!(next, b'=' | b':' | b'"' | b'\'') {
        return None;
    }
    keyed_value(scanner, start, key_end)
}

/// The rest of [`keyed`], for the words it did not turn away.
#[inline(never)]
fn keyed_value(scanner: &mut Scanner<'_>, start: usize, key_end: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let next = byte_at(bytes, key_end);
    if next == b' ' {
        let word = &bytes[start..key_end];
        if word.eq_ignore_ascii_case(b"bearer") {
            return bearer(scanner, key_end + 1);
        }
        if word.eq_ignore_ascii_case(b"data") && bytes[key_end..].starts_with(b" Source=") {
            return connection_string(scanner, start);
        }
        if PASSWORD_KEYS
            .iter()
            .any(|key| word.eq_ignore_ascii_case(key.as_bytes()))
            && let Some(end) = told_password(scanner, key_end)
        {
            return Some(end);
        }
        if byte_at(bytes, start.wrapping_sub(1)) == b'-'
            && let Some(end) = option_secret(scanner, start, key_end)
        {
            return Some(end);
        }
        let operator = run_end(bytes, key_end, 2, |byte| byte == b' ');
        if !matches!(byte_at(bytes, operator), b'=' | b':') {
            return None;
        }
    } else if !matches!(next, b'=' | b':' | b'"' | b'\'') {
        return None;
    }
    if key_end - start > KEY_BYTES_MAX {
        return None;
    }
    let mut key = [0_u8; KEY_BYTES_MAX];
    let key = normalize_key(&bytes[start..key_end], &mut key);
    let is = |list: &[&str]| list.iter().any(|known| known.as_bytes() == key);
    if next == b'=' {
        if is(CONNECTION_STRING_KEYS)
            && byte_at(bytes, start.wrapping_sub(1)) != b';'
            && let Some(end) = connection_string(scanner, start)
        {
            return Some(end);
        }
        if is(SAS_PARAMETERS)
            && !matches!(byte_at(bytes, start.wrapping_sub(1)), b'&' | b';')
            && let Some(end) = sas(scanner, start)
        {
            return Some(end);
        }
    }
    let (value_start, value_end, quoted) = assigned_value(bytes, key_end)?;
    let value = &bytes[value_start..value_end];
    if key == b"accountkey" && storage_key(value) {
        scanner.push(
            EntityType::AzureStorageKey,
            value_start,
            value_end,
            ACCOUNT_KEY_CONFIDENCE,
        );
        return Some(value_end);
    }
    if key.windows(3).any(|window| window == b"aws") && aws_secret_key(value) {
        scanner.push(
            EntityType::AwsSecretKey,
            value_start,
            value_end,
            ASSIGNED_AWS_SECRET_CONFIDENCE,
        );
        return Some(value_end);
    }
    let ends_with = |list: &[&str]| list.iter().any(|known| key.ends_with(known.as_bytes()));
    let secret = if ends_with(PASSWORD_KEYS) {
        password_value(bytes, value, value_end, quoted)
    } else if ends_with(SECRET_KEYS) {
        value.len() >= SECRET_VALUE_BYTES_MIN
            && !placeholder(value)
            && entropy_bits(value) >= VALUE_ENTROPY_BITS_MIN
            && (quoted || !code_reference(bytes, value, value_end))
    } else {
        false
    };
    secret.then(|| assigned_secret(scanner, value_start, value_end))
}

/// Reports an assigned or told secret; returns its end.
fn assigned_secret(scanner: &mut Scanner<'_>, start: usize, end: usize) -> usize {
    scanner.push(EntityType::Secret, start, end, ASSIGNED_SECRET_CONFIDENCE);
    end
}

/// The key in lower case without `-`, `_`, `.` and spaces.
/// A password value: long enough, not a stand-in, and (unless quoted) neither code nor a
/// plain word (`password: required`).
fn password_value(bytes: &[u8], value: &[u8], value_end: usize, quoted: bool) -> bool {
    value.len() >= PASSWORD_BYTES_MIN
        && !placeholder(value)
        && (quoted
            || (!code_reference(bytes, value, value_end)
                && !value.iter().all(u8::is_ascii_alphabetic)))
}

/// Long options whose value, after a space, is a secret (`--password S3cret`; with `=` the
/// key-value reading finds it).
const SECRET_OPTIONS: &[&str] = &[
    "password",
    "passwd",
    "pass",
    "pwd",
    "passphrase",
    "secret",
    "client-secret",
    "token",
    "api-key",
    "access-key",
    "secret-key",
];
/// How far back a command's user or login word is looked for, in bytes.
const COMMAND_BYTES_MAX: usize = 512;
/// What on a command line's start makes `-p VALUE` a password rather than a port or a
/// path: a user named by `-u`/`--user`, or a command that logs in.
const LOGIN_COMMANDS: &[&[u8]] = &[
    b" -u ",
    b"--user",
    b"--username",
    b" login ",
    b"sshpass ",
    b"mysql ",
    b"mysqldump ",
    b"mariadb ",
    b"mongo ",
    b"mongosh ",
];

/// A secret given as a command-line option (`--password S3cret`, `-p S3cret` or `-pS3cret`
/// after a user or a login command, `-u user:S3cret` as curl takes it), for the word at
/// `start..key_end` that follows a `-`.
#[cold]
#[inline(never)]
fn option_secret(scanner: &mut Scanner<'_>, start: usize, key_end: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let word = &bytes[start..key_end];
    let long = byte_at(bytes, start.wrapping_sub(2)) == b'-';
    let dashes = if long { 2 } else { 1 };
    if !matches!(
        byte_at(bytes, start.wrapping_sub(dashes + 1)),
        b' ' | b'\t' | 0
    ) && start > dashes
    {
        return None;
    }
    // curl's `-u user:password` and `--user user:password`.
    let user_password = word == b"u" || (long && word.eq_ignore_ascii_case(b"user"));
    let (value_start, value_end, quoted) = if user_password {
        spoken_value_at(bytes, key_end + 1)?
    } else if long {
        if !SECRET_OPTIONS
            .iter()
            .any(|option| word.eq_ignore_ascii_case(option.as_bytes()))
        {
            return None;
        }
        spoken_value_at(bytes, key_end + 1)?
    } else if word == b"p" {
        spoken_value_at(bytes, key_end + 1)?
    } else if word.len() > 1 && word[0] == b'p' {
        // `mysql -u root -pS3cret`: the value joined to its flag.
        spoken_value_at(bytes, start + 1)?
    } else {
        return None;
    };
    let value = &bytes[value_start..value_end];
    if value.first() == Some(&b'-') {
        return None;
    }
    let secret = if user_password {
        let colon = value.iter().position(|&byte| byte == b':')?;
        let password = &value[colon + 1..];
        !password.is_empty()
            && !placeholder(password)
            && password.iter().any(u8::is_ascii_alphanumeric)
    } else if long {
        password_value(bytes, value, value_end, quoted)
    } else {
        let line = &bytes[command_start(bytes, start)..start];
        let login = LOGIN_COMMANDS
            .iter()
            .any(|marker| line.windows(marker.len()).any(|window| window == *marker));
        // A port (`-p 8080:80`) or a path is not a password.
        let port = value
            .iter()
            .all(|&byte| byte.is_ascii_digit() || byte == b':');
        login && !port && password_value(bytes, value, value_end, quoted)
    };
    secret.then(|| assigned_secret(scanner, value_start, value_end))
}

/// Where the command that `position` is in starts: the start of its line, or of an earlier
/// one that a trailing `\` continues (`docker login \⏎ -u deploy \⏎ -p …`), up to eight.
fn command_start(bytes: &[u8], position: usize) -> usize {
    // Bounded, so that a long line of many `-p` costs each of them this much at most.
    let floor = position.saturating_sub(COMMAND_BYTES_MAX);
    let mut start = position;
    for _ in 0..8 {
        let Some(newline) = bytes[floor..start].iter().rposition(|&byte| byte == b'\n') else {
            return floor;
        };
        let newline = floor + newline;
        let mut before = newline;
        while before > floor && matches!(bytes[before - 1], b' ' | b'\r') {
            before -= 1;
        }
        if before <= floor || bytes[before - 1] != b'\\' {
            return newline + 1;
        }
        start = before - 1;
    }
    start
}

/// `my password is Tr0ub4dor&3`, `password Summer2024!`: a password told in a sentence, the
/// word `is` (or a blank alone) between the key word (a [`PASSWORD_KEYS`] word ending at
/// `key_end`) and the value.
#[cold]
#[inline(never)]
fn told_password(scanner: &mut Scanner<'_>, key_end: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let said = bytes
        .get(key_end..key_end + 4)
        .is_some_and(|is| is.eq_ignore_ascii_case(b" is "));
    let (value_start, value_end, quoted) =
        spoken_value_at(bytes, key_end + if said { 4 } else { 1 })?;
    let value = &bytes[value_start..value_end];
    // Without `is` (`password Summer2024!`), only what no word, name or path looks like:
    // eight bytes or more (`password field1`), not a path (`pwd /srv/app2`), letters and
    // digits both, and not a hashing or encoding scheme (`password SHA256-hashed`).
    let told = said
        || (value.len() >= BARE_PASSWORD_BYTES_MIN
            && !matches!(value[0], b'/' | b'~' | b'.')
            && value.iter().any(u8::is_ascii_digit)
            && value.iter().any(u8::is_ascii_alphabetic)
            && !SCHEMES.iter().any(|scheme| {
                value.len() >= scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme)
            }));
    (told && password_value(bytes, value, value_end, quoted))
        .then(|| assigned_secret(scanner, value_start, value_end))
}

/// Hashing, encryption and encoding schemes, whose names mix letters and digits.
const SCHEMES: &[&[u8]] = &[
    b"sha", b"md4", b"md5", b"bcrypt", b"scrypt", b"argon2", b"pbkdf2", b"aes", b"rsa", b"des",
    b"3des", b"utf", b"base64", b"base32", b"hmac", b"crc32", b"ntlm", b"blake2", b"x509",
];

fn normalize_key<'k>(key: &[u8], output: &'k mut [u8; KEY_BYTES_MAX]) -> &'k [u8] {
    let mut length = 0;
    for &byte in key.iter().take(KEY_BYTES_MAX) {
        if !matches!(byte, b'-' | b'_' | b'.' | b' ') {
            output[length] = byte.to_ascii_lowercase();
            length += 1;
        }
    }
    &output[..length]
}

/// The value after a key ending at `key_end`: `key=value`, `key: value`, `"key": "value"`.
/// Returns its span and whether it was quoted.
fn assigned_value(bytes: &[u8], key_end: usize) -> Option<(usize, usize, bool)> {
    let mut position = key_end;
    if matches!(byte_at(bytes, position), b'"' | b'\'') {
        position += 1;
    }
    position = run_end(bytes, position, 2, |byte| byte == b' ');
    if !matches!(byte_at(bytes, position), b'=' | b':') {
        return None;
    }
    position += 1;
    value_at(bytes, run_end(bytes, position, 2, |byte| byte == b' '))
}

/// A value starting at `position`: quoted up to its closing quote on the same line (a quote
/// after a backslash, as JSON and shells escape it, is part of the value), else up to a
/// blank or a delimiter, less a sentence's full stop. Returns its span and whether it was
/// quoted.
fn value_at(bytes: &[u8], position: usize) -> Option<(usize, usize, bool)> {
    let quote = byte_at(bytes, position);
    if matches!(quote, b'"' | b'\'') {
        let start = position + 1;
        let limit = bytes.len().min(start.saturating_add(VALUE_BYTES_MAX));
        let mut end = start;
        while end < limit {
            match bytes[end] {
                b'\n' => break,
                b'\\' if end + 1 < limit && bytes[end + 1] != b'\n' => end += 2,
                byte if byte == quote => break,
                _ => end += 1,
            }
        }
        return (byte_at(bytes, end) == quote && end > start).then_some((start, end, true));
    }
    if let Some(end) = template_end(bytes, position) {
        return Some((position, end, false));
    }
    // Opened like a template but going on past it (`${Summer}2024!`): a value with braces in
    // it, read to its next blank, quote or separator rather than cut at its first `}`.
    if bytes[position..].starts_with(b"${") || bytes[position..].starts_with(b"{{") {
        let end = run_end(bytes, position, VALUE_BYTES_MAX, |byte| {
            byte > b' ' && !matches!(byte, b'"' | b'\'' | b';' | b',')
        });
        return Some((position, end, false));
    }
    let end = run_end(bytes, position, VALUE_BYTES_MAX, |byte| {
        byte > b' '
            && !matches!(
                byte,
                b'"' | b'\'' | b';' | b',' | b'&' | b'<' | b'>' | b')' | b']' | b'}' | b'(' | b'['
            )
    });
    // A sentence's full stop is not part of the value.
    let end = if end > position + 1 && bytes[end - 1] == b'.' {
        end - 1
    } else {
        end
    };
    (end > position).then_some((position, end, false))
}

/// A value written in a sentence or on a command line (`password is Tr0ub4dor&3`,
/// `-p S3cret;pw`): as [`value_at`], but unquoted it runs to the next blank, since such a
/// value has no syntax around it that `&` or `;` could belong to; it stops before `(` and
/// `[` (`get_password()` is code), and a sentence's closing `.`, `,`, `;` or `)` is left
/// out.
fn spoken_value_at(bytes: &[u8], position: usize) -> Option<(usize, usize, bool)> {
    if matches!(byte_at(bytes, position), b'"' | b'\'') {
        return value_at(bytes, position);
    }
    if let Some(end) = template_end(bytes, position) {
        return Some((position, end, false));
    }
    let mut end = run_end(bytes, position, VALUE_BYTES_MAX, |byte| {
        byte > b' ' && !matches!(byte, b'"' | b'`' | b'(' | b'[')
    });
    while end > position + 1 && matches!(bytes[end - 1], b'.' | b',' | b';' | b')') {
        end -= 1;
    }
    (end > position).then_some((position, end, false))
}

/// The end of the template that starts at `position` (`${DB_PASSWORD}`, `<your password>`,
/// `{{ .Values.password }}`), past its closing bracket on the same line. An unquoted value
/// that is one is read whole, blanks and delimiters inside included, so that
/// [`placeholder`] sees the template rather than the piece of it before a `}` or a blank.
fn template_end(bytes: &[u8], position: usize) -> Option<usize> {
    let rest = bytes.get(position..)?;
    let (open, close): (&[u8], &[u8]) = match rest.first()? {
        b'$' => (b"${", b"}"),
        b'{' => (b"{{", b"}}"),
        b'<' => (b"<", b">"),
        _ => return None,
    };
    let inside = rest.strip_prefix(open)?;
    let inside = &inside[..inside.len().min(TEMPLATE_BYTES_MAX)];
    let line = &inside[..memchr::memchr(b'\n', inside).unwrap_or(inside.len())];
    let close_at = memchr::memmem::find(line, close)?;
    // One template, not two pieces of text that happen to be bracketed (`<Summer2024! see
    // <docs>`).
    if memchr::memmem::find(&line[..close_at], open).is_some() {
        return None;
    }
    let end = position + open.len() + close_at + close.len();
    // A template is the whole value: what follows its closing bracket ends the value (`${A}`
    // then a blank, a quote, a separator), else the value goes on (`${Summer}2024!`).
    matches!(
        bytes.get(end),
        None | Some(b' ' | b'\t' | b'\r' | b'\n' | b'"' | b'\'' | b'`' | b';' | b',' | b')')
    )
    .then_some(end)
}

/// A variable of a script rather than a secret: `$` (or `$$`, as docker-compose escapes it),
/// a name, then what in PHP, PowerShell or Perl goes on from a variable (`$this->`,
/// `$env:DB_PASSWORD`, `$ENV{DB_PASSWORD}`, `$config['db']`, `$settings.Password`).
fn variable_in_code(value: &[u8]) -> bool {
    let rest = value
        .strip_prefix(b"$$")
        .or_else(|| value.strip_prefix(b"$"));
    let Some(rest) = rest else { return false };
    let name = rest
        .iter()
        .take_while(|&&byte| byte.is_ascii_alphanumeric() || byte == b'_')
        .count();
    name > 0
        && (name == rest.len() || matches!(rest[name], b'-' | b':' | b'{' | b'[' | b'(' | b'.'))
}

/// Values that stand for a secret: a template that is the whole value (`${DB_PASSWORD}`,
/// `{{ .Values.password }}`, `<your-password>`, `$DB_PASSWORD`, `%DB_PASSWORD%`), a mask
/// (`****`, `xxxx`) and common stand-in words. Only these shapes: a password may start with
/// `$`, `%`, `{`, `*` or `<` as well as with any other character (`$Summer2024!x`).
pub(super) fn placeholder(value: &[u8]) -> bool {
    let enclosed = |open: &[u8], close: &[u8]| {
        value.len() > open.len() + close.len() && value.starts_with(open) && value.ends_with(close)
    };
    let identifier = |text: &[u8]| {
        !text.is_empty()
            && text
                .iter()
                .all(|&byte| byte.is_ascii_alphanumeric() || byte == b'_')
    };
    enclosed(b"${", b"}")
        || enclosed(b"{{", b"}}")
        || enclosed(b"<", b">")
        || value.strip_prefix(b"$").is_some_and(identifier)
        || variable_in_code(value)
        || value
            .strip_prefix(b"%")
            .and_then(|rest| rest.strip_suffix(b"%"))
            .is_some_and(identifier)
        || value.iter().all(|&byte| byte == value[0])
        || PLACEHOLDERS
            .iter()
            .any(|word| value.eq_ignore_ascii_case(word.as_bytes()))
}

/// An unquoted value that is code rather than a secret: a call (`get_password()`), an index
/// (`env["X"]`), or a dotted or snake-case name (`config.db_password`).
fn code_reference(bytes: &[u8], value: &[u8], value_end: usize) -> bool {
    matches!(byte_at(bytes, value_end), b'(' | b'[')
        || (value
            .iter()
            .all(|&byte| byte.is_ascii_lowercase() || matches!(byte, b'_' | b'.'))
            && value.iter().any(|&byte| matches!(byte, b'_' | b'.')))
}

/// 88 base64 characters ending in `==`: a 64-byte Azure storage account key.
fn storage_key(value: &[u8]) -> bool {
    value.len() == 88
        && value.ends_with(b"==")
        && value[..86]
            .iter()
            .all(|&byte| is_alphanumeric(byte) || byte == b'+' || byte == b'/')
}

/// `Bearer TOKEN`: a token of 16 or more characters.
fn bearer(scanner: &mut Scanner<'_>, start: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let end = run_end(bytes, start, TOKEN_BYTES_MAX, |byte| {
        is_token(byte) || matches!(byte, b'.' | b'=' | b'~')
    });
    if end - start < 16 || placeholder(&bytes[start..end]) {
        return None;
    }
    if jwt(scanner, start).is_some() {
        return Some(end);
    }
    scanner.push(EntityType::Secret, start, end, PREFIXED_TOKEN_CONFIDENCE);
    Some(end)
}

/// `Key=value;Key=value;...` from `start`, with at least two pairs and a secret among them.
fn connection_string(scanner: &mut Scanner<'_>, start: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let mut position = start;
    let mut pairs = 0;
    let mut has_secret = false;
    let mut end = start;
    while pairs < PAIRS_MAX {
        let key_end = run_end(bytes, position, KEY_BYTES_MAX, |byte| {
            is_alphanumeric(byte) || byte == b' ' || byte == b'_'
        });
        if key_end == position
            || byte_at(bytes, key_end) != b'='
            || !bytes[position].is_ascii_alphabetic()
        {
            break;
        }
        let value_start = key_end + 1;
        let value_end = run_end(bytes, value_start, VALUE_BYTES_MAX, |byte| {
            byte > b' ' && !matches!(byte, b';' | b'"' | b'\'' | b'<' | b'>')
        });
        let mut key = [0_u8; KEY_BYTES_MAX];
        let key = normalize_key(&bytes[position..key_end], &mut key);
        if value_end > value_start
            && CONNECTION_STRING_SECRETS
                .iter()
                .any(|secret| secret.as_bytes() == key)
        {
            has_secret = true;
        }
        pairs += 1;
        end = value_end;
        if byte_at(bytes, value_end) != b';' {
            break;
        }
        position = value_end + 1;
        if byte_at(bytes, position) == b' ' {
            position += 1;
        }
    }
    if pairs < 2 || !has_secret {
        return None;
    }
    scanner.push(
        EntityType::ConnectionString,
        start,
        end,
        CONNECTION_STRING_CONFIDENCE,
    );
    Some(end)
}

/// `sv=...&...&sig=...`: a query with the signed version and a signature of 16 or more
/// characters, in any order.
fn sas(scanner: &mut Scanner<'_>, start: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let mut position = start;
    let mut has_version = false;
    let mut signature_bytes = 0;
    let mut end = start;
    for _ in 0..PAIRS_MAX {
        let name_end = run_end(bytes, position, 8, |byte| byte.is_ascii_lowercase());
        if name_end == position || byte_at(bytes, name_end) != b'=' {
            break;
        }
        let value_start = name_end + 1;
        let value_end = run_end(bytes, value_start, VALUE_BYTES_MAX, |byte| {
            is_alphanumeric(byte)
                || matches!(
                    byte,
                    b'%' | b'-' | b'.' | b'_' | b'~' | b':' | b'+' | b'/' | b'='
                )
        });
        match &bytes[position..name_end] {
            b"sv" => has_version = true,
            b"sig" => signature_bytes = value_end - value_start,
            _ => {}
        }
        end = value_end;
        if byte_at(bytes, value_end) != b'&' {
            break;
        }
        position = value_end + 1;
    }
    if !has_version || signature_bytes < 16 {
        return None;
    }
    scanner.push(EntityType::AzureSasToken, start, end, SAS_CONFIDENCE);
    Some(end)
}

/// A run of 20 or more token bytes: a prefixed token, an Azure storage key, an AWS secret
/// key next to an AWS context word, or a high-entropy token next to a secret context word.
pub(super) fn token(scanner: &mut Scanner<'_>, start: usize, end: usize) -> Option<usize> {
    let bytes = scanner.bytes;
    let token = &bytes[start..end];
    let mut candidates = PREFIXES_BY_FIRST_BYTE[usize::from(token[0])];
    let mut prefixed = false;
    while candidates != 0 && !prefixed {
        let (prefix, rest_min) = TOKEN_PREFIXES[candidates.trailing_zeros() as usize];
        candidates &= candidates - 1;
        prefixed = token.len() >= prefix.len() + rest_min
            && token.starts_with(prefix.as_bytes())
            && random_tail(prefix, &token[prefix.len()..]);
    }
    if prefixed && (start == 0 || !is_alphanumeric(bytes[start - 1])) {
        scanner.push(EntityType::Secret, start, end, PREFIXED_TOKEN_CONFIDENCE);
        return Some(end);
    }
    if storage_key(token) {
        scanner.push(
            EntityType::AzureStorageKey,
            start,
            end,
            STORAGE_KEY_CONFIDENCE,
        );
        return Some(end);
    }
    if aws_secret_key(token) && context_before(bytes, start, CONTEXT_BYTES, AWS_CONTEXT) {
        scanner.push(EntityType::AwsSecretKey, start, end, AWS_SECRET_CONFIDENCE);
        return Some(end);
    }
    let mixed = token.iter().any(u8::is_ascii_digit) && token.iter().any(u8::is_ascii_alphabetic);
    if mixed
        && token.len() <= TOKEN_BYTES_MAX
        && entropy_bits(token) >= ENTROPY_BITS_MIN
        && whole_word_context_before(bytes, start, CONTEXT_BYTES, SECRET_CONTEXT)
    {
        scanner.push(EntityType::Secret, start, end, CONTEXT_SECRET_CONFIDENCE);
        return Some(end);
    }
    None
}

/// Whether what follows an issuer prefix is a token rather than a name (`sk-learn-models`,
/// `hf_hub_download`): it holds a digit, or it has the shape of a Hugging Face token, 34
/// letters in both cases and nothing else (its tokens often hold no digit).
fn random_tail(prefix: &str, tail: &[u8]) -> bool {
    tail.iter().any(u8::is_ascii_digit)
        || (prefix == "hf_"
            && tail.len() == HUGGING_FACE_TOKEN_LETTERS
            && tail.iter().all(u8::is_ascii_alphabetic)
            && tail.iter().any(u8::is_ascii_uppercase)
            && tail.iter().any(u8::is_ascii_lowercase))
}

/// 40 base64 characters in mixed case, as AWS secret access keys are.
fn aws_secret_key(token: &[u8]) -> bool {
    token.len() == 40
        && token
            .iter()
            .all(|&byte| is_alphanumeric(byte) || byte == b'+' || byte == b'/')
        && token.iter().any(u8::is_ascii_uppercase)
        && token.iter().any(u8::is_ascii_lowercase)
}

/// Shannon entropy of the bytes of `value`, in bits per byte.
pub(super) fn entropy_bits(value: &[u8]) -> f32 {
    let mut counts = [0_u16; 128];
    let mut counted = 0_u16;
    for &byte in value.iter().take(TOKEN_BYTES_MAX) {
        counts[usize::from(byte & 0x7f)] += 1;
        counted += 1;
    }
    let total = f32::from(counted);
    counts
        .iter()
        .filter(|&&count| count > 0)
        .map(|&count| {
            let share = f32::from(count) / total;
            -share * share.log2()
        })
        .sum()
}
