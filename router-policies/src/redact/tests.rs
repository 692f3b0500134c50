use expect_test::{Expect, expect};
use proptest::prelude::*;

use super::{RedactionMap, Restorer, redact};
use crate::sensitivity::{DictionaryConfig, PatternConfig, RecognizerConfig, Recognizers};

/// Redacts each string of one request with a shared map and prints the redacted strings,
/// the map's `Debug`, and the one-shot restore of each redacted string.
fn check(request: &[&str], expect: Expect) {
    let recognizers = Recognizers::default();
    let mut map = RedactionMap::new();
    let redacted: Vec<String> = request
        .iter()
        .map(|text| redact(text, &recognizers.scan(text), &mut map))
        .collect();
    let mut actual = String::new();
    for (original, redacted) in request.iter().zip(&redacted) {
        actual.push_str(&format!("{redacted}\n"));
        assert_eq!(
            map.restore(redacted),
            *original,
            "restore gives back the original"
        );
    }
    actual.push_str(&format!("{map:?}\n"));
    expect.assert_eq(&actual);
}

#[test]
fn values_get_typed_placeholders_shared_across_the_request() {
    check(
        &[
            "Mail jane@example.com and bob@example.org about card 4111 1111 1111 1111.",
            "Again: jane@example.com, IBAN DE89 3704 0044 0532 0130 00, café ✓",
        ],
        expect![[r#"
            Mail <EMAIL_1> and <EMAIL_2> about card <CREDIT_CARD_1>.
            Again: <EMAIL_1>, IBAN <IBAN_1>, café ✓
            RedactionMap { placeholders: ["<CREDIT_CARD_1>", "<EMAIL_1>", "<EMAIL_2>", "<IBAN_1>"] }
        "#]],
    );
}

#[test]
fn nothing_found_changes_nothing() {
    check(
        &["version 1.2.3.4, order ORD-2024-000123"],
        expect![[r#"
            version 1.2.3.4, order ORD-2024-000123
            RedactionMap { placeholders: [] }
        "#]],
    );
}

fn answer_map() -> RedactionMap {
    let text = "jane@example.com, 4111 1111 1111 1111, bob@example.org";
    let mut map = RedactionMap::new();
    redact(text, &Recognizers::default().scan(text), &mut map);
    map
}

/// Streams `chunks` through a restorer and prints what each push released, then finish.
fn check_stream(chunks: &[&str], expect: Expect) {
    let mut restorer = Restorer::new(answer_map());
    let mut actual = String::new();
    for chunk in chunks {
        actual.push_str(&format!("{chunk:?} -> {:?}\n", restorer.push(chunk)));
    }
    actual.push_str(&format!("finish -> {:?}\n", restorer.finish()));
    expect.assert_eq(&actual);
}

#[test]
fn a_placeholder_split_across_chunks_is_held_then_restored() {
    check_stream(
        &["Write to <EMA", "IL_1> and <", "CREDIT_CARD_1", ">", "."],
        expect![[r#"
            "Write to <EMA" -> "Write to "
            "IL_1> and <" -> "jane@example.com and "
            "CREDIT_CARD_1" -> ""
            ">" -> "4111 1111 1111 1111"
            "." -> "."
            finish -> ""
        "#]],
    );
}

#[test]
fn unknown_placeholders_and_other_angle_brackets_pass_through() {
    check_stream(
        &[
            "<EMAIL_9> a < b, <b>bold</b> <EMAIL_",
            "2> <EMAIL_2",
            "x> <EMAIL_1",
        ],
        expect![[r#"
            "<EMAIL_9> a < b, <b>bold</b> <EMAIL_" -> "<EMAIL_9> a < b, <b>bold</b> "
            "2> <EMAIL_2" -> "bob@example.org "
            "x> <EMAIL_1" -> "<EMAIL_2x> "
            finish -> "<EMAIL_1"
        "#]],
    );
}

#[test]
fn debug_shows_placeholders_never_values() {
    let map = answer_map();
    let shown = format!("{map:?} {:?}", Restorer::new(map.clone()));
    assert!(
        !shown.contains("jane") && !shown.contains("4111"),
        "{shown}"
    );
    expect![[r#"RedactionMap { placeholders: ["<CREDIT_CARD_1>", "<EMAIL_1>", "<EMAIL_2>"] } Restorer { map: RedactionMap { placeholders: ["<CREDIT_CARD_1>", "<EMAIL_1>", "<EMAIL_2>"] }, held_bytes: 0 }"#]]
        .assert_eq(&shown);
}

const ANSWER: &str = "Dear <EMAIL_1>, your card <CREDIT_CARD_1> is on file; cc <EMAIL_2>, not <EMAIL_3> or <EMAIL_ or <<EMAIL_1>>. é<EMAIL_2>";

#[test]
fn every_split_of_an_answer_streams_like_the_one_shot_restore() {
    let map = answer_map();
    let whole = map.restore(ANSWER);
    for split in (0..=ANSWER.len()).filter(|&split| ANSWER.is_char_boundary(split)) {
        let mut restorer = Restorer::new(map.clone());
        let mut streamed = restorer.push(&ANSWER[..split]);
        streamed.push_str(&restorer.push(&ANSWER[split..]));
        streamed.push_str(&restorer.finish());
        assert_eq!(streamed, whole, "split at {split}");
    }
    expect![[r#"Dear jane@example.com, your card 4111 1111 1111 1111 is on file; cc bob@example.org, not <EMAIL_3> or <EMAIL_ or <jane@example.com>. ébob@example.org"#]]
        .assert_eq(&whole);
}

/// Splits `text` at the given char-boundary-adjusted cut points.
fn chunks_of(text: &str, cuts: &[usize]) -> Vec<String> {
    let mut cuts: Vec<usize> = cuts
        .iter()
        .map(|&cut| {
            let mut cut = cut % (text.len() + 1);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            cut
        })
        .collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for cut in cuts.into_iter().chain([text.len()]) {
        chunks.push(text[from..cut].to_owned());
        from = cut;
    }
    chunks
}

proptest! {
    #[test]
    fn any_chunking_streams_like_the_one_shot_restore(
        pieces in proptest::collection::vec(
            prop_oneof!["<EMAIL_1>", "<EMAIL_2>", "<CREDIT_CARD_1>", "<EMAIL_", "<", ">", "[a-zé <>_]{0,8}", "<EMAIL_9>"],
            0..20,
        ),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let text = pieces.concat();
        let map = answer_map();
        let mut restorer = Restorer::new(map.clone());
        let mut streamed = String::new();
        for chunk in chunks_of(&text, &cuts) {
            streamed.push_str(&restorer.push(&chunk));
            // Never more is held than the longest placeholder.
            prop_assert!(restorer.held.len() < "<CREDIT_CARD_1>".len());
        }
        streamed.push_str(&restorer.finish());
        prop_assert_eq!(streamed, map.restore(&text));
    }

    #[test]
    fn restoring_a_redacted_text_gives_it_back(
        words in proptest::collection::vec(
            prop_oneof![
                "[a-z]{1,8}",
                "[a-z]{1,6}@example\\.(com|org)",
                Just("4111 1111 1111 1111".to_owned()),
                Just("DE89 3704 0044 0532 0130 00".to_owned()),
                "\\+44 20 7946 [0-9]{4}",
                Just("é".to_owned()),
            ],
            0..16,
        ),
    ) {
        let text = words.join(" ");
        let mut map = RedactionMap::new();
        let redacted = redact(&text, &Recognizers::default().scan(&text), &mut map);
        prop_assert!(!redacted.contains("4111") && !redacted.contains("@example"), "{redacted}");
        prop_assert_eq!(map.restore(&redacted), text);
    }
}

#[test]
fn values_restored_inside_json_strings_are_escaped() {
    // A private key's lines end in newlines, which a JSON string must escape.
    let key =
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----";
    let mut map = RedactionMap::new();
    let redacted = redact(key, &Recognizers::default().scan(key), &mut map);
    assert!(!redacted.contains("MIIE"), "{redacted}");
    let placeholder = map.placeholders()[0].to_owned();
    let arguments = format!(r#"{{"key": "{placeholder}", "note": "<UNKNOWN_1>"}}"#);
    let restored = map.restore_in_json(&arguments);
    assert_eq!(
        restored,
        r#"{"key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----", "note": "<UNKNOWN_1>"}"#
    );
    assert_eq!(map.restore(&placeholder), key);
    // Streamed in pieces that cut the placeholder, the same.
    let mut restorer = Restorer::in_json(map);
    let (head, tail) = arguments.split_at(arguments.find('<').unwrap_or(0) + 3);
    let streamed = restorer.push(head) + &restorer.push(tail) + &restorer.finish();
    assert_eq!(streamed, restored);
}

#[test]
fn placeholders_the_request_already_writes_are_not_handed_out() {
    let text = "Use tags like <EMAIL_1> or <CREDIT_CARD_2>; mail jane@example.com, card 4111 1111 1111 1111, and <lower_1> or <EMAIL_> stay.";
    let mut map = RedactionMap::new();
    map.reserve_placeholders_in(text);
    let redacted = redact(text, &Recognizers::default().scan(text), &mut map);
    assert_eq!(
        redacted,
        "Use tags like <EMAIL_1> or <CREDIT_CARD_2>; mail <EMAIL_2>, card <CREDIT_CARD_1>, and <lower_1> or <EMAIL_> stay."
    );
    // The client's own tag comes back as written; the handed-out one as the value.
    assert_eq!(
        map.restore("<EMAIL_1> is not <EMAIL_2>"),
        "<EMAIL_1> is not jane@example.com"
    );
}

#[test]
fn placeholders_of_custom_entities_named_with_digits_are_reserved_too() {
    let config = RecognizerConfig {
        dictionaries: vec![DictionaryConfig {
            name: "emp2".to_owned(),
            terms: vec!["Ada Lovelace".to_owned()],
        }],
        patterns: vec![PatternConfig {
            name: "2fa".to_owned(),
            regex: r"\bOTP-\d{6}\b".to_owned(),
        }],
        ..RecognizerConfig::default()
    };
    let recognizers = Recognizers::compile(&config).unwrap();
    let text = "Tags <EMP2_1> and <2FA_1> stay; Ada Lovelace sent OTP-493817, and <EMP2_> or <2FA_1x> are no placeholders.";
    let mut map = RedactionMap::new();
    map.reserve_placeholders_in(text);
    let redacted = redact(text, &recognizers.scan(text), &mut map);
    assert_eq!(
        redacted,
        "Tags <EMP2_1> and <2FA_1> stay; <EMP2_2> sent <2FA_2>, and <EMP2_> or <2FA_1x> are no placeholders."
    );
    assert_eq!(
        map.restore("<EMP2_1> and <2FA_1> are not <EMP2_2> and <2FA_2>"),
        "<EMP2_1> and <2FA_1> are not Ada Lovelace and OTP-493817"
    );
}
