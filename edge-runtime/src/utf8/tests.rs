use super::Utf8Assembler;

fn assemble(pieces: &[&[u8]]) -> Vec<String> {
    let mut assembler = Utf8Assembler::default();
    let mut out: Vec<String> = pieces.iter().map(|piece| assembler.push(piece)).collect();
    out.push(assembler.finish());
    out
}

#[test]
fn ascii_passes_through_piece_by_piece() {
    assert_eq!(assemble(&[b"Hel", b"lo"]), ["Hel", "lo", ""]);
}

#[test]
fn a_character_split_across_pieces_is_emitted_once_complete() {
    // "é" is C3 A9; "🙂" is F0 9F 99 82.
    assert_eq!(
        assemble(&[b"caf\xC3", b"\xA9 ", b"\xF0\x9F", b"\x99", b"\x82!"]),
        ["caf", "é ", "", "", "🙂!", ""]
    );
}

#[test]
fn invalid_bytes_become_replacement_characters() {
    assert_eq!(assemble(&[b"a\xFFb"]), ["a\u{FFFD}b", ""]);
    assert_eq!(assemble(&[b"a\xC3(b"]), ["a\u{FFFD}(b", ""]);
}

#[test]
fn an_unfinished_tail_at_the_end_becomes_one_replacement_character() {
    assert_eq!(assemble(&[b"ok\xF0\x9F"]), ["ok", "\u{FFFD}"]);
}

#[test]
fn every_split_of_a_mixed_string_reassembles_exactly() {
    let text = "a é 🙂 中文 z";
    let bytes = text.as_bytes();
    for first in 0..bytes.len() {
        for second in first..bytes.len() {
            let pieces = [&bytes[..first], &bytes[first..second], &bytes[second..]];
            assert_eq!(
                assemble(&pieces).concat(),
                text,
                "split at {first}, {second}"
            );
        }
    }
}
