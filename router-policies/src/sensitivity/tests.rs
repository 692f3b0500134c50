use expect_test::{Expect, expect};
use proptest::prelude::*;

use super::{
    DictionaryConfig, EntityType, PatternConfig, RecognizerConfig, Recognizers, SensitivityError,
};

/// Scans each line of `cases` on its own and prints the line, then each finding as
/// `entity `value` confidence`, or `-` when there is none.
fn check_with(recognizers: &Recognizers, cases: &str, expect: Expect) {
    let mut actual = String::new();
    for line in cases.lines().map(str::trim).filter(|line| !line.is_empty()) {
        let findings = recognizers.scan(line);
        actual.push_str(&visible(line));
        actual.push('\n');
        if findings.is_empty() {
            actual.push_str("    -\n");
        }
        for finding in findings {
            actual.push_str(&format!(
                "    {} `{}` {}\n",
                finding.entity,
                visible(&line[finding.span.clone()]),
                finding.confidence
            ));
        }
    }
    expect.assert_eq(&actual);
}

/// `text` with invisible characters and spaces other than ASCII's written as `\u{...}`.
fn visible(text: &str) -> String {
    text.chars()
        .map(|character| {
            let hidden = !character.is_ascii()
                && (character.is_whitespace() || character.escape_debug().count() > 1);
            if hidden {
                format!("\\u{{{:x}}}", u32::from(character))
            } else {
                character.to_string()
            }
        })
        .collect()
}

fn check(cases: &str, expect: Expect) {
    check_with(&Recognizers::default(), cases, expect);
}

#[test]
fn card_numbers_pass_luhn_issuer_and_length() {
    check(
        r#"
        card 4111 1111 1111 1111 exp 12/27
        4111-1111-1111-1111
        4111111111111111
        amex 3782 822463 10005
        mastercard 5555555555554444, 2-series 2223003122003222
        discover 6011 0009 9013 9424 and jcb 3530111333300000
        diners 3056 930902 5904
        luhn-invalid 4111 1111 1111 1112
        unknown issuer 9111 1111 1111 1117
        visa with 15 digits 411111111111116
        all zeros 0000 0000 0000 0000
        mixed separators 4111 1111-1111 1111
        order ORD-4111111111111111
        4111 1111 1111 1111 2024 is a card then a year
        dotted 4111.1111.1111.1111, not 4111.1111.1111.1112 or 1.4111.1111.1111.1111
        "#,
        expect![[r#"
            card 4111 1111 1111 1111 exp 12/27
                credit_card `4111 1111 1111 1111` 0.95
            4111-1111-1111-1111
                credit_card `4111-1111-1111-1111` 0.95
            4111111111111111
                credit_card `4111111111111111` 0.95
            amex 3782 822463 10005
                credit_card `3782 822463 10005` 0.95
            mastercard 5555555555554444, 2-series 2223003122003222
                credit_card `5555555555554444` 0.95
                credit_card `2223003122003222` 0.95
            discover 6011 0009 9013 9424 and jcb 3530111333300000
                credit_card `6011 0009 9013 9424` 0.95
                credit_card `3530111333300000` 0.95
            diners 3056 930902 5904
                credit_card `3056 930902 5904` 0.95
            luhn-invalid 4111 1111 1111 1112
                -
            unknown issuer 9111 1111 1111 1117
                -
            visa with 15 digits 411111111111116
                -
            all zeros 0000 0000 0000 0000
                -
            mixed separators 4111 1111-1111 1111
                -
            order ORD-4111111111111111
                -
            4111 1111 1111 1111 2024 is a card then a year
                credit_card `4111 1111 1111 1111` 0.95
            dotted 4111.1111.1111.1111, not 4111.1111.1111.1112 or 1.4111.1111.1111.1111
                credit_card `4111.1111.1111.1111` 0.95
        "#]],
    );
}

#[test]
fn card_numbers_and_ibans_joined_into_paths_names_and_longer_tokens_are_found() {
    check(
        r#"
        GET /accounts/DE89370400440532013000/balance and acct_GB82WEST12345698765432
        statement-FR1420041010050500013M02606.pdf
        /accounts/DE89370400440532013001/balance fails mod-97, /x/DE8937040044053201300/y is short
        GET https://pay.example/cards/4539148803436467/charge
        cards/4539148803436467 and receipt_4539148803436467.pdf
        4539148803436467/0927 and 4539148803436467/12 and 4539148803436467-visa
        cards/4539148803436468/charge fails Luhn, order-2024-4539148803436467 is an identifier, acct4539148803436467 and 4539148803436467visa touch letters
        [0.4539148803436467, 0.5555555555554444]
        4539148803436467.25
        https://x.example/status/1790123456789012345 and build 20240115123456789
        "#,
        expect![[r#"
            GET /accounts/DE89370400440532013000/balance and acct_GB82WEST12345698765432
                iban `DE89370400440532013000` 0.95
                iban `GB82WEST12345698765432` 0.95
            statement-FR1420041010050500013M02606.pdf
                iban `FR1420041010050500013M02606` 0.95
            /accounts/DE89370400440532013001/balance fails mod-97, /x/DE8937040044053201300/y is short
                -
            GET https://pay.example/cards/4539148803436467/charge
                credit_card `4539148803436467` 0.95
            cards/4539148803436467 and receipt_4539148803436467.pdf
                credit_card `4539148803436467` 0.95
                credit_card `4539148803436467` 0.95
            4539148803436467/0927 and 4539148803436467/12 and 4539148803436467-visa
                credit_card `4539148803436467` 0.95
                credit_card `4539148803436467` 0.95
                credit_card `4539148803436467` 0.95
            cards/4539148803436468/charge fails Luhn, order-2024-4539148803436467 is an identifier, acct4539148803436467 and 4539148803436467visa touch letters
                -
            [0.4539148803436467, 0.5555555555554444]
                -
            4539148803436467.25
                -
            https://x.example/status/1790123456789012345 and build 20240115123456789
                -
        "#]],
    );
}

#[test]
fn ibans_pass_mod_97_and_country_length() {
    check(
        r#"
        pay to DE89 3704 0044 0532 0130 00 today
        DE89370400440532013000
        GB29 NWBK 6016 1331 9268 19
        FR1420041010050500013M02606
        NL91ABNA0417164300.
        wrong check digits DE88 3704 0044 0532 0130 00
        wrong length DE89 3704 0044 0532 0130 0
        unknown country QQ89 3704 0044 0532 0130 00
        DE89 3704 0044 0532 0130 00 99 trailing group
        typed in lower case de89 3704 0044 0532 0130 00 or gb29nwbk60161331926819
        with hyphens DE89-3704-0044-0532-0130-00 or dots DE89.3704.0044.0532.0130.00
        mixed joints DE89-3704 0044 0532 0130 00
        lower case, wrong check digits de88370400440532013000
        "#,
        expect![[r#"
            pay to DE89 3704 0044 0532 0130 00 today
                iban `DE89 3704 0044 0532 0130 00` 0.95
            DE89370400440532013000
                iban `DE89370400440532013000` 0.95
            GB29 NWBK 6016 1331 9268 19
                iban `GB29 NWBK 6016 1331 9268 19` 0.95
            FR1420041010050500013M02606
                iban `FR1420041010050500013M02606` 0.95
            NL91ABNA0417164300.
                iban `NL91ABNA0417164300` 0.95
            wrong check digits DE88 3704 0044 0532 0130 00
                -
            wrong length DE89 3704 0044 0532 0130 0
                -
            unknown country QQ89 3704 0044 0532 0130 00
                -
            DE89 3704 0044 0532 0130 00 99 trailing group
                iban `DE89 3704 0044 0532 0130 00` 0.95
            typed in lower case de89 3704 0044 0532 0130 00 or gb29nwbk60161331926819
                iban `de89 3704 0044 0532 0130 00` 0.95
                iban `gb29nwbk60161331926819` 0.95
            with hyphens DE89-3704-0044-0532-0130-00 or dots DE89.3704.0044.0532.0130.00
                iban `DE89-3704-0044-0532-0130-00` 0.95
                iban `DE89.3704.0044.0532.0130.00` 0.95
            mixed joints DE89-3704 0044 0532 0130 00
                -
            lower case, wrong check digits de88370400440532013000
                -
        "#]],
    );
}

#[test]
fn us_ssns_exclude_invalid_ranges_and_samples() {
    check(
        r#"
        ssn 536-22-1234
        536 22 1234
        SSN: 536221234
        536221234 without context
        area 000-12-3456, 666-12-3456, 912-34-5678
        group 536-00-1234, serial 536-22-0000
        samples 078-05-1120, 219-09-9999, 123-45-6789
        dotted 536.22.1234, not rev 536.22.1234 or 1.536.22.1234
        "#,
        expect![[r#"
            ssn 536-22-1234
                us_ssn `536-22-1234` 0.85
            536 22 1234
                us_ssn `536 22 1234` 0.65
            SSN: 536221234
                us_ssn `536221234` 0.75
            536221234 without context
                -
            area 000-12-3456, 666-12-3456, 912-34-5678
                -
            group 536-00-1234, serial 536-22-0000
                -
            samples 078-05-1120, 219-09-9999, 123-45-6789
                -
            dotted 536.22.1234, not rev 536.22.1234 or 1.536.22.1234
                us_ssn `536.22.1234` 0.65
        "#]],
    );
}

#[test]
fn emails_need_a_local_part_and_a_domain_with_a_tld() {
    check(
        r#"
        write to jane.doe+news@mail.example.co.uk.
        <j_o-e%x@sub-domain.example.org>
        user@localhost, @mention, a@b.c, x@1.2.3.4
        double..dot@example.com
        mailto:bob@example.com
        other scripts jürgen.müller@bücher.de, иван@пример.рф; quoted “jane@contoso.com” café@menu
        spelled jane.doe at contoso dot com, not I work at contoso.com
        J.SMITH AT MAIL.CONTOSO DOT CO DOT UK, but not we met at the dot or 5 dot 99 at most or at the dot in town
        look at this dot com, aim at the dot org crowd, laugh at my dot net skills
        "#,
        expect![[r#"
            write to jane.doe+news@mail.example.co.uk.
                email `jane.doe+news@mail.example.co.uk` 0.9
            <j_o-e%x@sub-domain.example.org>
                email `j_o-e%x@sub-domain.example.org` 0.9
            user@localhost, @mention, a@b.c, x@1.2.3.4
                ip_address `1.2.3.4` 0.85
            double..dot@example.com
                -
            mailto:bob@example.com
                email `bob@example.com` 0.9
            other scripts jürgen.müller@bücher.de, иван@пример.рф; quoted “jane@contoso.com” café@menu
                email `jürgen.müller@bücher.de` 0.9
                email `иван@пример.рф` 0.9
                email `jane@contoso.com` 0.9
            spelled jane.doe at contoso dot com, not I work at contoso.com
                email `jane.doe at contoso dot com` 0.9
            J.SMITH AT MAIL.CONTOSO DOT CO DOT UK, but not we met at the dot or 5 dot 99 at most or at the dot in town
                email `J.SMITH AT MAIL.CONTOSO DOT CO DOT UK` 0.9
            look at this dot com, aim at the dot org crowd, laugh at my dot net skills
                -
        "#]],
    );
}

#[test]
fn phone_numbers_need_enough_digits_and_a_shape() {
    check(
        r#"
        call +44 20 7946 0958 or +1-555-123-4567
        +49 (0)30 1234 5678
        +33 1 23 45 67 89
        (555) 234-5678 and (020) 7946 0958
        555-234-5678, 555.234.5678, 1-800-555-0199
        020 7946 0958, 01 23 45 67 89
        phone 02079460958
        02079460958 without context
        +20% more, +1 555 01, up 3.5%
        order ORD-2024-000123 shipped
        released 2024-01-15 at 10:30:45
        version 1.2.3, ticket 12345, 1 234 567 units
        dashed 155-234-5678 but spaced 155 234 5678
        Phone: 439 4166, mobile 730 064 218, (73) 4746-3459, (07700)553419, 07700 316 475
        hotel 730 064 218, call on 2024-01-15, call a taxi to 9335 2733 Jasper Ave
        Suite 014 74830 1324, Serial 0923-2719-3745, \nPhone:\n439 4166\n, 723 813 266 office
        041 034 3579-Office, (632)135-8004x010-Fax, reach me on 61 60 34
        ext 555-234-5678x1234, (555)234-5678 ext. 12, +1-555-234-5678 x99, 001-555-234-5678
        "#,
        expect![[r#"
            call +44 20 7946 0958 or +1-555-123-4567
                phone `+44 20 7946 0958` 0.8
                phone `+1-555-123-4567` 0.8
            +49 (0)30 1234 5678
                phone `+49 (0)30 1234 5678` 0.8
            +33 1 23 45 67 89
                phone `+33 1 23 45 67 89` 0.8
            (555) 234-5678 and (020) 7946 0958
                phone `(555) 234-5678` 0.7
                phone `(020) 7946 0958` 0.6
            555-234-5678, 555.234.5678, 1-800-555-0199
                phone `555-234-5678` 0.7
                phone `555.234.5678` 0.7
                phone `1-800-555-0199` 0.7
            020 7946 0958, 01 23 45 67 89
                phone `020 7946 0958` 0.6
                phone `01 23 45 67 89` 0.6
            phone 02079460958
                phone `02079460958` 0.6
            02079460958 without context
                -
            +20% more, +1 555 01, up 3.5%
                -
            order ORD-2024-000123 shipped
                -
            released 2024-01-15 at 10:30:45
                -
            version 1.2.3, ticket 12345, 1 234 567 units
                -
            dashed 155-234-5678 but spaced 155 234 5678
                phone `155-234-5678` 0.7
            Phone: 439 4166, mobile 730 064 218, (73) 4746-3459, (07700)553419, 07700 316 475
                phone `439 4166` 0.6
                phone `730 064 218` 0.6
                phone `(73) 4746-3459` 0.6
                phone `(07700)553419` 0.6
                phone `07700 316 475` 0.6
            hotel 730 064 218, call on 2024-01-15, call a taxi to 9335 2733 Jasper Ave
                -
            Suite 014 74830 1324, Serial 0923-2719-3745, \nPhone:\n439 4166\n, 723 813 266 office
                phone `439 4166` 0.6
                phone `723 813 266` 0.6
            041 034 3579-Office, (632)135-8004x010-Fax, reach me on 61 60 34
                phone `041 034 3579` 0.6
                phone `(632)135-8004x010` 0.6
                phone `61 60 34` 0.6
            ext 555-234-5678x1234, (555)234-5678 ext. 12, +1-555-234-5678 x99, 001-555-234-5678
                phone `555-234-5678x1234` 0.7
                phone `(555)234-5678 ext. 12` 0.7
                phone `+1-555-234-5678 x99` 0.8
                phone `001-555-234-5678` 0.7
        "#]],
    );
}

#[test]
fn phone_numbers_in_national_formats_stand_alone() {
    check(
        r#"
        my registered 9691 2587. my registered 444 7846, or 555-1234
        958 08 922 and 79 300 85 25 and 21 259 240 8721 and 412 34 56 78
        26 943046 or 40-95-78-17
        030 70 25 13, 031-035-132, 08-2349842, 039742 34 87
        "my registered 9577 9424" (449 8068) \n958 08 922
        123 456 789 and 12 345 678 people, 1 234 567 units, 3 123 456 sold
        samples 078-05-1120, 000-12-3456, 078 05 1120
        dates 2024 01 15, 15 01 2024, 01 02 2024 10 30, at 10 30 45, 12-05-2023
        years 2019 2020, 1999-2000, shifts 0900 1700, 0900-1730, 1030 1145
        ranges 500-1000 users, 120-1250 ms, 3456-3478, round 1500 2000, 100 20 30 40
        prices $555 1234, -555 1234, #555 1234, 555 1234%, up 555.1234
        lists 10 20 30 40, 12-15-18, scores 21 18 15, 87 47 98
        isbn 978-0-306-40615-7, 0-306-40615-2, 978 0 306 40615 7
        versions 1.2.3 and 10.20.30, order 555-1234, id 958 08 922
        serial 1234-5678-9012, 1234 5678 9012 3456, 555 1234-5678, 555 1234.5
        call a taxi to 9335 2733 Jasper Ave, 40169 14 rue Marie
        at 05640 1075 Barlow Street, zip 05640-1075, 819 3441 rue Saint-Antoine
        Hanwha Q CELLS Co. Ltd. 40169 14 rue Marie, 958 08 922 main street, 555 1234 via WhatsApp
        data [474 5498], x = 474 5498, {9691 2587}, 12  474 5498, 474 5498  17, 999-1500, 250-1200
        Tel. 030/901820, Telefon 089/12345678, Handy 0151/23456789, celular 55 1234 5678
        ratio 030/901820, files 0815/4711 and 12/2024
        "#,
        expect![[r#"
            my registered 9691 2587. my registered 444 7846, or 555-1234
                phone `9691 2587` 0.5
                phone `444 7846` 0.5
                phone `555-1234` 0.5
            958 08 922 and 79 300 85 25 and 21 259 240 8721 and 412 34 56 78
                phone `958 08 922` 0.5
                phone `79 300 85 25` 0.5
                phone `21 259 240 8721` 0.5
                phone `412 34 56 78` 0.5
            26 943046 or 40-95-78-17
                phone `26 943046` 0.5
                phone `40-95-78-17` 0.5
            030 70 25 13, 031-035-132, 08-2349842, 039742 34 87
                phone `030 70 25 13` 0.6
                phone `031-035-132` 0.6
                phone `08-2349842` 0.6
                phone `039742 34 87` 0.6
            "my registered 9577 9424" (449 8068) \n958 08 922
                phone `9577 9424` 0.5
                phone `449 8068` 0.5
                phone `958 08 922` 0.5
            123 456 789 and 12 345 678 people, 1 234 567 units, 3 123 456 sold
                -
            samples 078-05-1120, 000-12-3456, 078 05 1120
                -
            dates 2024 01 15, 15 01 2024, 01 02 2024 10 30, at 10 30 45, 12-05-2023
                -
            years 2019 2020, 1999-2000, shifts 0900 1700, 0900-1730, 1030 1145
                -
            ranges 500-1000 users, 120-1250 ms, 3456-3478, round 1500 2000, 100 20 30 40
                -
            prices $555 1234, -555 1234, #555 1234, 555 1234%, up 555.1234
                -
            lists 10 20 30 40, 12-15-18, scores 21 18 15, 87 47 98
                -
            isbn 978-0-306-40615-7, 0-306-40615-2, 978 0 306 40615 7
                -
            versions 1.2.3 and 10.20.30, order 555-1234, id 958 08 922
                -
            serial 1234-5678-9012, 1234 5678 9012 3456, 555 1234-5678, 555 1234.5
                -
            call a taxi to 9335 2733 Jasper Ave, 40169 14 rue Marie
                -
            at 05640 1075 Barlow Street, zip 05640-1075, 819 3441 rue Saint-Antoine
                -
            Hanwha Q CELLS Co. Ltd. 40169 14 rue Marie, 958 08 922 main street, 555 1234 via WhatsApp
                phone `555 1234` 0.5
            data [474 5498], x = 474 5498, {9691 2587}, 12  474 5498, 474 5498  17, 999-1500, 250-1200
                -
            Tel. 030/901820, Telefon 089/12345678, Handy 0151/23456789, celular 55 1234 5678
                phone `030/901820` 0.6
                phone `089/12345678` 0.6
                phone `0151/23456789` 0.6
                phone `55 1234 5678` 0.6
            ratio 030/901820, files 0815/4711 and 12/2024
                -
        "#]],
    );
}

#[test]
fn ip_addresses_are_four_octets_or_ipv6_and_not_versions() {
    check(
        r#"
        host 192.168.1.20 port 10.0.0.1:8080 net 10.0.0.0/8
        see http://203.0.113.7/path
        version 1.2.3.4, v 10.0.0.1, release 2.0.1.3
        1.2.3, 1.2.3.4.5, 256.1.1.1, 01.2.3.4
        2001:0db8:85a3:0000:0000:8a2e:0370:7334
        fe80::1ff:fe23:4567:890a%eth0 and 2001:db8::1 and ::ffff:192.0.2.128
        ::1, std::vector, ab::cd, 12:30:45, 00:1a:2b:3c:4d:5e
        "#,
        expect![[r#"
            host 192.168.1.20 port 10.0.0.1:8080 net 10.0.0.0/8
                ip_address `192.168.1.20` 0.85
                ip_address `10.0.0.1` 0.85
                ip_address `10.0.0.0` 0.85
            see http://203.0.113.7/path
                ip_address `203.0.113.7` 0.85
            version 1.2.3.4, v 10.0.0.1, release 2.0.1.3
                -
            1.2.3, 1.2.3.4.5, 256.1.1.1, 01.2.3.4
                -
            2001:0db8:85a3:0000:0000:8a2e:0370:7334
                ip_address `2001:0db8:85a3:0000:0000:8a2e:0370:7334` 0.85
            fe80::1ff:fe23:4567:890a%eth0 and 2001:db8::1 and ::ffff:192.0.2.128
                ip_address `fe80::1ff:fe23:4567:890a` 0.85
                ip_address `2001:db8::1` 0.85
                ip_address `::ffff:192.0.2.128` 0.85
            ::1, std::vector, ab::cd, 12:30:45, 00:1a:2b:3c:4d:5e
                -
        "#]],
    );
}

#[test]
fn national_ids_pass_their_check_digits() {
    check(
        r#"
        NINO AB123456C and CE 12 34 56 A
        invalid prefixes DA123456C, GB123456A, QQ 12 34 56 C, suffix AB123456E
        DNI 12345678Z, 12345678-Z, NIE X1234567L, Y-1234567-X
        wrong letters 12345678A, X1234567A
        codice fiscale RSSMRA85T10A562S
        fiscal code with a wrong check RSSMRA85T10A562A
        NIR 1 84 12 76 451 089 46, 184127645108946
        NIR with a wrong key 184127645108947
        Steuer-ID 65929970489
        65929970489 alone
        BSN 111222333
        123456782 alone
        PESEL 44051401359 and PESEL: 02270803624
        PESEL 44051401358 has a wrong check digit
        44051401359 alone
        personnummer 811218-9876, Pnr 19811218-9876, samordningsnummer 701063-2391
        personnummer 811218-9875 fails Luhn
        811218-9876 alone
        "#,
        expect![[r#"
            NINO AB123456C and CE 12 34 56 A
                uk_nino `AB123456C` 0.8
                uk_nino `CE 12 34 56 A` 0.8
            invalid prefixes DA123456C, GB123456A, QQ 12 34 56 C, suffix AB123456E
                -
            DNI 12345678Z, 12345678-Z, NIE X1234567L, Y-1234567-X
                es_dni `12345678Z` 0.9
                es_dni `12345678-Z` 0.9
                es_dni `X1234567L` 0.9
                es_dni `Y-1234567-X` 0.9
            wrong letters 12345678A, X1234567A
                -
            codice fiscale RSSMRA85T10A562S
                it_fiscal_code `RSSMRA85T10A562S` 0.95
            fiscal code with a wrong check RSSMRA85T10A562A
                -
            NIR 1 84 12 76 451 089 46, 184127645108946
                fr_nir `1 84 12 76 451 089 46` 0.9
                fr_nir `184127645108946` 0.9
            NIR with a wrong key 184127645108947
                -
            Steuer-ID 65929970489
                de_tax_id `65929970489` 0.85
            65929970489 alone
                -
            BSN 111222333
                nl_bsn `111222333` 0.85
            123456782 alone
                -
            PESEL 44051401359 and PESEL: 02270803624
                pl_pesel `44051401359` 0.85
                pl_pesel `02270803624` 0.85
            PESEL 44051401358 has a wrong check digit
                -
            44051401359 alone
                -
            personnummer 811218-9876, Pnr 19811218-9876, samordningsnummer 701063-2391
                se_personal_number `811218-9876` 0.85
                se_personal_number `19811218-9876` 0.85
                se_personal_number `701063-2391` 0.85
            personnummer 811218-9875 fails Luhn
                -
            811218-9876 alone
                -
        "#]],
    );
}

#[test]
fn dates_of_birth_passports_and_record_numbers_need_their_labels() {
    check(
        r#"
        DOB: 1984-03-12, d.o.b. 12.03.1984, date of birth 03/12/84
        {"name": "Jane Roe", "dob": "1990-07-04", "birthDate": "1990-07-04"}
        born on 12 March 1984 in Leeds; born March 12, 1984; Born: Mar. 3, 1975
        birthday 12th of March, 1984 and geboren am 12.03.1984, Geburtsdatum 29.02.1988
        fecha de nacimiento: 12 de marzo de 1984, né le 12/03/1984, data di nascita 12 marzo 1984
        the meeting moved from 2024-03-12 to 12/03/2024, deadline 12 March 2024
        born on 31/02/1984 is no date; born in 1984; DOB 1984-13-01; born 1887-05-02
        reborn 12.03.1984, the firstborn on 1984-03-12, DOB 2024-03-12T10:00
        passport number X1234567, Passport No.: 123456789, Reisepass C01X00T47
        my passport is 533380006, passport ID: GB9876543, {"passportNumber": "K12345678"}
        {"patientId": "00482913", "patient_number": "4400123"}
        passport photo 123456, 123456789 passports were issued, passport fees ABC123
        MRN: 00482913, patient's MRN is 4471-2209, medical record number 77120345
        patient ID 99812345, Patient No. 4400123, hospital number 7712034, NHS number 9434765919
        case number 00123456, record 12345678, patient 4400123, chart 12, MRN 1234
        the DOB field of the form, which the clerk filled in only later: 1984-03-12
        the passport office opens at nine; quote reference X1234567
        "#,
        expect![[r#"
            DOB: 1984-03-12, d.o.b. 12.03.1984, date of birth 03/12/84
                date_of_birth `1984-03-12` 0.85
                date_of_birth `12.03.1984` 0.85
                date_of_birth `03/12/84` 0.85
            {"name": "Jane Roe", "dob": "1990-07-04", "birthDate": "1990-07-04"}
                date_of_birth `1990-07-04` 0.85
                date_of_birth `1990-07-04` 0.85
            born on 12 March 1984 in Leeds; born March 12, 1984; Born: Mar. 3, 1975
                date_of_birth `12 March 1984` 0.85
                date_of_birth `March 12, 1984` 0.85
                date_of_birth `Mar. 3, 1975` 0.85
            birthday 12th of March, 1984 and geboren am 12.03.1984, Geburtsdatum 29.02.1988
                date_of_birth `12th of March, 1984` 0.85
                date_of_birth `12.03.1984` 0.85
                date_of_birth `29.02.1988` 0.85
            fecha de nacimiento: 12 de marzo de 1984, né le 12/03/1984, data di nascita 12 marzo 1984
                date_of_birth `12 de marzo de 1984` 0.85
                date_of_birth `12/03/1984` 0.85
                date_of_birth `12 marzo 1984` 0.85
            the meeting moved from 2024-03-12 to 12/03/2024, deadline 12 March 2024
                -
            born on 31/02/1984 is no date; born in 1984; DOB 1984-13-01; born 1887-05-02
                -
            reborn 12.03.1984, the firstborn on 1984-03-12, DOB 2024-03-12T10:00
                -
            passport number X1234567, Passport No.: 123456789, Reisepass C01X00T47
                passport_number `X1234567` 0.85
                passport_number `123456789` 0.85
                passport_number `C01X00T47` 0.85
            my passport is 533380006, passport ID: GB9876543, {"passportNumber": "K12345678"}
                passport_number `533380006` 0.85
                passport_number `GB9876543` 0.85
                passport_number `K12345678` 0.85
            {"patientId": "00482913", "patient_number": "4400123"}
                medical_record_number `00482913` 0.85
                medical_record_number `4400123` 0.85
            passport photo 123456, 123456789 passports were issued, passport fees ABC123
                -
            MRN: 00482913, patient's MRN is 4471-2209, medical record number 77120345
                medical_record_number `00482913` 0.85
                medical_record_number `4471-2209` 0.85
                medical_record_number `77120345` 0.85
            patient ID 99812345, Patient No. 4400123, hospital number 7712034, NHS number 9434765919
                medical_record_number `99812345` 0.85
                medical_record_number `4400123` 0.85
                medical_record_number `7712034` 0.85
                medical_record_number `9434765919` 0.85
            case number 00123456, record 12345678, patient 4400123, chart 12, MRN 1234
                -
            the DOB field of the form, which the clerk filled in only later: 1984-03-12
                -
            the passport office opens at nine; quote reference X1234567
                -
        "#]],
    );
}

/// A form puts the label on the line above its date; a label followed by other words on
/// its line, or a blank line, labels nothing below.
#[test]
fn a_birth_label_ending_the_line_above_labels_the_date() {
    let found = |text: &str| -> Vec<String> {
        Recognizers::default()
            .scan(text)
            .into_iter()
            .map(|finding| format!("{} {}", finding.entity, &text[finding.span]))
            .collect()
    };
    assert_eq!(
        found("Date of birth:\r\n  12.03.1984\nName: Jane Roe"),
        ["date_of_birth 12.03.1984"]
    );
    assert_eq!(found("| DOB |\n1984-03-12"), ["date_of_birth 1984-03-12"]);
    assert!(found("born in Leeds\nthe meeting is on 2024-03-12").is_empty());
    assert!(found("DOB:\n\n1984-03-12").is_empty());
}

#[test]
fn cloud_credentials_have_their_formats() {
    let storage_key = format!(
        "{}==",
        "Kx7Qm2Vb9Lp4Rt6Yw8Zs1Nd3Fh5Jk0Gc"
            .repeat(3)
            .get(..86)
            .unwrap_or_default()
    );
    let cases = format!(
        r#"
        DefaultEndpointsProtocol=https;AccountName=acct01;AccountKey={storage_key};EndpointSuffix=core.windows.net
        key alone {storage_key}
        AccountKey={storage_key}
        Server=tcp:db.database.windows.net,1433;Initial Catalog=app;User ID=admin;Password=S3cr3t!pw;
        Data Source=db01;Initial Catalog=app;Password=S3cr3t!pw
        Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey=abc123def456ghi789=
        postgres://app:S3cr3tPw@db.example.com:5432/app
        https://acct.blob.core.windows.net/c/f.txt?sp=r&st=2024-01-01T00:00:00Z&se=2024-01-02T00:00:00Z&spr=https&sv=2022-11-02&sr=b&sig=aBcD1234eFgH5678iJkL9012mNoP%3D
        sv=2022-11-02 without a signature
        AKIAZ3MJQ4R5T6Y7U8I9 and ASIAZ3MJQ4R5T6Y7U8I9
        AKIAIOSFODNN7EXAMPLE is the documentation key
        aws_secret_access_key = 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
        secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzKEYabcde
        wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzKEYabcde without context
        "#
    );
    check(
        &cases,
        expect![[r#"
            DefaultEndpointsProtocol=https;AccountName=acct01;AccountKey=Kx7Qm2Vb9Lp4Rt6Yw8Zs1Nd3Fh5Jk0GcKx7Qm2Vb9Lp4Rt6Yw8Zs1Nd3Fh5Jk0GcKx7Qm2Vb9Lp4Rt6Yw8Zs1N==;EndpointSuffix=core.windows.net
                connection_string `DefaultEndpointsProtocol=https;AccountName=acct01;AccountKey=Kx7Qm2Vb9Lp4Rt6Yw8Zs1Nd3Fh5Jk0GcKx7Qm2Vb9Lp4Rt6Yw8Zs1Nd3Fh5Jk0GcKx7Qm2Vb9Lp4Rt6Yw8Zs1N==;EndpointSuffix=core.windows.net` 0.95
            key alone Kx7Qm2Vb9Lp4Rt6Yw8Zs1Nd3Fh5Jk0GcKx7Qm2Vb9Lp4Rt6Yw8Zs1Nd3Fh5Jk0GcKx7Qm2Vb9Lp4Rt6Yw8Zs1N==
                azure_storage_key `Kx7Qm2Vb9Lp4Rt6Yw8Zs1Nd3Fh5Jk0GcKx7Qm2Vb9Lp4Rt6Yw8Zs1Nd3Fh5Jk0GcKx7Qm2Vb9Lp4Rt6Yw8Zs1N==` 0.85
            AccountKey=Kx7Qm2Vb9Lp4Rt6Yw8Zs1Nd3Fh5Jk0GcKx7Qm2Vb9Lp4Rt6Yw8Zs1Nd3Fh5Jk0GcKx7Qm2Vb9Lp4Rt6Yw8Zs1N==
                azure_storage_key `Kx7Qm2Vb9Lp4Rt6Yw8Zs1Nd3Fh5Jk0GcKx7Qm2Vb9Lp4Rt6Yw8Zs1Nd3Fh5Jk0GcKx7Qm2Vb9Lp4Rt6Yw8Zs1N==` 0.95
            Server=tcp:db.database.windows.net,1433;Initial Catalog=app;User ID=admin;Password=S3cr3t!pw;
                connection_string `Server=tcp:db.database.windows.net,1433;Initial Catalog=app;User ID=admin;Password=S3cr3t!pw` 0.95
            Data Source=db01;Initial Catalog=app;Password=S3cr3t!pw
                connection_string `Data Source=db01;Initial Catalog=app;Password=S3cr3t!pw` 0.95
            Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey=abc123def456ghi789=
                connection_string `Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey=abc123def456ghi789=` 0.95
            postgres://app:S3cr3tPw@db.example.com:5432/app
                connection_string `postgres://app:S3cr3tPw@db.example.com:5432` 0.9
            https://acct.blob.core.windows.net/c/f.txt?sp=r&st=2024-01-01T00:00:00Z&se=2024-01-02T00:00:00Z&spr=https&sv=2022-11-02&sr=b&sig=aBcD1234eFgH5678iJkL9012mNoP%3D
                azure_sas_token `sp=r&st=2024-01-01T00:00:00Z&se=2024-01-02T00:00:00Z&spr=https&sv=2022-11-02&sr=b&sig=aBcD1234eFgH5678iJkL9012mNoP%3D` 0.95
            sv=2022-11-02 without a signature
                -
            AKIAZ3MJQ4R5T6Y7U8I9 and ASIAZ3MJQ4R5T6Y7U8I9
                aws_access_key `AKIAZ3MJQ4R5T6Y7U8I9` 0.9
                aws_access_key `ASIAZ3MJQ4R5T6Y7U8I9` 0.9
            AKIAIOSFODNN7EXAMPLE is the documentation key
                -
            aws_secret_access_key = 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
                aws_secret_key `wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzKEYabcde` 0.9
            secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzKEYabcde
                aws_secret_key `wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzKEYabcde` 0.85
            wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzKEYabcde without context
                -
        "#]],
    );
}

#[test]
fn urls_with_a_password_are_connection_strings_whatever_the_host() {
    check(
        r#"
        mongodb+srv://admin:S3cretPass!@cluster0.ab1cd.mongodb.net/prod
        redis://:p4ssw0rdRedis@10.0.0.5:6379/0
        postgresql://svc:Tr0ub4dor&3@localhost/app
        amqp://guest:gu3st#1@[fd00::12]:5672
        ftp://deploy:p@ss-w0rd@files.internal:2121/drop
        mysql://root:%40dm1n@db
        "postgres://{user}:{password}@{host}/{db}" and mysql://root:$MYSQL_PWD@db
        redis://:***@cache and https://user:@example.com and https://jane@example.com/x
        see https://example.com/find?who=jane@contoso.com
        "#,
        expect![[r#"
            mongodb+srv://admin:S3cretPass!@cluster0.ab1cd.mongodb.net/prod
                connection_string `mongodb+srv://admin:S3cretPass!@cluster0.ab1cd.mongodb.net` 0.9
            redis://:p4ssw0rdRedis@10.0.0.5:6379/0
                connection_string `redis://:p4ssw0rdRedis@10.0.0.5:6379` 0.9
            postgresql://svc:Tr0ub4dor&3@localhost/app
                connection_string `postgresql://svc:Tr0ub4dor&3@localhost` 0.9
            amqp://guest:gu3st#1@[fd00::12]:5672
                connection_string `amqp://guest:gu3st#1@[fd00::12]:5672` 0.9
            ftp://deploy:p@ss-w0rd@files.internal:2121/drop
                connection_string `ftp://deploy:p@ss-w0rd@files.internal:2121` 0.9
            mysql://root:%40dm1n@db
                connection_string `mysql://root:%40dm1n@db` 0.9
            "postgres://{user}:{password}@{host}/{db}" and mysql://root:$MYSQL_PWD@db
                -
            redis://:***@cache and https://user:@example.com and https://jane@example.com/x
                email `jane@example.com` 0.9
            see https://example.com/find?who=jane@contoso.com
                email `jane@contoso.com` 0.9
        "#]],
    );
}

#[test]
fn a_putty_key_file_is_one_private_key_through_its_mac_line() {
    let text = "Here is the key:\nPuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\n\
                Comment: ops\nPublic-Lines: 2\nAAAAC3NzaC1lZDI1NTE5AAAAIOdq\nA4Zx1b2c\n\
                Private-Lines: 1\nAAAAIGx2Yk1tZ3dQY3ZrR0F5bHhwN0R6\n\
                Private-MAC: 5b1c2d3e4f5a6b7c8d9e\nThanks, jane@contoso.com";
    let findings = Recognizers::default().scan(text);
    let found: Vec<(String, &str)> = findings
        .iter()
        .map(|finding| (finding.entity.to_string(), &text[finding.span.clone()]))
        .collect();
    let key_start = text.find("PuTTY").expect("the key");
    let key_end = text.find("\nThanks").expect("the line after");
    assert_eq!(
        found,
        [
            ("private_key".to_owned(), &text[key_start..key_end]),
            ("email".to_owned(), "jane@contoso.com"),
        ]
    );
}

#[test]
fn tokens_of_known_issuers_are_secrets_and_names_after_their_prefixes_are_not() {
    check(
        r#"
        groq 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
        xai-XDuCL1mHoOsFaQfDPrAJ71fTquWoGsbeKXgzg2sye9b2Rann76dEyTzAeKOmXRrvftva9AW7hipTgadD
        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
        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
        r8_E6wSt9cbMOeEeUtuieeCIxVc57VVTiY96vwfR
        npm_E5e32A8Yb3FKaNQyyLaMeffOhq4AUvy7VSLD
        pypi-AgEIcHlwaS5vcmcCD1IfHWGbtMfEbo9ShFXNQ6Fq5axtjRNmHkW5vQ7CF5puzQqmOBZZW6m4nyo
        dckr_pat_L6uniiFw152cTe8r0khCEr7n1Ay and glrt-uzDBGwBnMxaOSc2mlADx
        dop_v1_faea21818b904ce6087413e3b266f850f1578b5c72dc4ee60caea63367c29a80
        lin_api_wGfcCvJAXrF6bnZ3eBZclIvRY6iEjH5UH1RSC84F and 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
        sq0atp-FivB50756EHugmANb7qiSX and 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
        AGE-SECRET-KEY-1MPC62DDDGWKT55VDVXG0G9SCXM6GVEPXVKH84VY7XPZ7FVT8DT2JXRGAYX
        xapp-1-A0Vxz6mMkgGYau5fZ1T436O8zKMmGLvZWqr6hVVXk0
        model xai-grok-2-vision-1212, npm_package_devDependencies_typescript, gsk_client_v2_config
        "#,
        expect![[r#"
            groq 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
                secret `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` 0.9
            xai-XDuCL1mHoOsFaQfDPrAJ71fTquWoGsbeKXgzg2sye9b2Rann76dEyTzAeKOmXRrvftva9AW7hipTgadD
                secret `xai-XDuCL1mHoOsFaQfDPrAJ71fTquWoGsbeKXgzg2sye9b2Rann76dEyTzAeKOmXRrvftva9AW7hipTgadD` 0.9
            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
                secret `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` 0.9
            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
                secret `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` 0.9
            r8_E6wSt9cbMOeEeUtuieeCIxVc57VVTiY96vwfR
                secret `r8_E6wSt9cbMOeEeUtuieeCIxVc57VVTiY96vwfR` 0.9
            npm_E5e32A8Yb3FKaNQyyLaMeffOhq4AUvy7VSLD
                secret `npm_E5e32A8Yb3FKaNQyyLaMeffOhq4AUvy7VSLD` 0.9
            pypi-AgEIcHlwaS5vcmcCD1IfHWGbtMfEbo9ShFXNQ6Fq5axtjRNmHkW5vQ7CF5puzQqmOBZZW6m4nyo
                secret `pypi-AgEIcHlwaS5vcmcCD1IfHWGbtMfEbo9ShFXNQ6Fq5axtjRNmHkW5vQ7CF5puzQqmOBZZW6m4nyo` 0.9
            dckr_pat_L6uniiFw152cTe8r0khCEr7n1Ay and glrt-uzDBGwBnMxaOSc2mlADx
                secret `dckr_pat_L6uniiFw152cTe8r0khCEr7n1Ay` 0.9
                secret `glrt-uzDBGwBnMxaOSc2mlADx` 0.9
            dop_v1_faea21818b904ce6087413e3b266f850f1578b5c72dc4ee60caea63367c29a80
                secret `dop_v1_faea21818b904ce6087413e3b266f850f1578b5c72dc4ee60caea63367c29a80` 0.9
            lin_api_wGfcCvJAXrF6bnZ3eBZclIvRY6iEjH5UH1RSC84F and 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
                secret `lin_api_wGfcCvJAXrF6bnZ3eBZclIvRY6iEjH5UH1RSC84F` 0.9
                secret `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` 0.9
            sq0atp-FivB50756EHugmANb7qiSX and 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
                secret `sq0atp-FivB50756EHugmANb7qiSX` 0.9
                secret `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` 0.9
            AGE-SECRET-KEY-1MPC62DDDGWKT55VDVXG0G9SCXM6GVEPXVKH84VY7XPZ7FVT8DT2JXRGAYX
                secret `AGE-SECRET-KEY-1MPC62DDDGWKT55VDVXG0G9SCXM6GVEPXVKH84VY7XPZ7FVT8DT2JXRGAYX` 0.9
            xapp-1-A0Vxz6mMkgGYau5fZ1T436O8zKMmGLvZWqr6hVVXk0
                secret `xapp-1-A0Vxz6mMkgGYau5fZ1T436O8zKMmGLvZWqr6hVVXk0` 0.9
            model xai-grok-2-vision-1212, npm_package_devDependencies_typescript, gsk_client_v2_config
                -
        "#]],
    );
}

#[test]
fn secrets_given_as_command_line_options_are_found() {
    check(
        r#"
        curl -u admin:S3cretPw1 https://api.internal/v1/items
        curl --user deploy:Tr0ub4dor https://api.internal
        docker login -u deploy -p S3cretPw1 registry.internal
        mysql -u root -pS3cretPw1 prod
        sshpass -p 'S3cret Pw1' ssh root@host
        az login --service-principal -u app -p Abc8Q~xYzAbCdEfGh123 --tenant t
        vault login --password S3cretPw1 and tool --token=Zx81kQpL02mNvB7tYr4w
        docker run -p 8080:80 nginx, ssh -p 2222 host, mkdir -p /var/lib/app, mysql -u root -p
        curl -u admin https://x and curl -u admin:$PASSWORD https://x, --password <secret>
        username: admin password S3cretPw1! and the wifi passphrase Tr0ub4dor&3
        my password is Tr0ub4dor&3; the VPN one is (password is S3cret;Pw1).
        password SHA256-hashed, password reset, password 2FA, password field1 of the form
        then pwd /srv/app2/releases, pwd ~/work2024 and pwd ./build42x
        "#,
        expect![[r#"
            curl -u admin:S3cretPw1 https://api.internal/v1/items
                secret `admin:S3cretPw1` 0.8
            curl --user deploy:Tr0ub4dor https://api.internal
                secret `deploy:Tr0ub4dor` 0.8
            docker login -u deploy -p S3cretPw1 registry.internal
                secret `S3cretPw1` 0.8
            mysql -u root -pS3cretPw1 prod
                secret `S3cretPw1` 0.8
            sshpass -p 'S3cret Pw1' ssh root@host
                secret `S3cret Pw1` 0.8
            az login --service-principal -u app -p Abc8Q~xYzAbCdEfGh123 --tenant t
                secret `Abc8Q~xYzAbCdEfGh123` 0.8
            vault login --password S3cretPw1 and tool --token=Zx81kQpL02mNvB7tYr4w
                secret `S3cretPw1` 0.8
                secret `Zx81kQpL02mNvB7tYr4w` 0.8
            docker run -p 8080:80 nginx, ssh -p 2222 host, mkdir -p /var/lib/app, mysql -u root -p
                -
            curl -u admin https://x and curl -u admin:$PASSWORD https://x, --password <secret>
                -
            username: admin password S3cretPw1! and the wifi passphrase Tr0ub4dor&3
                secret `S3cretPw1!` 0.8
                secret `Tr0ub4dor&3` 0.8
            my password is Tr0ub4dor&3; the VPN one is (password is S3cret;Pw1).
                secret `Tr0ub4dor&3` 0.8
                secret `S3cret;Pw1` 0.8
            password SHA256-hashed, password reset, password 2FA, password field1 of the form
                -
            then pwd /srv/app2/releases, pwd ~/work2024 and pwd ./build42x
                -
        "#]],
    );
}

#[test]
fn a_quoted_secret_runs_past_its_escaped_quotes() {
    // JSON pasted into a message, or a call's arguments: `\"` is part of the value, and no
    // tail of the secret may be left after its placeholder.
    for (text, secret) in [
        (
            r#"{"user": "svc", "password": "Tr0ub4dor\"&3xK!pQz"}"#,
            r#"Tr0ub4dor\"&3xK!pQz"#,
        ),
        (r#"password: 'it\'s-S3cret!' and more"#, r#"it\'s-S3cret!"#),
        (r#""password": "S3cretPw1\\""#, r#"S3cretPw1\\"#),
    ] {
        let found: Vec<&str> = Recognizers::default()
            .scan(text)
            .iter()
            .map(|finding| &text[finding.span.clone()])
            .collect();
        assert_eq!(found, [secret], "{text}");
    }
}

#[test]
fn a_command_continued_over_lines_is_read_as_one() {
    let found = |text: &str| -> Vec<String> {
        Recognizers::default()
            .scan(text)
            .iter()
            .map(|finding| format!("{} `{}`", finding.entity, &text[finding.span.clone()]))
            .collect()
    };
    assert_eq!(
        found("docker login \\\n  -u deploy \\\r\n  -p S3cretPw1 \\\n  registry.internal"),
        ["secret `S3cretPw1`"]
    );
    // Without the `\`, the line with `-p` names no user and does not log in.
    assert!(found("docker login\n-u deploy\nrun -p S3cretPw1 app").is_empty());
}

#[test]
fn keys_tokens_and_secrets_need_a_format_or_a_context_word() {
    let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
    let cases = format!(
        r#"
        -----BEGIN RSA PRIVATE KEY----- MIIEpAIBAAKCAQEA1c7+9z5Pad7OejecsQ0bu -----END RSA PRIVATE KEY----- done
        -----BEGIN PUBLIC KEY----- MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA -----END PUBLIC KEY-----
        -----BEGIN OPENSSH PRIVATE KEY----- b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ truncated
        token {jwt}
        eyJub3QiOiJhIGp3dCJ9.eyJzdWIiOiIxIn0.abc has no alg
        Authorization: Bearer abcDEF123456ghiJKL789
        password=hunter22 and "api_key": "Zx81kQpL02mNvB7tYr4w"
        DB_PASSWORD='correct horse battery'
        password: please reset it, password = get_password(), password = config.db_password
        password=changeme, password=<your password>, password=${{DB_PASSWORD}}, password=********
        my github token is ghp_16C7e42F292c6912E7710c838347Ae178B4a
        I cannot log in, my password is Summer2024! and the wifi passphrase is 'open sesame'.
        the password is required, the password is get_password(), password is ********
        api key: 9f8e7d6c5b4a39281706f5e4d3c2b1a0Qx
        commit 3f786850e387550fdab836ed7e6dc881de23001b and request 550e8400-e29b-41d4-a716-446655440000
        token f47ac10b-58cc-4372-a567-0e02b2c3d479
        token 550e8400-e29b-41d4-a716-446655440000 has too little entropy
        internationalization_and_localization_frameworks
        tokenizer models/SmolLM2-135M-Instruct, max tokens 4096 for llama-3-8b-instruct-q4
        huggingface token hf_jBkLnYpQrStUvWxYzAbCdEfGhIjKlMnOpq and hf_hub_download_and_cache_the_files
        sk-learnModelSelectionStrategies is a name, hf_ThisIsMyTestFunctionNameForModel too
        PuTTY-User-Key-File-3: ssh-ed25519 Encryption: none Comment: ops Public-Lines: 2 AAAAC3NzaC1lZDI1NTE5 Private-Lines: 1 AAAAIGx2Yk1tZ3dQY3ZrR0F5 Private-MAC: 5b1c2d3e4f
        PuTTY-User-Key-File-2: ssh-rsa Encryption: none Private-Lines: 1 AAAAIGx2Yk1tZ3dQY3Zr
        PuTTY-User-Key-File is PuTTY's format
        "#
    );
    check(
        &cases,
        expect![[r#"
            -----BEGIN RSA PRIVATE KEY----- MIIEpAIBAAKCAQEA1c7+9z5Pad7OejecsQ0bu -----END RSA PRIVATE KEY----- done
                private_key `-----BEGIN RSA PRIVATE KEY----- MIIEpAIBAAKCAQEA1c7+9z5Pad7OejecsQ0bu -----END RSA PRIVATE KEY-----` 0.99
            -----BEGIN PUBLIC KEY----- MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA -----END PUBLIC KEY-----
                -
            -----BEGIN OPENSSH PRIVATE KEY----- b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ truncated
                private_key `-----BEGIN OPENSSH PRIVATE KEY----- b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ truncated` 0.99
            token eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c
                jwt `eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c` 0.95
            eyJub3QiOiJhIGp3dCJ9.eyJzdWIiOiIxIn0.abc has no alg
                -
            Authorization: Bearer abcDEF123456ghiJKL789
                secret `abcDEF123456ghiJKL789` 0.9
            password=hunter22 and "api_key": "Zx81kQpL02mNvB7tYr4w"
                secret `hunter22` 0.8
                secret `Zx81kQpL02mNvB7tYr4w` 0.8
            DB_PASSWORD='correct horse battery'
                secret `correct horse battery` 0.8
            password: please reset it, password = get_password(), password = config.db_password
                -
            password=changeme, password=<your password>, password=${DB_PASSWORD}, password=********
                -
            my github token is ghp_16C7e42F292c6912E7710c838347Ae178B4a
                secret `ghp_16C7e42F292c6912E7710c838347Ae178B4a` 0.9
            I cannot log in, my password is Summer2024! and the wifi passphrase is 'open sesame'.
                secret `Summer2024!` 0.8
                secret `open sesame` 0.8
            the password is required, the password is get_password(), password is ********
                -
            api key: 9f8e7d6c5b4a39281706f5e4d3c2b1a0Qx
                secret `9f8e7d6c5b4a39281706f5e4d3c2b1a0Qx` 0.7
            commit 3f786850e387550fdab836ed7e6dc881de23001b and request 550e8400-e29b-41d4-a716-446655440000
                -
            token f47ac10b-58cc-4372-a567-0e02b2c3d479
                secret `f47ac10b-58cc-4372-a567-0e02b2c3d479` 0.7
            token 550e8400-e29b-41d4-a716-446655440000 has too little entropy
                -
            internationalization_and_localization_frameworks
                -
            tokenizer models/SmolLM2-135M-Instruct, max tokens 4096 for llama-3-8b-instruct-q4
                -
            huggingface token hf_jBkLnYpQrStUvWxYzAbCdEfGhIjKlMnOpq and hf_hub_download_and_cache_the_files
                secret `hf_jBkLnYpQrStUvWxYzAbCdEfGhIjKlMnOpq` 0.9
            sk-learnModelSelectionStrategies is a name, hf_ThisIsMyTestFunctionNameForModel too
                -
            PuTTY-User-Key-File-3: ssh-ed25519 Encryption: none Comment: ops Public-Lines: 2 AAAAC3NzaC1lZDI1NTE5 Private-Lines: 1 AAAAIGx2Yk1tZ3dQY3ZrR0F5 Private-MAC: 5b1c2d3e4f
                private_key `PuTTY-User-Key-File-3: ssh-ed25519 Encryption: none Comment: ops Public-Lines: 2 AAAAC3NzaC1lZDI1NTE5 Private-Lines: 1 AAAAIGx2Yk1tZ3dQY3ZrR0F5 Private-MAC: 5b1c2d3e4f` 0.99
            PuTTY-User-Key-File-2: ssh-rsa Encryption: none Private-Lines: 1 AAAAIGx2Yk1tZ3dQY3Zr
                private_key `PuTTY-User-Key-File-2: ssh-rsa Encryption: none Private-Lines: 1 AAAAIGx2Yk1tZ3dQY3Zr` 0.99
            PuTTY-User-Key-File is PuTTY's format
                -
        "#]],
    );
}

#[test]
fn passwords_that_start_like_templates_are_found_and_whole_templates_are_not() {
    check(
        r#"
        {"user": "svc", "password": "$Summer2024!x"}
        password=*Tr0ub4dor3 and pwd: %Tr0ub4dor3! and password: "{Summer2024}"
        password is <Summer2024! and password: "${Summer}2024!"
        {"password": "${DB_PASSWORD}", "pwd": "{{ .Values.db.password }}"}
        password={{ .Values.db.password }}, password=<your db password>, password is <your db password>
        password=$DB_PASSWORD, password=%DB_PASSWORD%, password="****", password: "<your-password>"
        curl -u admin:${API_PASSWORD} https://x and postgres://app:${DB_PASSWORD}@db:5432/app
        "#,
        expect![[r#"
            {"user": "svc", "password": "$Summer2024!x"}
                secret `$Summer2024!x` 0.8
            password=*Tr0ub4dor3 and pwd: %Tr0ub4dor3! and password: "{Summer2024}"
                secret `*Tr0ub4dor3` 0.8
                secret `%Tr0ub4dor3!` 0.8
                secret `{Summer2024}` 0.8
            password is <Summer2024! and password: "${Summer}2024!"
                secret `<Summer2024!` 0.8
                secret `${Summer}2024!` 0.8
            {"password": "${DB_PASSWORD}", "pwd": "{{ .Values.db.password }}"}
                -
            password={{ .Values.db.password }}, password=<your db password>, password is <your db password>
                -
            password=$DB_PASSWORD, password=%DB_PASSWORD%, password="****", password: "<your-password>"
                -
            curl -u admin:${API_PASSWORD} https://x and postgres://app:${DB_PASSWORD}@db:5432/app
                -
        "#]],
    );
}

#[test]
fn values_in_base64_text_are_found_on_the_encoded_run() {
    check(
        "
        tool output eyJjYXJkIjogIjQxMTEgMTExMSAxMTExIDExMTEiLCAiZXhwIjogIjEyLzI5In0= done
        csv bmFtZSxlbWFpbApKYW5lIERvZSxqYW5lLmRvZUBjb250b3NvLmNvbQo attached
        twice VTFOT0lEVXpOaTB5TWkweE1qTTBJRzl1SUdacGJHVT0= encoded
        luhn-invalid eyJjYXJkIjogIjQxMTEgMTExMSAxMTExIDExMTIifQ== inside
        harmless anVzdCBzb21lIGhhcm1sZXNzIHRleHQgaGVyZSwgbm90aGluZyBlbHNl text
        identifiers internationalization_and_localization_frameworks in code
        a digest 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 is not text
        ",
        expect![[r#"
            tool output eyJjYXJkIjogIjQxMTEgMTExMSAxMTExIDExMTEiLCAiZXhwIjogIjEyLzI5In0= done
                credit_card `eyJjYXJkIjogIjQxMTEgMTExMSAxMTExIDExMTEiLCAiZXhwIjogIjEyLzI5In0=` 0.95
            csv bmFtZSxlbWFpbApKYW5lIERvZSxqYW5lLmRvZUBjb250b3NvLmNvbQo attached
                email `bmFtZSxlbWFpbApKYW5lIERvZSxqYW5lLmRvZUBjb250b3NvLmNvbQo` 0.9
            twice VTFOT0lEVXpOaTB5TWkweE1qTTBJRzl1SUdacGJHVT0= encoded
                us_ssn `VTFOT0lEVXpOaTB5TWkweE1qTTBJRzl1SUdacGJHVT0=` 0.85
            luhn-invalid eyJjYXJkIjogIjQxMTEgMTExMSAxMTExIDExMTIifQ== inside
                -
            harmless anVzdCBzb21lIGhhcm1sZXNzIHRleHQgaGVyZSwgbm90aGluZyBlbHNl text
                -
            identifiers internationalization_and_localization_frameworks in code
                -
            a digest 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 is not text
                -
        "#]],
    );
}

#[test]
fn values_escaped_in_links_page_sources_and_brackets_are_found_as_written() {
    check(
        "
        open https://crm.contoso.com/find?email=jane.doe%40contoso.com&x=1
        open https://pay.example/charge?card=4111%201111%201111%201111
        open https://hr.example/lookup?ssn=536%2D22%2D1234
        a 50% cut, 100%20 is not an escape of anything sensitive
        page source: mail jane.doe&#64;contoso.com or call
        signature: John Smith, john.smith [at] contoso [dot] com
        spam-safe: j.smith(at)contoso.co.uk
        code: if (at) { x[at] = dot(a, b); }
        ",
        expect![[r#"
            open https://crm.contoso.com/find?email=jane.doe%40contoso.com&x=1
                email `jane.doe%40contoso.com` 0.9
            open https://pay.example/charge?card=4111%201111%201111%201111
                credit_card `4111%201111%201111%201111` 0.95
            open https://hr.example/lookup?ssn=536%2D22%2D1234
                us_ssn `536%2D22%2D1234` 0.85
            a 50% cut, 100%20 is not an escape of anything sensitive
                -
            page source: mail jane.doe&#64;contoso.com or call
                email `jane.doe&#64;contoso.com` 0.9
            signature: John Smith, john.smith [at] contoso [dot] com
                email `john.smith [at] contoso [dot] com` 0.9
            spam-safe: j.smith(at)contoso.co.uk
                email `j.smith(at)contoso.co.uk` 0.9
            code: if (at) { x[at] = dot(a, b); }
                -
        "#]],
    );
}

#[test]
fn values_escaped_in_json_text_are_found_as_written() {
    // A tool's result that is itself a JSON document, as Python's `json.dumps` writes it:
    // characters outside ASCII, and what other encoders escape besides, as `\uXXXX`.
    check(
        r#"
        {"card": "4111\u00a01111\u00a01111\u00a01111", "owner": "Jos\u00e9"}
        {"contact": "jane\u0040contoso.com", "phone": "\u002B44 20 7946 0958"}
        {"mail": "jo\u200bhn.smith\uff20example.com"}
        {"note": "\ud83d\ude00 \u00 \uzzzz \ud800 4111 1111"}
        "#,
        expect![[r#"
            {"card": "4111\u00a01111\u00a01111\u00a01111", "owner": "Jos\u00e9"}
                credit_card `4111\u00a01111\u00a01111\u00a01111` 0.95
            {"contact": "jane\u0040contoso.com", "phone": "\u002B44 20 7946 0958"}
                email `jane\u0040contoso.com` 0.9
                phone `\u002B44 20 7946 0958` 0.8
            {"mail": "jo\u200bhn.smith\uff20example.com"}
                email `jo\u200bhn.smith\uff20example.com` 0.9
            {"note": "\ud83d\ude00 \u00 \uzzzz \ud800 4111 1111"}
                -
        "#]],
    );
}

#[test]
fn look_alike_characters_are_read_as_the_ascii_they_stand_for() {
    check(
        "
        card \u{ff14}\u{ff11}\u{ff11}\u{ff11} \u{ff11}\u{ff11}\u{ff11}\u{ff11} \u{ff11}\u{ff11}\u{ff11}\u{ff11} \u{ff11}\u{ff11}\u{ff11}\u{ff11} please
        card 4111\u{a0}1111\u{a0}1111\u{a0}1111 pasted from a web page
        card 4111\u{200b}1111\u{200b}1111\u{200b}1111 with zero-width spaces
        card \u{0664}\u{0661}\u{0661}\u{0661}\u{0661}\u{0661}\u{0661}\u{0661}\u{0661}\u{0661}\u{0661}\u{0661}\u{0661}\u{0661}\u{0661}\u{0661} in Arabic-Indic digits
        SSN 536\u{2013}22\u{2013}1234 after a word processor's autocorrect
        SSN 536\u{2011}22\u{2011}1234 with no-break hyphens
        mail john.smith\u{ff20}example.com
        mail jo\u{200b}hn.smith@exa\u{200d}mple.com
        hidden \u{e006a}\u{e006f}\u{e0065}\u{e0040}\u{e0065}\u{e0078}\u{e0061}\u{e006d}\u{e0070}\u{e006c}\u{e0065}\u{e002e}\u{e0063}\u{e006f}\u{e006d} in tag characters
        IBAN \u{ff24}\u{ff25}89 3704 0044 0532 0130 00
        IBAN DE89\u{202f}3704\u{202f}0044\u{202f}0532\u{202f}0130\u{202f}00
        id \u{1d400}\u{1d40a}\u{1d408}\u{1d400}2E0A8F3B244C9986
        luhn-invalid \u{ff14}\u{ff11}\u{ff11}\u{ff11} 1111 1111 1112
        prices 1\u{a0}234,56\u{a0}€ and 12\u{a0}%
        ",
        expect![[r#"
            card ４１１１ １１１１ １１１１ １１１１ please
                credit_card `４１１１ １１１１ １１１１ １１１１` 0.95
            card 4111\u{a0}1111\u{a0}1111\u{a0}1111 pasted from a web page
                credit_card `4111\u{a0}1111\u{a0}1111\u{a0}1111` 0.95
            card 4111\u{200b}1111\u{200b}1111\u{200b}1111 with zero-width spaces
                credit_card `4111\u{200b}1111\u{200b}1111\u{200b}1111` 0.95
            card ٤١١١١١١١١١١١١١١١ in Arabic-Indic digits
                credit_card `٤١١١١١١١١١١١١١١١` 0.95
            SSN 536–22–1234 after a word processor's autocorrect
                us_ssn `536–22–1234` 0.85
            SSN 536‑22‑1234 with no-break hyphens
                us_ssn `536‑22‑1234` 0.85
            mail john.smith＠example.com
                email `john.smith＠example.com` 0.9
            mail jo\u{200b}hn.smith@exa\u{200d}mple.com
                email `jo\u{200b}hn.smith@exa\u{200d}mple.com` 0.9
            hidden \u{e006a}\u{e006f}\u{e0065}\u{e0040}\u{e0065}\u{e0078}\u{e0061}\u{e006d}\u{e0070}\u{e006c}\u{e0065}\u{e002e}\u{e0063}\u{e006f}\u{e006d} in tag characters
                email `\u{e006a}\u{e006f}\u{e0065}\u{e0040}\u{e0065}\u{e0078}\u{e0061}\u{e006d}\u{e0070}\u{e006c}\u{e0065}\u{e002e}\u{e0063}\u{e006f}\u{e006d}` 0.9
            IBAN ＤＥ89 3704 0044 0532 0130 00
                iban `ＤＥ89 3704 0044 0532 0130 00` 0.95
            IBAN DE89\u{202f}3704\u{202f}0044\u{202f}0532\u{202f}0130\u{202f}00
                iban `DE89\u{202f}3704\u{202f}0044\u{202f}0532\u{202f}0130\u{202f}00` 0.95
            id 𝐀𝐊𝐈𝐀2E0A8F3B244C9986
                aws_access_key `𝐀𝐊𝐈𝐀2E0A8F3B244C9986` 0.9
            luhn-invalid ４１１１ 1111 1111 1112
                -
            prices 1\u{a0}234,56\u{a0}€ and 12\u{a0}%
                -
        "#]],
    );
}

fn custom() -> Recognizers {
    let config = RecognizerConfig {
        dictionaries: vec![
            DictionaryConfig {
                name: "projects".to_owned(),
                terms: vec!["Falcon".to_owned(), "Blue Heron".to_owned()],
            },
            DictionaryConfig {
                name: "customers".to_owned(),
                terms: vec!["Contoso Ltd".to_owned(), "Zoë Café".to_owned()],
            },
        ],
        patterns: vec![PatternConfig {
            name: "ticket".to_owned(),
            regex: r"\bINC-\d{6}\b".to_owned(),
        }],
        disabled: vec!["ip_address".to_owned()],
    };
    match Recognizers::compile(&config) {
        Ok(recognizers) => recognizers,
        Err(errors) => panic!("test configuration does not compile: {errors:?}"),
    }
}

#[test]
fn dictionaries_match_whole_words_in_any_case_and_patterns_match() {
    check_with(
        &custom(),
        r#"
        project falcon for contoso ltd, blue  heron
        Falconry and BLUE HERON and zoë café
        INC-123456 on 10.0.0.1 and INC-1234567
        "#,
        expect![[r#"
            project falcon for contoso ltd, blue  heron
                dictionary:projects `falcon` 0.9
                dictionary:customers `contoso ltd` 0.9
            Falconry and BLUE HERON and zoë café
                dictionary:projects `BLUE HERON` 0.9
                dictionary:customers `zoë café` 0.9
            INC-123456 on 10.0.0.1 and INC-1234567
                pattern:ticket `INC-123456` 0.8
        "#]],
    );
}

#[test]
fn a_configuration_reports_every_error_by_name() {
    let config = RecognizerConfig {
        dictionaries: vec![
            DictionaryConfig {
                name: "Projects".to_owned(),
                terms: vec!["a".to_owned(), " ".to_owned()],
            },
            DictionaryConfig {
                name: "empty".to_owned(),
                terms: vec![],
            },
        ],
        patterns: vec![
            PatternConfig {
                name: "broken".to_owned(),
                regex: "(".to_owned(),
            },
            PatternConfig {
                name: "anything".to_owned(),
                regex: "x*".to_owned(),
            },
            PatternConfig {
                name: "anything".to_owned(),
                regex: "y".to_owned(),
            },
        ],
        disabled: vec!["creditcard".to_owned()],
    };
    let errors: Vec<String> = match Recognizers::compile(&config) {
        Ok(_) => panic!("compiled"),
        Err(errors) => errors.iter().map(SensitivityError::to_string).collect(),
    };
    expect![[r#"
        [
            "`creditcard` in `disabled` is not a built-in entity type",
            "`Projects` is not a valid dictionary name (use a-z, 0-9, `_` and `-`, at most 64 bytes)",
            "dictionary `Projects` term 1 is blank",
            "dictionary `empty` has no terms",
            "pattern `broken` is not a valid regular expression: regex parse error:\n    (\n    ^\nerror: unclosed group",
            "pattern `anything` matches the empty string",
            "pattern `anything` is defined more than once",
        ]
    "#]]
    .assert_debug_eq(&errors);
}

#[test]
fn entity_names_are_stable_and_round_trip() {
    let names: Vec<&str> = EntityType::BUILTIN.iter().map(EntityType::as_str).collect();
    expect![[r#"
        [
            "credit_card",
            "iban",
            "us_ssn",
            "email",
            "phone",
            "ip_address",
            "uk_nino",
            "de_tax_id",
            "es_dni",
            "fr_nir",
            "it_fiscal_code",
            "nl_bsn",
            "pl_pesel",
            "se_personal_number",
            "date_of_birth",
            "passport_number",
            "medical_record_number",
            "azure_storage_key",
            "connection_string",
            "azure_sas_token",
            "aws_access_key",
            "aws_secret_key",
            "private_key",
            "jwt",
            "secret",
        ]
    "#]]
    .assert_debug_eq(&names);
    for entity in EntityType::BUILTIN {
        assert_eq!(EntityType::builtin(entity.as_str()), Some(entity.clone()));
        assert_eq!(
            entity
                .builtin_index()
                .map(|index| &EntityType::BUILTIN[index]),
            Some(&entity)
        );
    }
}

#[test]
fn overlaps_keep_the_most_confident_finding() {
    // The card digits inside the e-mail address's local part lose to the address.
    check(
        "4111111111111111@example.com, +1 555 234 5678 9",
        expect![[r#"
            4111111111111111@example.com, +1 555 234 5678 9
                email `4111111111111111@example.com` 0.9
                phone `+1 555 234 5678 9` 0.8
        "#]],
    );
}

/// Completes `prefix` digits with a Luhn check digit.
fn with_luhn_digit(prefix: &[u8]) -> Vec<u8> {
    (0..10)
        .map(|check| {
            let mut digits = prefix.to_vec();
            digits.push(check);
            digits
        })
        .find(|digits| super::numbers::luhn(digits))
        .unwrap_or_default()
}

/// Completes a German BBAN with IBAN check digits.
fn german_iban(bban: &str) -> String {
    let rearranged: String = format!("{bban}DE00")
        .chars()
        .map(|character| match character.to_digit(36) {
            Some(value) => value.to_string(),
            None => String::new(),
        })
        .collect();
    let remainder = rearranged.bytes().fold(0_u32, |remainder, digit| {
        (remainder * 10 + u32::from(digit - b'0')) % 97
    });
    format!("DE{:02}{bban}", 98 - remainder)
}

fn arbitrary_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9a-fA-FXYZ@.:=+ \\-/;&()'\"_eyJ\n]{0,120}",
        "(4111|DE89|AKIA|eyJ|-----BEGIN |password=|sv=|::|\\+44|[0-9]{1,5}| |-|\\.|@|é|€|:)*",
        // Runs of short digit groups: more groups than a number has (`1 2 3 4 5 6 7 8 9 10`).
        "[a-z ]{0,3}([0-9]{1,3}[ .\\-]){0,14}[0-9]{1,3}[a-z ]{0,3}",
        "(4111|DE89|[0-9]{1,5}|\u{a0}|\u{200b}|\u{2013}|\u{ff14}|\u{ff20}|\u{e0041}|\u{1d7ce}|a|@|\\.| )*",
        // Escapes, and base64 of text with values in it, cut and joined anywhere.
        "(%40|%20|%4|&#64;|&#x2e;|&commat;|&|\\[at\\]|\\(dot\\)| \\[|jane|\\.com|4111|é|\
          eyJjYXJkIjogIjQxMTEgMTExMSAxMTExIDExMTEiLCAiZXhwIjogIjEyLzI5In0=|\
          bmFtZSxlbWFpbApKYW5lIERvZSxqYW5lLmRvZUBjb250b3NvLmNvbQo|\
          VTFOT0lEVXpOaTB5TWkweE1qTTBJRzl1SUdacGJHVT0=|[A-Za-z0-9+/]{1,30}|=|==)*",
    ]
}

proptest! {
    #[test]
    fn scanning_never_panics_and_spans_are_sorted_disjoint_char_boundaries(text in arbitrary_text()) {
        let findings = custom().scan(&text);
        let mut previous_end = 0;
        for finding in &findings {
            prop_assert!(finding.span.start >= previous_end, "{findings:?}");
            prop_assert!(finding.span.start < finding.span.end);
            prop_assert!(finding.span.end <= text.len());
            prop_assert!(text.is_char_boundary(finding.span.start));
            prop_assert!(text.is_char_boundary(finding.span.end));
            prop_assert!(finding.confidence > 0.0 && finding.confidence <= 1.0);
            previous_end = finding.span.end;
        }
    }

    #[test]
    fn every_luhn_valid_visa_is_found_in_prose(
        body in proptest::collection::vec(0_u8..10, 14),
        before in "[a-z ]{0,20}",
        after in "[a-z ]{0,20}",
        spaced in any::<bool>(),
    ) {
        let mut prefix = vec![4];
        prefix.extend(body);
        let digits: String = with_luhn_digit(&prefix).iter().map(|digit| char::from(b'0' + digit)).collect();
        prop_assume!(!digits.bytes().all(|digit| digit == digits.as_bytes()[0]));
        let number = if spaced {
            digits.as_bytes().chunks(4).map(|chunk| String::from_utf8_lossy(chunk).into_owned()).collect::<Vec<_>>().join(" ")
        } else {
            digits
        };
        let text = format!("{before} {number} {after}");
        let findings = Recognizers::default().scan(&text);
        prop_assert!(
            findings.iter().any(|finding| finding.entity == EntityType::CreditCard && text[finding.span.clone()] == number),
            "{text:?}: {findings:?}"
        );
    }

    #[test]
    fn a_luhn_valid_visa_in_look_alike_characters_is_found_as_written(
        body in proptest::collection::vec(0_u8..10, 14),
        zero in prop::sample::select(vec!['0', '\u{ff10}', '\u{0660}', '\u{0966}', '\u{1d7ce}', '\u{e0030}']),
        separator in prop::sample::select(vec!["", " ", "\u{a0}", "\u{202f}", "\u{200b}", "-", "\u{2013}", "\u{2011}"]),
    ) {
        let mut prefix = vec![4];
        prefix.extend(body);
        let digits = with_luhn_digit(&prefix);
        prop_assume!(!digits.iter().all(|digit| *digit == digits[0]));
        let number = digits
            .chunks(4)
            .map(|chunk| {
                chunk
                    .iter()
                    .filter_map(|digit| char::from_u32(u32::from(zero) + u32::from(*digit)))
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join(separator);
        let text = format!("pay with {number} today");
        let findings = Recognizers::default().scan(&text);
        prop_assert!(
            findings.iter().any(|finding| finding.entity == EntityType::CreditCard && text[finding.span.clone()] == number),
            "{text:?}: {findings:?}"
        );
    }

    #[test]
    fn every_valid_german_iban_is_found_and_a_changed_digit_is_not(
        bban in "[0-9]{18}",
        position in 4_usize..22,
        delta in 1_u8..10,
    ) {
        let iban = german_iban(&bban);
        let findings = Recognizers::default().scan(&format!("IBAN {iban}."));
        prop_assert_eq!(findings.len(), 1);
        prop_assert_eq!(&findings[0].entity, &EntityType::Iban);
        let mut changed = iban.into_bytes();
        changed[position] = b'0' + (changed[position] - b'0' + delta) % 10;
        let changed = String::from_utf8(changed).unwrap_or_default();
        let findings = Recognizers::default().scan(&format!("IBAN {changed}."));
        prop_assert!(findings.iter().all(|finding| finding.entity != EntityType::Iban), "{changed}");
    }
}

proptest! {
    #[test]
    fn overlaps_resolve_as_the_greedy_rule_says(
        spans in proptest::collection::vec((0_usize..60, 1_usize..12, 0_u8..3), 0..40)
    ) {
        let findings: Vec<super::Finding> = spans
            .iter()
            .map(|&(start, length, confidence)| super::Finding {
                entity: EntityType::Email,
                span: start..start + length,
                confidence: 0.5 + f32::from(confidence) / 4.0,
            })
            .collect();
        // The rule, pairwise: in order of preference (more confident, longer, earlier), each
        // finding is kept unless it overlaps one kept before it.
        let mut preferred = findings.clone();
        preferred.sort_by(|left, right| {
            right
                .confidence
                .total_cmp(&left.confidence)
                .then_with(|| right.span.len().cmp(&left.span.len()))
                .then_with(|| left.span.start.cmp(&right.span.start))
        });
        let mut reference: Vec<super::Finding> = Vec::new();
        for finding in preferred {
            if reference.iter().all(|kept| {
                kept.span.end <= finding.span.start || finding.span.end <= kept.span.start
            }) {
                reference.push(finding);
            }
        }
        reference.sort_by_key(|finding| finding.span.start);
        let spans_of = |findings: &[super::Finding]| -> Vec<(std::ops::Range<usize>, u32)> {
            findings
                .iter()
                .map(|finding| (finding.span.clone(), finding.confidence.to_bits()))
                .collect()
        };
        prop_assert_eq!(
            spans_of(&super::resolve_overlaps(findings.clone())),
            spans_of(&reference)
        );

        let index = super::SpanIndex::new(findings.iter().map(|finding| finding.span.clone()));
        for start in 0..75 {
            for length in 1..6 {
                let range = start..start + length;
                prop_assert_eq!(
                    index.overlaps(&range),
                    findings
                        .iter()
                        .any(|finding| finding.span.start < range.end && range.start < finding.span.end),
                    "{:?}", range
                );
            }
        }
    }
}

#[test]
fn a_private_key_without_its_end_may_go_on_in_the_next_text() {
    let recognizers = Recognizers::default();
    let may_continue = |text: &str| -> Vec<bool> {
        recognizers
            .scan(text)
            .iter()
            .map(|finding| finding.may_continue(text))
            .collect()
    };
    let begin = "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1c7+9z5Pad7OejecsQ0bu\n";
    assert_eq!(may_continue(begin), [true]);
    assert_eq!(
        may_continue(&format!(
            "{begin}Wq3vXr8sT2yZ0bLk\n-----END RSA PRIVATE KEY-----\nthanks"
        )),
        [false]
    );
    assert_eq!(
        may_continue(
            "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nPrivate-Lines: 1\nAAAAIGx"
        ),
        [true]
    );
    // Other values end where they were found.
    assert_eq!(may_continue("mail jane.doe@contoso.com"), [false]);
}

#[test]
fn script_variables_are_not_passwords_and_a_template_must_end_its_value() {
    check(
        r#"
        $password = $this->getPassword();
        $password = $env:DB_PASSWORD
        my $password = $ENV{DB_PASSWORD};
        environment: password=$$DB_PASSWORD
        password=${Summer}2024! and password is <Summer2024! see <docs>
        "#,
        expect![[r#"
            $password = $this->getPassword();
                -
            $password = $env:DB_PASSWORD
                -
            my $password = $ENV{DB_PASSWORD};
                -
            environment: password=$$DB_PASSWORD
                -
            password=${Summer}2024! and password is <Summer2024! see <docs>
                secret `${Summer}2024!` 0.8
                secret `<Summer2024!` 0.8
        "#]],
    );
}
