use super::{StopMatcher, StopOutcome};

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
