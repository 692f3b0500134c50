//! RFC 8785 test vectors: the sorting and string examples of section 3.2, and the number
//! vectors of Appendix B.

use expect_test::{Expect, expect};

use super::{canonicalize, format_double};

/// Canonicalises `input`; characters outside printable ASCII are shown as `\u{..}` (Rust's
/// notation, distinct from JSON's escapes) so that the expectation is readable.
fn check(input: &str, expect: Expect) {
    let value: serde_json::Value = serde_json::from_str(input).unwrap_or_default();
    let canonical = canonicalize(&value).map_or_else(
        |error| error.to_string(),
        |bytes| String::from_utf8(bytes).unwrap_or_default(),
    );
    let shown: String = canonical
        .chars()
        .map(|character| {
            if character == ' ' || character.is_ascii_graphic() {
                character.to_string()
            } else {
                character.escape_unicode().to_string()
            }
        })
        .collect();
    expect.assert_eq(&shown);
}

#[test]
fn rfc_8785_section_3_2_2_example() {
    check(
        r#"{
          "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#,
        expect![[
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"\u{20ac}$\u000f\nA'B\"\\\\\"/"}"#
        ]],
    );
}

#[test]
fn members_sort_by_utf16_code_units() {
    // RFC 8785 section 3.2.3: U+1F600 (a surrogate pair) sorts before U+FB33.
    check(
        r#"{
          "\u20ac": "Euro Sign",
          "\r": "Carriage Return",
          "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One",
          "\ud83d\ude00": "Emoji: Grinning Face",
          "\u0080": "Control",
          "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#,
        expect![[
            r#"{"\r":"Carriage Return","1":"One","\u{80}":"Control","\u{f6}":"Latin Small Letter O With Diaeresis","\u{20ac}":"Euro Sign","\u{1f600}":"Emoji: Grinning Face","\u{fb33}":"Hebrew Letter Dalet With Dagesh"}"#
        ]],
    );
}

#[test]
fn nested_objects_and_escapes() {
    check(
        r#"{"b":{"z":1,"a":[{"y":true,"x":null}]},"a":"\u0000\u0007\b\t\n\u000b\f\r\u001f\u007f\u2028"}"#,
        expect![[
            r#"{"a":"\u0000\u0007\b\t\n\u000b\f\r\u001f\u{7f}\u{2028}","b":{"a":[{"x":null,"y":true}],"z":1}}"#
        ]],
    );
}

#[test]
fn integers_are_exact_up_to_2_pow_53_and_rounded_beyond() {
    check(
        "[0, -0, 1, -1, 9007199254740992, -9007199254740992, 9007199254740993, 18446744073709551615, -9223372036854775808]",
        expect![[
            r#"[0,0,1,-1,9007199254740992,-9007199254740992,9007199254740992,18446744073709552000,-9223372036854776000]"#
        ]],
    );
}

#[test]
fn rfc_8785_appendix_b_numbers() {
    let vectors: &[(u64, &str)] = &[
        (0x0000_0000_0000_0000, "0"),
        (0x8000_0000_0000_0000, "0"),
        (0x0000_0000_0000_0001, "5e-324"),
        (0x8000_0000_0000_0001, "-5e-324"),
        (0x7fef_ffff_ffff_ffff, "1.7976931348623157e+308"),
        (0xffef_ffff_ffff_ffff, "-1.7976931348623157e+308"),
        (0x4340_0000_0000_0000, "9007199254740992"),
        (0xc340_0000_0000_0000, "-9007199254740992"),
        (0x4430_0000_0000_0000, "295147905179352830000"),
        (0x44b5_2d02_c7e1_4af5, "9.999999999999997e+22"),
        (0x44b5_2d02_c7e1_4af6, "1e+23"),
        (0x44b5_2d02_c7e1_4af7, "1.0000000000000001e+23"),
        (0x444b_1ae4_d6e2_ef4e, "999999999999999700000"),
        (0x444b_1ae4_d6e2_ef4f, "999999999999999900000"),
        (0x444b_1ae4_d6e2_ef50, "1e+21"),
        (0x3eb0_c6f7_a0b5_ed8c, "9.999999999999997e-7"),
        (0x3eb0_c6f7_a0b5_ed8d, "0.000001"),
        (0x41b3_de43_5555_5553, "333333333.3333332"),
        (0x41b3_de43_5555_5554, "333333333.33333325"),
        (0x41b3_de43_5555_5555, "333333333.3333333"),
        (0x41b3_de43_5555_5556, "333333333.3333334"),
        (0x41b3_de43_5555_5557, "333333333.33333343"),
        (0xbecb_f647_612f_3696, "-0.0000033333333333333333"),
        (0x4314_3ff3_c1cb_0959, "1424953923781206.2"),
    ];
    let wrong: Vec<String> = vectors
        .iter()
        .filter_map(|&(bits, expected)| {
            let got = format_double(f64::from_bits(bits)).unwrap_or_default();
            (got != expected).then(|| format!("{bits:016x}: got {got}, expected {expected}"))
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    for bits in [0x7fff_ffff_ffff_ffff_u64, 0x7ff0_0000_0000_0000] {
        assert!(format_double(f64::from_bits(bits)).is_err());
    }
}

#[test]
fn floats_survive_a_round_trip_through_text() {
    // The verifier parses lines back: canonical text must parse to the same double.
    for value in [
        0.1,
        1.0 / 3.0,
        2.5e-8,
        123_456.789,
        5e-324,
        1.7976931348623157e308,
    ] {
        let text = format_double(value).unwrap_or_default();
        let parsed: f64 = serde_json::from_str(&text).unwrap_or(f64::NAN);
        assert_eq!(parsed.to_bits(), value.to_bits(), "{text}");
    }
}

proptest::proptest! {
    /// Strings with and without characters to escape read back as themselves, with no
    /// escape JCS does not ask for (so plain text is copied as it is).
    #[test]
    fn strings_read_back_as_themselves(text in "[\\u{0}-\\u{1f}\"\\\\a-z \\u{7f}\\u{e9}\\u{2028}\\u{1f600}]{0,64}") {
        let mut written = Vec::new();
        super::write_string(&mut written, &text);
        let read: String = serde_json::from_slice(&written).unwrap();
        proptest::prop_assert_eq!(&read, &text);
        let needs_escape = text.chars().any(|c| c < ' ' || c == '"' || c == '\\');
        proptest::prop_assert_eq!(written.len() == text.len() + 2, !needs_escape);
    }
}
