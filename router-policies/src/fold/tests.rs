use proptest::prelude::*;

use super::Folded;

fn folded_text(text: &str) -> String {
    Folded::of(text).map_or_else(|| text.to_owned(), |folded| folded.text)
}

#[test]
fn look_alikes_become_ascii_and_invisible_characters_go() {
    let text = "4\u{ff11}1\u{200b}1\u{a0}\u{2013}x\u{e0041}\u{1d400}é\u{ad}!";
    let Some(folded) = Folded::of(text) else {
        panic!("nothing folded in {text:?}");
    };
    assert_eq!(folded.text, "4111 -xAAé!");
    // The `1 -` after the zero-width space was written for `1\u{a0}\u{2013}`.
    let span = folded.original(&(3..6));
    assert_eq!(&text[span], "1\u{a0}\u{2013}");
    // `é!`: the soft hyphen between them is inside.
    let span = folded.original(&(9..12));
    assert_eq!(&text[span], "é\u{ad}!");
    assert!(Folded::of("plain ASCII").is_none());
    assert!(Folded::of("naïve café, nothing to fold").is_none());
}

proptest! {
    #[test]
    fn every_folded_span_maps_to_original_text_that_folds_to_it(
        text in "(a|4|é|€|\\u{a0}|\\u{200b}|\\u{2013}|\\u{ff14}|\\u{e0041}|\\u{1d7ce}|\\u{ad}| |%|%4|%40|%2|%20|%0a|%7F|%C3|&|&#64;|&#x2e;|&#9;|&commat;|&amp|\\[at\\]|\\(dot\\)|\\[|\\(|AT\\]|\\\\|\\\\u|\\\\u0040|\\\\u00a0|\\\\u00e9|\\\\u200b|\\\\u002|\\\\ud835|\\\\udc00|\\\\ud83d|\\\\ude00){0,40}",
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 2),
    ) {
        let Some(folded) = Folded::of(&text) else {
            return Ok(());
        };
        let boundaries: Vec<usize> = (0..=folded.text.len())
            .filter(|&at| folded.text.is_char_boundary(at))
            .collect();
        let mut ends = [*cuts[0].get(&boundaries), *cuts[1].get(&boundaries)];
        ends.sort_unstable();
        let [start, end] = ends;
        prop_assume!(start < end);
        let span = folded.original(&(start..end));
        prop_assert!(text.is_char_boundary(span.start) && text.is_char_boundary(span.end));
        prop_assert_eq!(folded_text(&text[span]), &folded.text[start..end]);
    }
}

#[test]
fn percent_escapes_of_printable_ascii_are_read_as_their_characters() {
    let text = "mailto:jane.doe%40contoso.com?x=4111%201111 100% %2 %0A %7f %c3%a9";
    let Some(folded) = Folded::of(text) else {
        panic!("nothing folded in {text:?}");
    };
    // Control characters, bytes above ASCII and lone `%` stay as they are.
    assert_eq!(
        folded.text,
        "mailto:jane.doe@contoso.com?x=4111 1111 100% %2 %0A %7f %c3%a9"
    );
    let at = folded.text.find('@').unwrap();
    assert_eq!(&text[folded.original(&(at..at + 1))], "%40");
    let span = folded.original(&(7..27));
    assert_eq!(&text[span], "jane.doe%40contoso.com");
    assert!(Folded::of("50% of users, 100%").is_none());
}

#[test]
fn html_references_and_bracketed_words_are_read_as_their_characters() {
    let text = "jane&#64;contoso&#x2E;com, j&commat;c&period;io, AT&T &amp; co, &#9; &#1234; \
                bob [at] example [dot] org, eve(AT)x(dot)com, f(at) [x]";
    let Some(folded) = Folded::of(text) else {
        panic!("nothing folded in {text:?}");
    };
    assert_eq!(
        folded.text,
        "jane@contoso.com, j@c.io, AT&T & co, &#9; &#1234; bob@example.org, eve@x.com, f@[x]"
    );
    let at = folded.text.find("bob@").unwrap();
    assert_eq!(
        &text[folded.original(&(at..at + "bob@example.org".len()))],
        "bob [at] example [dot] org"
    );
    assert!(Folded::of("f(x) = [a, b] & {c}; 100% (at most)").is_none());
}

#[test]
fn json_unicode_escapes_are_read_as_their_characters() {
    let text = r"jane\u0040contoso.com 4111\u00a01111 jo\u200bhn \ud835\udc00 caf\u00e9 \ud83d\ude00 \u000a \u12 \ud800x \\u0041";
    let Some(folded) = Folded::of(text) else {
        panic!("nothing folded in {text:?}");
    };
    // Characters that stay (`é`, an emoji), control characters, short escapes and lone
    // surrogates stay as written. The fold does not parse JSON: after an escaped backslash
    // it reads one escape too many, which only shows the scan more.
    assert_eq!(
        folded.text,
        r"jane@contoso.com 4111 1111 john A caf\u00e9 \ud83d\ude00 \u000a \u12 \ud800x \A"
    );
    let span = folded.original(&(0.."jane@contoso.com".len()));
    assert_eq!(&text[span], r"jane\u0040contoso.com");
    let bold = folded.text.find(" A ").unwrap() + 1;
    assert_eq!(&text[folded.original(&(bold..bold + 1))], r"\ud835\udc00");
    assert_eq!(folded_text(r"\u0456gnore"), r"\u0456gnore");
    let words = Folded::of_words(r"\u0456gnore").map(|folded| folded.text);
    assert_eq!(words.as_deref(), Some("ignore"));
}

#[test]
fn confusable_letters_are_read_as_latin_only_for_words() {
    let text = "\u{456}gn\u{43e}re";
    assert_eq!(folded_text(text), text, "the scan's fold keeps letters");
    let words = Folded::of_words(text).map(|folded| folded.text);
    assert_eq!(words.as_deref(), Some("ignore"));
}
