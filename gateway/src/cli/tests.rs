use super::{PANIC_MESSAGE_WITHHELD, panic_message};

/// The payload a real panic carries, as the panic hook receives it.
fn payload_of(panicking: impl FnOnce() + std::panic::UnwindSafe) -> Box<dyn std::any::Any + Send> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let payload = std::panic::catch_unwind(panicking).expect_err("it panics");
    std::panic::set_hook(hook);
    payload
}

#[test]
fn panic_messages_written_into_the_program_are_logged_and_formatted_ones_withheld() {
    let literal = payload_of(|| panic!("the audit writer stopped"));
    assert_eq!(panic_message(&*literal, false), "the audit writer stopped");

    let prompt = String::from("my IBAN is DE89 3704 0044 0532 0130 00, café");
    let sliced = payload_of(move || {
        let _ = &prompt[..prompt.len() - 1];
    });
    assert_eq!(panic_message(&*sliced, false), PANIC_MESSAGE_WITHHELD);
    let shown = panic_message(&*sliced, true);
    assert!(shown.contains("DE89 3704"), "{shown}");

    let indexed = payload_of(|| {
        let groups = [0_u8; 8];
        let index = groups.len() + usize::from(groups[0]);
        let _ = groups[index];
    });
    assert_eq!(panic_message(&*indexed, false), PANIC_MESSAGE_WITHHELD);
}
