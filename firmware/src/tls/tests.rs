//! Tests of TLS provisioning: files and modes, reuse, renewal and replacement decisions, the
//! certificates' strict profile (parsed with x509-parser) and verification with rustls/webpki.

use std::os::unix::fs::PermissionsExt;

use x509_parser::extensions::GeneralName;

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// 2026-03-01T12:00:00Z.
fn start() -> Result<OffsetDateTime, time::error::ComponentRange> {
    OffsetDateTime::from_unix_timestamp(1_772_366_400)
}

fn hosts() -> Vec<String> {
    ["localhost", "127.0.0.1", "::1", "isthmus-box"]
        .map(str::to_owned)
        .to_vec()
}

fn new_state() -> Result<(tempfile::TempDir, StateDir), Box<dyn std::error::Error>> {
    let scratch = tempfile::tempdir()?;
    let state = StateDir::open(&scratch.path().join("state"))?;
    Ok((scratch, state))
}

fn mode(path: &Path) -> io::Result<u32> {
    Ok(fs::metadata(path)?.permissions().mode() & 0o7777)
}

/// The four files' contents, to compare before and after.
fn contents(tls: &ProvisionedTls) -> io::Result<[Vec<u8>; 4]> {
    Ok([
        fs::read(&tls.ca_cert_path)?,
        fs::read(&tls.ca_key_path)?,
        fs::read(&tls.cert_path)?,
        fs::read(&tls.key_path)?,
    ])
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Box<dyn std::error::Error>> {
    Ok(parse_pem_certificates(&fs::read(path)?)?)
}

fn only<T: Clone>(items: &[T]) -> Result<T, String> {
    match items {
        [item] => Ok(item.clone()),
        _ => Err(format!("expected one item, found {}", items.len())),
    }
}

#[test]
fn first_start_creates_all_files_with_private_modes() -> TestResult {
    let (_scratch, state) = new_state()?;
    let tls = provision_tls(&state, &hosts(), start()?)?;
    assert_eq!(tls.outcome, ProvisionOutcome::Created);
    assert_eq!(tls.reason, None);
    let directory = state.tls_dir();
    assert_eq!(tls.ca_cert_path, directory.join("ca.pem"));
    assert_eq!(tls.ca_key_path, directory.join("ca-key.pem"));
    assert_eq!(tls.cert_path, directory.join("server.pem"));
    assert_eq!(tls.key_path, directory.join("server-key.pem"));
    assert_eq!(mode(&directory)?, 0o700);
    assert_eq!(mode(&tls.ca_cert_path)?, 0o644);
    assert_eq!(mode(&tls.ca_key_path)?, 0o600);
    assert_eq!(mode(&tls.cert_path)?, 0o644);
    assert_eq!(mode(&tls.key_path)?, 0o600);
    let mut names = fs::read_dir(&directory)?
        .map(|entry| entry.map(|entry| entry.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>, _>>()?;
    names.sort();
    assert_eq!(
        names,
        [
            ".provision.lock",
            "ca-key.pem",
            "ca.pem",
            "server-key.pem",
            "server.pem"
        ],
        "no temporary files are left behind"
    );
    let ca_der = only(&certificates(&tls.ca_cert_path)?)?;
    assert_eq!(tls.ca_fingerprint_sha256, fingerprint_sha256(&ca_der));
    assert_eq!(
        tls.server_cert_not_after,
        start()? + Duration::days(SERVER_CERT_VALIDITY_DAYS)
    );
    let key_text = fs::read_to_string(&tls.key_path)?;
    assert!(key_text.starts_with("-----BEGIN PRIVATE KEY-----"));
    Ok(())
}

#[test]
fn second_start_reuses_everything_unchanged() -> TestResult {
    let (_scratch, state) = new_state()?;
    let first = provision_tls(&state, &hosts(), start()?)?;
    let before = contents(&first)?;
    let second = provision_tls(&state, &hosts(), start()? + Duration::days(10))?;
    assert_eq!(second.outcome, ProvisionOutcome::Reused);
    assert_eq!(second.reason, None);
    assert_eq!(second.ca_fingerprint_sha256, first.ca_fingerprint_sha256);
    assert_eq!(second.server_cert_not_after, first.server_cert_not_after);
    assert_eq!(contents(&second)?, before);
    // Hosts in another order, spelled differently, still match.
    let respelled = [
        "ISTHMUS-BOX.",
        "[::1]",
        "localhost",
        "127.0.0.1",
        "localhost",
    ]
    .map(str::to_owned);
    let third = provision_tls(&state, &respelled, start()?)?;
    assert_eq!(third.outcome, ProvisionOutcome::Reused);
    assert_eq!(contents(&third)?, before);
    Ok(())
}

#[test]
fn an_extra_host_renews_only_the_server_certificate() -> TestResult {
    let (_scratch, state) = new_state()?;
    let first = provision_tls(&state, &hosts(), start()?)?;
    let [ca_cert, ca_key, server_cert, server_key] = contents(&first)?;
    let mut more_hosts = hosts();
    more_hosts.push("gateway.plant.example".to_owned());
    more_hosts.push("10.1.2.3".to_owned());
    let second = provision_tls(&state, &more_hosts, start()?)?;
    assert_eq!(second.outcome, ProvisionOutcome::ServerCertRenewed);
    assert_eq!(
        second.reason,
        Some(RenewalReason::ServerCert(
            ServerCertProblem::HostNotCovered {
                host: "gateway.plant.example".to_owned()
            }
        ))
    );
    assert_eq!(second.ca_fingerprint_sha256, first.ca_fingerprint_sha256);
    let [new_ca_cert, new_ca_key, new_server_cert, new_server_key] = contents(&second)?;
    assert_eq!((new_ca_cert, new_ca_key), (ca_cert, ca_key));
    assert_ne!(new_server_cert, server_cert);
    assert_ne!(new_server_key, server_key);
    assert_eq!(mode(&second.key_path)?, 0o600);
    assert_eq!(mode(&second.cert_path)?, 0o644);
    let chain = certificates(&second.cert_path)?;
    verify_with_webpki(&second, "gateway.plant.example", start()?)?;
    verify_with_webpki(&second, "10.1.2.3", start()?)?;
    verify_with_webpki(&second, "isthmus-box", start()?)?;
    assert_eq!(chain.len(), 2);
    // The new set is reused next time.
    let third = provision_tls(&state, &more_hosts, start()?)?;
    assert_eq!(third.outcome, ProvisionOutcome::Reused);
    Ok(())
}

#[test]
fn the_server_certificate_is_renewed_within_the_renewal_margin() -> TestResult {
    let (_scratch, state) = new_state()?;
    let first = provision_tls(&state, &hosts(), start()?)?;
    let later = start()? + Duration::days(360);
    let second = provision_tls(&state, &hosts(), later)?;
    assert_eq!(second.outcome, ProvisionOutcome::ServerCertRenewed);
    assert_eq!(
        second.reason,
        Some(RenewalReason::ServerCert(ServerCertProblem::ExpiresSoon {
            not_after: first.server_cert_not_after
        }))
    );
    assert_eq!(second.ca_fingerprint_sha256, first.ca_fingerprint_sha256);
    assert_eq!(
        second.server_cert_not_after,
        later + Duration::days(SERVER_CERT_VALIDITY_DAYS)
    );
    verify_with_webpki(&second, "localhost", later)?;
    let third = provision_tls(&state, &hosts(), later)?;
    assert_eq!(third.outcome, ProvisionOutcome::Reused);
    // Long expired: renewed too.
    let much_later = start()? + Duration::days(1000);
    let fourth = provision_tls(&state, &hosts(), much_later)?;
    assert_eq!(fourth.outcome, ProvisionOutcome::ServerCertRenewed);
    assert!(matches!(
        fourth.reason,
        Some(RenewalReason::ServerCert(ServerCertProblem::Expired { .. }))
    ));
    Ok(())
}

#[test]
fn the_server_certificate_never_outlives_the_ca() -> TestResult {
    let (_scratch, state) = new_state()?;
    let first = provision_tls(&state, &hosts(), start()?)?;
    let ca_not_after = start()? + Duration::days(CA_VALIDITY_DAYS);
    let late = ca_not_after - Duration::days(100);
    let second = provision_tls(&state, &hosts(), late)?;
    assert_eq!(second.outcome, ProvisionOutcome::ServerCertRenewed);
    assert_eq!(second.ca_fingerprint_sha256, first.ca_fingerprint_sha256);
    assert_eq!(second.server_cert_not_after, ca_not_after);
    Ok(())
}

#[test]
fn an_expiring_ca_is_replaced() -> TestResult {
    let (_scratch, state) = new_state()?;
    let first = provision_tls(&state, &hosts(), start()?)?;
    let ca_not_after = start()? + Duration::days(CA_VALIDITY_DAYS);
    let second = provision_tls(&state, &hosts(), ca_not_after - Duration::days(10))?;
    assert_eq!(second.outcome, ProvisionOutcome::CaReplaced);
    assert_eq!(
        second.reason,
        Some(RenewalReason::Ca(CaProblem::ExpiresSoon {
            not_after: ca_not_after
        }))
    );
    assert_ne!(second.ca_fingerprint_sha256, first.ca_fingerprint_sha256);
    let second_ca_not_after = ca_not_after - Duration::days(10) + Duration::days(CA_VALIDITY_DAYS);
    let third = provision_tls(&state, &hosts(), second_ca_not_after + Duration::days(1))?;
    assert_eq!(third.outcome, ProvisionOutcome::CaReplaced);
    assert_eq!(
        third.reason,
        Some(RenewalReason::Ca(CaProblem::Expired {
            not_after: second_ca_not_after
        }))
    );
    Ok(())
}

#[test]
fn a_mismatched_ca_key_replaces_the_ca_and_keeps_the_previous_files() -> TestResult {
    let (_scratch, state) = new_state()?;
    let first = provision_tls(&state, &hosts(), start()?)?;
    let [old_ca_cert, _, _, _] = contents(&first)?;
    let stranger = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?.serialize_pem();
    fs::write(&first.ca_key_path, &stranger)?;
    let second = provision_tls(&state, &hosts(), start()?)?;
    assert_eq!(second.outcome, ProvisionOutcome::CaReplaced);
    assert_eq!(
        second.reason,
        Some(RenewalReason::Ca(CaProblem::KeyMismatch))
    );
    assert_ne!(second.ca_fingerprint_sha256, first.ca_fingerprint_sha256);
    let directory = state.tls_dir();
    assert_eq!(
        fs::read_to_string(directory.join("ca-key.pem.old"))?,
        stranger
    );
    assert_eq!(fs::read(directory.join("ca.pem.old"))?, old_ca_cert);
    assert_eq!(mode(&directory.join("ca-key.pem.old"))?, 0o600);
    assert_eq!(mode(&second.ca_key_path)?, 0o600);
    verify_with_webpki(&second, "localhost", start()?)?;
    let third = provision_tls(&state, &hosts(), start()?)?;
    assert_eq!(third.outcome, ProvisionOutcome::Reused);
    assert_eq!(third.ca_fingerprint_sha256, second.ca_fingerprint_sha256);
    Ok(())
}

#[test]
fn a_missing_or_garbled_ca_file_replaces_the_ca() -> TestResult {
    let (_scratch, state) = new_state()?;
    let first = provision_tls(&state, &hosts(), start()?)?;
    fs::remove_file(&first.ca_key_path)?;
    let second = provision_tls(&state, &hosts(), start()?)?;
    assert_eq!(
        second.reason,
        Some(RenewalReason::Ca(CaProblem::KeyMissing))
    );

    fs::remove_file(&second.ca_cert_path)?;
    let third = provision_tls(&state, &hosts(), start()?)?;
    assert_eq!(
        third.reason,
        Some(RenewalReason::Ca(CaProblem::CertificateMissing))
    );

    fs::write(
        &third.ca_cert_path,
        b"-----BEGIN CERTIFICATE-----\nnot base64\n",
    )?;
    let fourth = provision_tls(&state, &hosts(), start()?)?;
    assert_eq!(fourth.outcome, ProvisionOutcome::CaReplaced);
    assert!(matches!(
        fourth.reason,
        Some(RenewalReason::Ca(CaProblem::CertificateUnparseable(_)))
    ));

    fs::write(&fourth.ca_key_path, b"garbage")?;
    let fifth = provision_tls(&state, &hosts(), start()?)?;
    assert!(matches!(
        fifth.reason,
        Some(RenewalReason::Ca(CaProblem::KeyUnparseable(_)))
    ));
    Ok(())
}

#[test]
fn a_broken_server_certificate_or_key_is_reissued_from_the_same_ca() -> TestResult {
    let (_scratch, state) = new_state()?;
    let first = provision_tls(&state, &hosts(), start()?)?;

    fs::remove_file(&first.key_path)?;
    let second = provision_tls(&state, &hosts(), start()?)?;
    assert_eq!(
        second.reason,
        Some(RenewalReason::ServerCert(ServerCertProblem::KeyMissing))
    );

    fs::write(&second.cert_path, b"")?;
    let third = provision_tls(&state, &hosts(), start()?)?;
    assert!(matches!(
        third.reason,
        Some(RenewalReason::ServerCert(
            ServerCertProblem::CertificateUnparseable(_)
        ))
    ));

    let stranger = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?.serialize_pem();
    fs::write(&third.key_path, stranger)?;
    let fourth = provision_tls(&state, &hosts(), start()?)?;
    assert_eq!(
        fourth.reason,
        Some(RenewalReason::ServerCert(ServerCertProblem::KeyMismatch))
    );

    // A chain without the CA certificate after the server certificate.
    let leaf = fs::read_to_string(&fourth.cert_path)?;
    let leaf_only = leaf
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap_or_default()
        .to_owned();
    fs::write(&fourth.cert_path, leaf_only)?;
    let fifth = provision_tls(&state, &hosts(), start()?)?;
    assert_eq!(
        fifth.reason,
        Some(RenewalReason::ServerCert(ServerCertProblem::ChainOutdated))
    );
    for provisioned in [&second, &third, &fourth, &fifth] {
        assert_eq!(provisioned.outcome, ProvisionOutcome::ServerCertRenewed);
        assert_eq!(
            provisioned.ca_fingerprint_sha256,
            first.ca_fingerprint_sha256
        );
    }
    Ok(())
}

#[test]
fn a_server_certificate_without_authority_key_identifier_is_reissued() -> TestResult {
    let (_scratch, state) = new_state()?;
    let first = provision_tls(&state, &hosts(), start()?)?;
    let ca_pem = fs::read_to_string(&first.ca_cert_path)?;
    let ca_key = KeyPair::from_pem(&fs::read_to_string(&first.ca_key_path)?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(hosts())?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = start()? - Duration::hours(1);
    params.not_after = start()? + Duration::days(365);
    let lax = params.signed_by(&key, &issuer)?;
    fs::write(&first.cert_path, format!("{}{ca_pem}", lax.pem()))?;
    fs::write(&first.key_path, key.serialize_pem())?;

    let second = provision_tls(&state, &hosts(), start()?)?;
    assert_eq!(second.outcome, ProvisionOutcome::ServerCertRenewed);
    assert_eq!(
        second.reason,
        Some(RenewalReason::ServerCert(
            ServerCertProblem::ProfileOutdated("authorityKeyIdentifier is missing".to_owned())
        ))
    );
    Ok(())
}

#[test]
fn a_clock_behind_the_ca_keeps_the_ca() -> TestResult {
    let (_scratch, state) = new_state()?;
    let first = provision_tls(&state, &hosts(), start()?)?;
    let behind = start()? - Duration::days(30);
    let second = provision_tls(&state, &hosts(), behind)?;
    assert_eq!(second.outcome, ProvisionOutcome::ServerCertRenewed);
    assert!(matches!(
        second.reason,
        Some(RenewalReason::ServerCert(
            ServerCertProblem::NotYetValid { .. }
        ))
    ));
    assert_eq!(second.ca_fingerprint_sha256, first.ca_fingerprint_sha256);
    Ok(())
}

#[test]
fn reuse_tightens_loose_key_and_directory_modes() -> TestResult {
    let (_scratch, state) = new_state()?;
    let first = provision_tls(&state, &hosts(), start()?)?;
    fs::set_permissions(&first.ca_key_path, fs::Permissions::from_mode(0o644))?;
    fs::set_permissions(&first.key_path, fs::Permissions::from_mode(0o640))?;
    fs::set_permissions(state.tls_dir(), fs::Permissions::from_mode(0o755))?;
    let second = provision_tls(&state, &hosts(), start()?)?;
    assert_eq!(second.outcome, ProvisionOutcome::Reused);
    assert_eq!(mode(&second.ca_key_path)?, 0o600);
    assert_eq!(mode(&second.key_path)?, 0o600);
    assert_eq!(mode(&state.tls_dir())?, 0o700);
    Ok(())
}

#[test]
fn errors_name_the_file_and_the_problem() -> TestResult {
    let (_scratch, state) = new_state()?;
    let first = provision_tls(&state, &hosts(), start()?)?;
    fs::remove_file(&first.cert_path)?;
    fs::create_dir(&first.cert_path)?;
    let message = provision_tls(&state, &hosts(), start()?)
        .err()
        .map(|error| error.to_string());
    assert_eq!(
        message,
        Some(format!(
            "reading {}: is a directory",
            first.cert_path.display()
        ))
    );

    let (_other_scratch, other_state) = new_state()?;
    fs::write(other_state.tls_dir(), b"")?;
    let message = provision_tls(&other_state, &hosts(), start()?)
        .err()
        .map(|error| error.to_string());
    assert_eq!(
        message,
        Some(format!(
            "{} exists and is not a directory",
            other_state.tls_dir().display()
        ))
    );
    Ok(())
}

#[test]
fn hosts_are_validated_and_normalized() -> TestResult {
    let (_scratch, state) = new_state()?;
    let message = |hosts: &[&str]| {
        let hosts: Vec<String> = hosts.iter().map(|host| (*host).to_owned()).collect();
        provision_tls(&state, &hosts, OffsetDateTime::UNIX_EPOCH)
            .err()
            .map(|error| error.to_string())
    };
    assert_eq!(
        message(&["localhost", "bad host"]),
        Some("host `bad host` is neither an IP address nor a valid DNS name".to_owned())
    );
    assert_eq!(
        message(&["*.example.com"]),
        Some("host `*.example.com` is neither an IP address nor a valid DNS name".to_owned())
    );
    assert_eq!(
        message(&[]),
        Some("no hosts to put in the server certificate".to_owned())
    );
    assert!(
        !state.tls_dir().exists(),
        "nothing is created for invalid hosts"
    );

    let raw = [
        " Gateway.Example. ",
        "[::1]",
        "::0001",
        "127.0.0.1",
        "gateway.example",
    ]
    .map(str::to_owned);
    let normalized: Vec<String> = normalize_hosts(&raw)?
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(normalized, ["gateway.example", "::1", "127.0.0.1"]);
    assert_eq!(host_label(&normalize_hosts(&hosts())?), "isthmus-box");
    assert_eq!(
        host_label(&normalize_hosts(&[
            "localhost".to_owned(),
            "::1".to_owned()
        ])?),
        "localhost"
    );
    assert_eq!(
        host_label(&normalize_hosts(&["10.0.0.1".to_owned()])?),
        "10.0.0.1"
    );
    Ok(())
}

#[test]
fn the_ca_certificate_has_the_strict_ca_profile() -> TestResult {
    let (_scratch, state) = new_state()?;
    let tls = provision_tls(&state, &hosts(), start()?)?;
    let der = only(&certificates(&tls.ca_cert_path)?)?;
    let (_, ca) = x509_parser::parse_x509_certificate(&der)?;
    assert_eq!(ca.version(), X509Version::V3);
    assert_eq!(ca.subject().as_raw(), ca.issuer().as_raw());
    let common_names: Vec<&str> = ca
        .subject()
        .iter_common_name()
        .map(|name| name.as_str())
        .collect::<Result<_, _>>()?;
    assert_eq!(common_names, ["Isthmus local CA isthmus-box"]);
    let organizations: Vec<&str> = ca
        .subject()
        .iter_organization()
        .map(|name| name.as_str())
        .collect::<Result<_, _>>()?;
    assert_eq!(organizations, ["Isthmus"]);

    let constraints = ca.basic_constraints()?.ok_or("no basicConstraints")?;
    assert!(constraints.critical);
    assert!(constraints.value.ca);
    assert_eq!(constraints.value.path_len_constraint, Some(0));
    let usage = ca.key_usage()?.ok_or("no keyUsage")?;
    assert!(usage.critical);
    assert!(usage.value.key_cert_sign());
    assert!(usage.value.crl_sign());
    assert!(usage.value.digital_signature());
    let subject_key_id = subject_key_identifier(&ca).ok_or("no subjectKeyIdentifier")?;
    assert_eq!(subject_key_id.len(), 20);
    assert_eq!(authority_key_identifier(&ca), Some(subject_key_id));
    assert!(ca.extended_key_usage()?.is_none());

    assert_eq!(
        ca.validity().not_before.timestamp(),
        (start()? - Duration::hours(1)).unix_timestamp()
    );
    assert_eq!(
        ca.validity().not_after.timestamp(),
        (start()? + Duration::days(3650)).unix_timestamp()
    );
    assert_serial_is_random_and_positive(ca.raw_serial());
    assert_eq!(
        ca.signature_algorithm.algorithm,
        x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
    );
    Ok(())
}

#[test]
fn the_server_certificate_has_the_strict_server_profile() -> TestResult {
    let (_scratch, state) = new_state()?;
    let tls = provision_tls(&state, &hosts(), start()?)?;
    let chain = certificates(&tls.cert_path)?;
    let ca_der = only(&certificates(&tls.ca_cert_path)?)?;
    assert_eq!(
        chain.len(),
        2,
        "server certificate, then the CA certificate"
    );
    assert_eq!(chain[1], ca_der);
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)?;
    let (_, server) = x509_parser::parse_x509_certificate(&chain[0])?;

    assert_eq!(server.version(), X509Version::V3);
    assert_eq!(server.issuer().as_raw(), ca.subject().as_raw());
    let constraints = server.basic_constraints()?.ok_or("no basicConstraints")?;
    assert!(!constraints.value.ca);
    let usage = server.key_usage()?.ok_or("no keyUsage")?;
    assert!(usage.critical);
    assert!(usage.value.digital_signature());
    assert!(!usage.value.key_cert_sign());
    let extended_usage = server.extended_key_usage()?.ok_or("no extendedKeyUsage")?;
    assert!(extended_usage.value.server_auth);

    let names = server
        .subject_alternative_name()?
        .ok_or("no subjectAltName")?;
    assert!(!names.critical, "the subject is not empty");
    assert_eq!(
        names.value.general_names,
        [
            GeneralName::DNSName("localhost"),
            GeneralName::IPAddress(&[127, 0, 0, 1]),
            GeneralName::IPAddress(&std::net::Ipv6Addr::LOCALHOST.octets()),
            GeneralName::DNSName("isthmus-box"),
        ]
    );

    let subject_key_id = subject_key_identifier(&server).ok_or("no subjectKeyIdentifier")?;
    let ca_subject_key_id = subject_key_identifier(&ca).ok_or("no CA subjectKeyIdentifier")?;
    assert_ne!(subject_key_id, ca_subject_key_id);
    assert_eq!(authority_key_identifier(&server), Some(ca_subject_key_id));

    assert_eq!(
        server.validity().not_before.timestamp(),
        (start()? - Duration::hours(1)).unix_timestamp()
    );
    assert_eq!(
        server.validity().not_after.timestamp(),
        (start()? + Duration::days(365)).unix_timestamp()
    );
    assert_serial_is_random_and_positive(server.raw_serial());
    assert_ne!(server.raw_serial(), ca.raw_serial());
    Ok(())
}

fn assert_serial_is_random_and_positive(serial: &[u8]) {
    assert_eq!(serial.len(), SERIAL_NUMBER_BYTES);
    assert_eq!(serial[0] & 0x80, 0, "positive");
    assert_ne!(serial[0], 0, "minimally encoded");
}

/// Verifies the provisioned chain as a rustls client trusting only `ca.pem` would.
fn verify_with_webpki(
    tls: &ProvisionedTls,
    server_name: &str,
    at: OffsetDateTime,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut roots = RootCertStore::empty();
    roots.add(only(&certificates(&tls.ca_cert_path)?)?)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()?;
    let chain = certificates(&tls.cert_path)?;
    let (leaf, intermediates) = chain.split_first().ok_or("empty chain")?;
    let seconds = u64::try_from(at.unix_timestamp())?;
    verifier.verify_server_cert(
        leaf,
        intermediates,
        &ServerName::try_from(server_name)?.to_owned(),
        &[],
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(seconds)),
    )?;
    Ok(())
}

#[test]
fn the_chain_verifies_with_webpki_for_localhost_and_loopback_addresses() -> TestResult {
    let (_scratch, state) = new_state()?;
    let tls = provision_tls(&state, &hosts(), start()?)?;
    for name in ["localhost", "127.0.0.1", "::1", "isthmus-box"] {
        verify_with_webpki(&tls, name, start()?)?;
    }
    assert!(matches!(
        ServerName::try_from("127.0.0.1"),
        Ok(ServerName::IpAddress(_))
    ));

    let wrong_name = verify_with_webpki(&tls, "elsewhere.example", start()?)
        .err()
        .and_then(|error| error.downcast::<rustls::Error>().ok());
    assert!(matches!(
        wrong_name.as_deref(),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        ))
    ));
    let too_late = verify_with_webpki(&tls, "localhost", start()? + Duration::days(366))
        .err()
        .and_then(|error| error.downcast::<rustls::Error>().ok());
    assert!(matches!(
        too_late.as_deref(),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. }
        ))
    ));
    Ok(())
}

#[test]
fn fingerprints_are_uppercase_hex_pairs_joined_by_colons() {
    let fingerprint = fingerprint_sha256(b"abc");
    assert_eq!(
        fingerprint,
        "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
    );
}

#[test]
fn parse_host_name_skips_blanks_comments_and_the_unset_name() {
    assert_eq!(
        parse_host_name("isthmus-01\n"),
        Some("isthmus-01".to_owned())
    );
    assert_eq!(
        parse_host_name("# managed\n\n  box  \n"),
        Some("box".to_owned())
    );
    assert_eq!(parse_host_name("(none)\n"), None);
    assert_eq!(parse_host_name(""), None);
}

#[test]
fn default_hosts_start_with_the_loopback_names() {
    let hosts = default_tls_hosts();
    assert_eq!(hosts[..3], ["localhost", "127.0.0.1", "::1"]);
    assert!(normalize_hosts(&hosts).is_ok());
}

#[test]
fn errors_can_cross_threads_into_anyhow() {
    fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}
    assert_error::<ProvisionError>();
    assert_error::<crate::StateError>();
}
