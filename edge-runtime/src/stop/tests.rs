use super::{StopMatcher, StopOutcome, TokenValues};

/// Feeds `pieces` and renders what came out: emitted text joined by `|`, then how it ended.
fn run(stops: &[&str], pieces: &[&str]) -> String {
    let mut matcher = StopMatcher::new(stops.iter().map(|stop| stop.to_string()).collect());
    let mut out = Vec::new();
    for piece in pieces {
        match matcher.push(piece) {
            StopOutcome::Continue(text) => out.push(text),
            StopOutcome::Stopped(text) => {
                out.push(text);
                return format!("{} (stopped)", out.join("|"));
            }
        }
    }
    out.push(matcher.finish());
    format!("{} (ended)", out.join("|"))
}

#[test]
fn no_stop_strings_pass_everything_through() {
    assert_eq!(run(&[], &["a", "b"]), "a|b| (ended)");
}

#[test]
fn a_stop_string_inside_one_piece_cuts_the_text_before_it() {
    assert_eq!(
        run(&["END"], &["one ", "two END three"]),
        "one |two  (stopped)"
    );
}

#[test]
fn a_stop_string_split_across_pieces_is_held_back_and_never_leaks() {
    assert_eq!(
        run(&["\n\n"], &["Hi", "\n", "\n", "more"]),
        "Hi|| (stopped)"
    );
    assert_eq!(run(&["STOP"], &["x S", "T", "O", "P y"]), "x ||| (stopped)");
}

#[test]
fn held_text_is_released_when_the_match_fails() {
    assert_eq!(run(&["STOP"], &["ST", "AR"]), "|STAR| (ended)");
}

#[test]
fn held_text_is_released_at_the_end() {
    assert_eq!(run(&["STOP"], &["go ST"]), "go |ST (ended)");
}

#[test]
fn the_earliest_of_several_stop_strings_wins() {
    assert_eq!(run(&["bb", "a"], &["xxbba"]), "xx (stopped)");
}

#[test]
fn multibyte_stop_strings_match_on_character_boundaries() {
    assert_eq!(run(&["é!"], &["caf", "é", "!"]), "caf|| (stopped)");
    assert_eq!(run(&["éa"], &["éé"]), "é|é (ended)");
}

#[test]
fn empty_stop_strings_are_ignored() {
    assert_eq!(run(&[""], &["a"]), "a| (ended)");
}

/// Feeds tokens (text made, value) through a matcher and [`TokenValues`], as the engine
/// does: the text that went out and the values that went with it.
fn run_values(stops: &[&str], tokens: &[(&str, u32)], flush_at_end: bool) -> (String, Vec<u32>) {
    let mut matcher = StopMatcher::new(stops.iter().map(|stop| stop.to_string()).collect());
    let mut values = TokenValues::default();
    let (mut text, mut out) = (String::new(), Vec::new());
    for &(piece, value) in tokens {
        values.push(piece.len(), Some(value));
        match matcher.push(piece) {
            StopOutcome::Continue(emit) => {
                values.release(emit.len(), &mut out);
                text.push_str(&emit);
            }
            StopOutcome::Stopped(emit) => {
                values.release(emit.len(), &mut out);
                text.push_str(&emit);
                return (text, out);
            }
        }
    }
    if flush_at_end {
        text.push_str(&matcher.finish());
        values.finish(&mut out);
    }
    (text, out)
}

#[test]
fn token_values_go_out_with_their_text_and_not_with_a_stop_string() {
    // No stop strings: each value goes out with its token.
    assert_eq!(
        run_values(&[], &[("a", 1), ("b", 2)], false),
        ("ab".to_owned(), vec![1, 2])
    );
    // The tokens of the stop string lose their values; the one before it keeps its.
    assert_eq!(
        run_values(
            &["END"],
            &[("one ", 1), ("E", 2), ("ND", 3), (" x", 4)],
            true
        ),
        ("one ".to_owned(), vec![1])
    );
    // A token that straddles the stop string's start keeps its value: part of it is text.
    assert_eq!(
        run_values(&["END"], &[("one", 1), (" E", 2), ("ND", 3)], true),
        ("one ".to_owned(), vec![1, 2])
    );
    // Held text that turned out not to be a stop string releases its tokens' values.
    assert_eq!(
        run_values(&["END"], &[("E", 1), ("N", 2), ("o", 3)], false),
        ("ENo".to_owned(), vec![1, 2, 3])
    );
    // Held at the end (max_tokens): the text and its values go out together.
    assert_eq!(
        run_values(&["END"], &[("a", 1), ("EN", 2)], true),
        ("aEN".to_owned(), vec![1, 2])
    );
    // A token whose bytes complete no character (text "") goes out with the next one.
    assert_eq!(
        run_values(&[], &[("", 1), ("é", 2), ("!", 3)], false),
        ("é!".to_owned(), vec![1, 2, 3])
    );
    let mut values = TokenValues::default();
    let mut out = Vec::new();
    values.push(0, Some(1));
    values.release(0, &mut out);
    assert!(out.is_empty());
}
