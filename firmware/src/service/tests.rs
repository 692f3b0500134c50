//! The notification protocol: parsing what systemd passes, formatting what the gateway says,
//! and one datagram through a real socket of each kind.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use expect_test::expect;

use super::{
    Notice, NotifyAddress, NotifyError, ServiceManager, format_notices, parse_notify_socket,
    parse_watchdog,
};

#[test]
fn notify_socket_is_a_path_an_abstract_name_or_nothing() {
    assert_eq!(parse_notify_socket(None), Ok(None));
    assert_eq!(parse_notify_socket(Some("")), Ok(None));
    assert_eq!(
        parse_notify_socket(Some("/run/systemd/notify")),
        Ok(Some(NotifyAddress::Path(PathBuf::from(
            "/run/systemd/notify"
        ))))
    );
    assert_eq!(
        parse_notify_socket(Some("@/org/freedesktop/systemd1/notify/42")),
        Ok(Some(NotifyAddress::Abstract(
            b"/org/freedesktop/systemd1/notify/42".to_vec()
        )))
    );
    for bad in ["relative/notify", "@"] {
        let error = parse_notify_socket(Some(bad)).unwrap_err();
        assert_eq!(error, NotifyError::Socket(bad.to_owned()));
    }
    expect![[
        r#"NOTIFY_SOCKET `run/notify` is neither an absolute path nor an abstract name (`@name`)"#
    ]]
    .assert_eq(
        &parse_notify_socket(Some("run/notify"))
            .unwrap_err()
            .to_string(),
    );
}

#[test]
fn the_watchdog_is_ours_unless_another_pid_is_named() {
    let own = 4242;
    assert_eq!(parse_watchdog(None, None, own), Ok(None));
    assert_eq!(parse_watchdog(Some(""), Some("4242"), own), Ok(None));
    assert_eq!(
        parse_watchdog(Some("30000000"), None, own),
        Ok(Some(Duration::from_secs(30)))
    );
    assert_eq!(
        parse_watchdog(Some("30000000"), Some("4242"), own),
        Ok(Some(Duration::from_secs(30)))
    );
    // Meant for another process (a shell that started us): not ours to serve.
    assert_eq!(parse_watchdog(Some("30000000"), Some("1"), own), Ok(None));
    for bad in ["0", "-5", "30s", "1e6"] {
        assert_eq!(
            parse_watchdog(Some(bad), None, own),
            Err(NotifyError::WatchdogPeriod(bad.to_owned()))
        );
    }
}

#[test]
fn notices_are_one_assignment_per_line() {
    let check = |notices: &[Notice], expected: expect_test::Expect| {
        expected.assert_eq(&format_notices(notices));
    };
    check(
        &[Notice::Ready, Notice::Status("serving".into())],
        expect![[r#"
            READY=1
            STATUS=serving
        "#]],
    );
    check(
        &[Notice::Reloading, Notice::Stopping, Notice::Watchdog],
        expect![[r#"
            RELOADING=1
            STOPPING=1
            WATCHDOG=1
        "#]],
    );
    // A newline in a status cannot start an assignment of its own.
    check(
        &[Notice::Status("failed: model\nREADY=1".into())],
        expect![[r#"
            STATUS=failed: model READY=1
        "#]],
    );
}

#[test]
fn a_long_status_is_cut_at_a_character_boundary() {
    let text = "é".repeat(400);
    let message = format_notices(&[Notice::Status(text)]);
    let status = message
        .strip_prefix("STATUS=")
        .and_then(|rest| rest.strip_suffix('\n'))
        .unwrap();
    assert_eq!(status.len(), 512);
    assert!(status.chars().all(|character| character == 'é'));
}

#[test]
fn notices_reach_a_socket_bound_at_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let listener = UnixDatagram::bind(&path).unwrap();
    let manager = ServiceManager {
        target: Some((UnixDatagram::unbound().unwrap(), NotifyAddress::Path(path))),
        watchdog_period: Some(Duration::from_secs(10)),
    };
    assert!(manager.is_listening());
    assert_eq!(manager.watchdog_interval(), Some(Duration::from_secs(5)));
    manager
        .notify(&[Notice::Ready, Notice::Status("serving".into())])
        .unwrap();
    let mut buffer = [0_u8; 256];
    let length = listener.recv(&mut buffer).unwrap();
    assert_eq!(&buffer[..length], b"READY=1\nSTATUS=serving\n");
}

#[test]
fn notices_reach_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt as _;
    let name = format!("isthmus-notify-test-{}", std::process::id());
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = UnixDatagram::bind_addr(&address).unwrap();
    let manager = ServiceManager {
        target: Some((
            UnixDatagram::unbound().unwrap(),
            parse_notify_socket(Some(&format!("@{name}")))
                .unwrap()
                .unwrap(),
        )),
        watchdog_period: None,
    };
    manager.notify(&[Notice::Watchdog]).unwrap();
    let mut buffer = [0_u8; 64];
    let length = listener.recv(&mut buffer).unwrap();
    assert_eq!(&buffer[..length], b"WATCHDOG=1\n");
}

#[test]
fn without_a_manager_nothing_is_sent_and_nothing_fails() {
    let manager = ServiceManager::none();
    assert!(!manager.is_listening());
    assert_eq!(manager.watchdog_interval(), None);
    manager.notify(&[Notice::Ready]).unwrap();
}
