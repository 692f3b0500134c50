use super::{addressed_from_this_machine, is_loopback_authority};

#[test]
fn loopback_authorities_are_localhost_and_loopback_addresses_with_any_port() {
    for authority in [
        "localhost",
        "LOCALHOST:9090",
        "127.0.0.1",
        "127.8.9.1:80",
        "[::1]",
        "[::1]:9090",
    ] {
        assert!(is_loopback_authority(authority), "{authority}");
    }
    for authority in [
        "",
        "localhost.example",
        "rebound.example:9090",
        "10.0.0.1",
        "[::2]:80",
        "[::1]x",
        "::1",
        "127.0.0.1.nip.io",
    ] {
        assert!(!is_loopback_authority(authority), "{authority}");
    }
}

#[test]
fn requests_name_a_loopback_host_and_come_from_its_pages() {
    let headers = |pairs: &[(&'static str, &str)]| {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    };
    assert!(addressed_from_this_machine(&headers(&[])).is_ok());
    assert!(
        addressed_from_this_machine(&headers(&[
            ("host", "127.0.0.1:9090"),
            ("sec-fetch-site", "same-origin")
        ]))
        .is_ok()
    );
    assert!(addressed_from_this_machine(&headers(&[("host", "127.0.0.1:9090")])).is_ok());
    assert!(
        addressed_from_this_machine(&headers(&[
            ("host", "localhost:9090"),
            ("origin", "http://localhost:9090")
        ]))
        .is_ok()
    );
    for refused in [
        headers(&[("host", "evil.example")]),
        headers(&[("host", "localhost"), ("origin", "null")]),
        headers(&[("host", "localhost"), ("origin", "http://evil.example")]),
        headers(&[("host", "localhost"), ("origin", "file://")]),
        // An `<img>` on another site's page sends no Origin, but the browser says who asked.
        headers(&[("host", "localhost:9090"), ("sec-fetch-site", "cross-site")]),
        headers(&[("host", "localhost:9090"), ("sec-fetch-site", "same-site")]),
    ] {
        assert!(
            addressed_from_this_machine(&refused).is_err(),
            "{refused:?}"
        );
    }
}
