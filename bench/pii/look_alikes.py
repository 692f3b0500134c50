#!/usr/bin/env python3
"""Sensitive values written in look-alike characters: does the scan still find them?

Text pasted from a word processor or a web page carries no-break spaces and en dashes, and a
caller who wants a value past the scan can write it in full-width digits or split it with
zero-width spaces; a model reads all of these. This generates, with a fixed seed, documents
that each hold one valid value (payment card, IBAN, US SSN, e-mail) written in one such way
(or percent-escaped in a pasted link's query, typed in lower case, or grouped with hyphens or
dots),
and as many documents with the same value made invalid (a wrong check digit) in the same way,
runs `isthmus explain` over them (and, with `--presidio`, Presidio's pattern recognizers as
bench/pii/compare.py runs them), and prints, per way of writing, the share of valid documents
found sensitive (must-stay-local recall) and of invalid ones flagged.

    python3 bench/pii/look_alikes.py --isthmus target/release/isthmus \\
        --config deploy/config/demo.toml [--documents 200] [--seed 2026]
    /var/cache/isthmus/pii-venv/bin/python bench/pii/look_alikes.py --presidio ...
"""

import argparse
import json
import random
import subprocess
import sys
import urllib.parse

SEPARATED = ["ascii", "no-break space", "narrow no-break space", "en dash", "zero-width space",
             "soft hyphen", "full-width digits", "arabic-indic digits", "tag characters",
             "url query", "lower case", "hyphens", "dots"]


def luhn_digit(digits: str) -> str:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 0:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return str((10 - total % 10) % 10)


def card(rng: random.Random, valid: bool) -> list[str]:
    body = rng.choice(["4", "51", "52", "53", "54", "55"])
    body += "".join(rng.choice("0123456789") for _ in range(15 - len(body)))
    check = luhn_digit(body)
    if not valid:
        check = str((int(check) + rng.randint(1, 9)) % 10)
    number = body + check
    return [number[i:i + 4] for i in range(0, 16, 4)]


def iban(rng: random.Random, valid: bool) -> list[str]:
    bban = "".join(rng.choice("0123456789") for _ in range(18))
    numeric = int(bban + "131400")  # D=13, E=14, check digits 00
    check = 98 - numeric % 97
    if not valid:
        check = (check + rng.randint(1, 90)) % 97 + 2
    text = f"DE{check:02d}{bban}"
    return [text[i:i + 4] for i in range(0, len(text), 4)]


def ssn(rng: random.Random, valid: bool) -> list[str]:
    area = rng.choice([a for a in range(1, 900) if a != 666 and a < 900])
    group, serial = rng.randint(1, 99), rng.randint(1, 9999)
    if not valid:
        area = rng.choice([0, 666, rng.randint(900, 999)])
    return [f"{area:03d}", f"{group:02d}", f"{serial:04d}"]


def email(rng: random.Random, valid: bool) -> list[str]:
    user = rng.choice(["jane.doe", "m.mueller", "sam_lee", "a.kowalski", "li.wei"])
    domain = rng.choice(["contoso.com", "fabrikam.de", "example.org", "northwind.co.uk"])
    return [user, "@" if valid else " at ", domain]


KINDS = {"card": (card, " "), "iban": (iban, " "), "ssn": (ssn, "-"), "email": (email, "")}


def digits_in(text: str, zero: int) -> str:
    return "".join(chr(zero + int(c)) if c.isdigit() else c for c in text)


def write(parts: list[str], separator: str, way: str) -> str:
    if way == "ascii":
        return separator.join(parts)
    if way == "no-break space":
        return (separator if separator != " " else "\u00a0").join(parts)
    if way == "narrow no-break space":
        return (separator if separator != " " else "\u202f").join(parts)
    if way == "en dash":
        return ("\u2013" if separator == "-" else separator).join(parts)
    if way == "zero-width space":
        return (separator + "\u200b" if separator else "\u200b").join(parts)
    if way == "soft hyphen":
        return (separator + "\u00ad").join(parts)
    if way == "full-width digits":
        return digits_in(separator.join(parts), 0xFF10).replace("@", "\uff20")
    if way == "arabic-indic digits":
        return digits_in(separator.join(parts), 0x0660)
    if way == "tag characters":
        return "".join(chr(0xE0000 + ord(c)) for c in separator.join(parts))
    if way == "lower case":
        return separator.join(parts).lower()
    if way in ("hyphens", "dots"):
        # Every group joined by the one mark (an e-mail address has no groups to join).
        mark = "-" if way == "hyphens" else "."
        return (mark if separator.strip() in ("", "-") and separator else separator).join(parts)
    if way == "url query":
        # Pasted as part of a link: percent-escaped as a browser writes a query value.
        return "https://portal.example/find?q=" + urllib.parse.quote(separator.join(parts), safe="")
    raise ValueError(way)


TEMPLATES = [
    "Please update the record: {value}. Thanks!",
    "Customer wrote: my details are {value} — can you check the refund?",
    "Summarise this ticket. Reference {value} was used at checkout.",
]


def presidio_flags(texts: list[str]) -> list[bool]:
    """Presidio's pattern recognizers with a blank spaCy pipeline, as bench/pii/compare.py runs it."""
    import pathlib
    import tempfile

    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    blank = pathlib.Path(tempfile.mkdtemp()) / "blank_en"
    spacy.blank("en").to_disk(blank)
    provider = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": str(blank)}]})
    analyzer = AnalyzerEngine(nlp_engine=provider.create_engine(), supported_languages=["en"])
    entities = ["CREDIT_CARD", "IBAN_CODE", "US_SSN", "EMAIL_ADDRESS"]
    return [bool(analyzer.analyze(text=text, language="en", entities=entities)) for text in texts]


def isthmus_flags(args, texts: list[str]) -> list[bool]:
    lines = "".join(json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": text}]}) + "\n"
                    for text in texts)
    result = subprocess.run([args.isthmus, "explain", "--config", args.config],
                            input=lines, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"isthmus explain failed: {result.stderr}")
    verdicts = [json.loads(line) for line in result.stdout.splitlines()]
    if len(verdicts) != len(texts):
        sys.exit(f"expected {len(texts)} explanations, got {len(verdicts)}")
    return [bool(verdict.get("sensitive")) for verdict in verdicts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isthmus", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--documents", type=int, default=200, help="valid documents per way of writing")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--presidio", action="store_true",
                        help="also run Presidio (presidio-analyzer installed in this Python)")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    rows = []
    for way in SEPARATED:
        for index in range(args.documents):
            kind = list(KINDS)[index % len(KINDS)]
            make, separator = KINDS[kind]
            for valid in (True, False):
                value = write(make(rng, valid), separator, way)
                text = rng.choice(TEMPLATES).format(value=value)
                rows.append((way, kind, valid, text))
    texts = [text for _, _, _, text in rows]
    contenders = [("Isthmus", isthmus_flags(args, texts))]
    if args.presidio:
        contenders.insert(0, ("Presidio", presidio_flags(texts)))

    def cell(flags, way, valid):
        chosen = [flag for (row_way, _, row_valid, _), flag in zip(rows, flags)
                  if row_valid == valid and (way is None or row_way == way)]
        return f"{sum(chosen) / len(chosen):.3f} ({sum(chosen)}/{len(chosen)})"

    print("| written with | " + " | ".join(f"{name}: valid found (recall) | {name}: invalid flagged"
                                          for name, _ in contenders) + " |")
    print("|---|" + "---|---|" * len(contenders))
    for way in SEPARATED + [None]:
        cells = " | ".join(f"{cell(flags, way, True)} | {cell(flags, way, False)}" for _, flags in contenders)
        print(f"| {way or 'all'} | {cells} |")


if __name__ == "__main__":
    main()
