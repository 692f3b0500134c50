//! Tests of the update commands' own parsing.

use super::parse_process_start;

#[test]
fn a_process_start_is_read_past_an_odd_command_name_and_zombies_have_none() {
    let line = |state: &str| {
        format!(
            "4242 (isthmus (x) y) {state} 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 9 0 \
             123456 1000000 2000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
        )
    };
    assert_eq!(parse_process_start(&line("S")), Some(123_456));
    assert_eq!(parse_process_start(&line("Z")), None);
    assert_eq!(parse_process_start("garbage"), None);
}
