use super::{key_id, parse_private_key, parse_public_key, private_key_pem, public_key_pem};

/// RFC 8410's example key pair (sections 10.1 and 10.3), as OpenSSL writes them.
const RFC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";
const RFC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";

#[test]
fn openssl_pem_keys_are_read_and_written_byte_for_byte() {
    let private = parse_private_key(RFC_PRIVATE.as_bytes()).unwrap();
    let public = parse_public_key(RFC_PUBLIC.as_bytes()).unwrap();
    assert_eq!(private.verifying_key(), public);
    assert_eq!(private_key_pem(&private), RFC_PRIVATE);
    assert_eq!(public_key_pem(&public), RFC_PUBLIC);
    assert_eq!(key_id(&public).len(), 16);
}

#[test]
fn other_things_are_refused_with_a_reason() {
    for (contents, reason) in [
        (&b"\xff\xfe"[..], "not text"),
        (
            b"-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n",
            "not base64",
        ),
        (b"AAAA", "neither"),
    ] {
        let error = parse_public_key(contents).unwrap_err();
        assert!(error.contains(reason), "{error}");
    }
    // A public key is not a private key, nor the other way round.
    assert!(parse_private_key(RFC_PUBLIC.as_bytes()).is_err());
    assert!(parse_public_key(RFC_PRIVATE.as_bytes()).is_err());
    assert_eq!(
        parse_public_key(&vec![b'A'; 5000]).unwrap_err(),
        "file too large"
    );
}
