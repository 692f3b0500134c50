#!/usr/bin/env python3
"""PII quality of Isthmus's recognizers against Microsoft Presidio, on one labelled set.

The set: presidio-evaluator's sentence faker (fixed seed) plus deterministic hard negatives
(Luhn-invalid card numbers, IBANs with wrong check digits, order ids, version strings, dates,
phone-like numbers in prose, UUIDs, hashes, sample SSNs). Both sides see the same texts and
are scored on the entity types both recognize: CREDIT_CARD, IBAN_CODE, US_SSN,
EMAIL_ADDRESS, PHONE_NUMBER, IP_ADDRESS.

- Presidio: presidio-analyzer's predefined recognizers with a blank spaCy pipeline (pattern
  recognizers only; no NER model), asked for those six types, default score threshold.
- Isthmus: `router-policies/examples/scan_jsonl.rs` (the built-in recognizers).

A prediction is a true positive when it overlaps a not yet matched gold span of the same
type. Document level: a document "must stay local" when it holds any gold entity of the six
types; it stays local when the recognizer reports any of the six types in it.

Usage (from the repository root):
    python3 -m venv /var/cache/isthmus/pii-venv
    /var/cache/isthmus/pii-venv/bin/pip install presidio-analyzer presidio-evaluator
    /var/cache/isthmus/pii-venv/bin/python bench/pii/compare.py [--samples 6000] [--seed 42]
Writes bench/pii/RESULTS.md and prints it.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TYPES = ["CREDIT_CARD", "IBAN_CODE", "US_SSN", "EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS"]
OURS = {
    "credit_card": "CREDIT_CARD",
    "iban": "IBAN_CODE",
    "us_ssn": "US_SSN",
    "email": "EMAIL_ADDRESS",
    "phone": "PHONE_NUMBER",
    "ip_address": "IP_ADDRESS",
}


# ---------------------------------------------------------------- the labelled set


def faker_documents(samples, seed):
    from presidio_evaluator.data_generator import PresidioSentenceFaker

    # Some providers draw from the global generators; seed them too.
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass
    faker = PresidioSentenceFaker("en_US", lower_case_ratio=0.05, random_seed=seed)
    documents = []
    for record in faker.generate_new_fake_sentences(num_samples=samples):
        spans = [
            (span.entity_type, span.start_position, span.end_position)
            for span in record.spans
            if span.entity_type in TYPES
        ]
        documents.append({"text": record.full_text, "gold": spans, "source": "faker"})
    return documents


def luhn_digit(digits):
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return (10 - total % 10) % 10


def iban_check(country, bban):
    rearranged = "".join(str(int(c, 36)) for c in bban + country + "00")
    return 98 - int(rearranged) % 97


def hard_negatives(seed, count):
    """Texts with no entity of the six types that look like one."""
    rng = random.Random(seed)
    digits = lambda n: "".join(rng.choice("0123456789") for _ in range(n))
    hexes = lambda n: "".join(rng.choice("0123456789abcdef") for _ in range(n))

    def bad_card():
        prefix = rng.choice(["4", "51", "37", "6011"])
        length = 15 if prefix == "37" else 16
        body = [int(c) for c in prefix + digits(length - 1 - len(prefix))]
        wrong = (luhn_digit(body) + rng.randint(1, 9)) % 10
        number = "".join(map(str, body)) + str(wrong)
        if rng.random() < 0.5 and len(number) == 16:
            number = " ".join(number[i : i + 4] for i in range(0, 16, 4))
        return number

    def bad_iban():
        country, length = rng.choice([("DE", 22), ("GB", 22), ("FR", 27), ("NL", 18), ("ES", 24)])
        bban = digits(length - 4)
        check = (iban_check(country, bban) + rng.randint(1, 90)) % 97
        return f"{country}{check:02d}{bban}"

    templates = [
        lambda: f"Card number {bad_card()} was declined: the checksum is wrong.",
        lambda: f"The test number {bad_card()} fails validation on purpose.",
        lambda: f"Please check IBAN {bad_iban()}, the bank says it is invalid.",
        lambda: f"Your order ORD-{rng.randint(2019, 2025)}-{digits(6)} has shipped.",
        lambda: f"Invoice INV-{digits(5)}-{rng.randint(2019, 2025)} is overdue by {rng.randint(2, 60)} days.",
        lambda: f"Upgrade from version {rng.randint(1, 12)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}.{rng.randint(0, 999)} to the latest release.",
        lambda: f"Build {rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)} fixed the crash; v{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 9)} is next.",
        lambda: f"The meeting moved from {rng.randint(2019, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} to {rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(2019, 2025)} at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}.",
        lambda: f"We sold {rng.randint(1, 9)} {digits(3)} {digits(3)} units in {rng.randint(2015, 2024)}, up {rng.randint(1, 40)}.{rng.randint(0, 9)}%.",
        lambda: f"The population grew to {rng.randint(1, 99)},{digits(3)},{digits(3)} and the budget to ${rng.randint(1, 999)},{digits(3)}.{digits(2)}.",
        lambda: f"Ticket {digits(10)} was closed after {rng.randint(2, 9)} {digits(3)} messages.",
        lambda: f"Request id {hexes(8)}-{hexes(4)}-4{hexes(3)}-a{hexes(3)}-{hexes(12)} failed with status 500.",
        lambda: f"Revert commit {hexes(40)} and cherry-pick {hexes(7)}.",
        lambda: f"The file's sha256 is {hexes(64)}.",
        lambda: f"The SSN in the example, {rng.choice(['078-05-1120', '219-09-9999', '123-45-6789', '000-12-3456', '666-12-3456', '912-34-5678'])}, is not a real one.",
        lambda: f"ISBN 978-{rng.randint(0, 9)}-{digits(2)}-{digits(6)}-{rng.randint(0, 9)} is on page {rng.randint(1, 999)}.",
        lambda: f"Set timeout to {rng.randint(100, 99999)} ms and retries to {rng.randint(1, 9)}; port {rng.randint(1024, 65535)}.",
        lambda: f"Coordinates {rng.uniform(-90, 90):.6f}, {rng.uniform(-180, 180):.6f} mark the site.",
        lambda: f"Serial {digits(4)}-{digits(4)}-{digits(4)} belongs to the router, model X{digits(3)}.",
        lambda: f"The OID is 1.3.6.1.4.1.{digits(5)}.{rng.randint(1, 9)} in the MIB.",
    ]
    documents = []
    for index in range(count):
        text = templates[index % len(templates)]()
        documents.append({"text": text, "gold": [], "source": "hard_negative"})
    return documents


# ---------------------------------------------------------------- the recognizers


def run_presidio(documents):
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    blank = Path(tempfile.mkdtemp()) / "blank_en"
    spacy.blank("en").to_disk(blank)
    provider = NlpEngineProvider(
        nlp_configuration={
            "nlp_engine_name": "spacy",
            "models": [{"lang_code": "en", "model_name": str(blank)}],
        }
    )
    analyzer = AnalyzerEngine(nlp_engine=provider.create_engine(), supported_languages=["en"])
    started = time.perf_counter()
    predictions = []
    for document in documents:
        results = analyzer.analyze(text=document["text"], language="en", entities=TYPES)
        predictions.append([(result.entity_type, result.start, result.end) for result in results])
    return predictions, time.perf_counter() - started


def run_isthmus(documents):
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", "/var/cache/isthmus/target")
    subprocess.run(
        ["cargo", "build", "--workspace", "--example", "scan_jsonl", "--quiet"],
        cwd=ROOT,
        env=env,
        check=True,
    )
    binary = Path(env["CARGO_TARGET_DIR"]) / "debug" / "examples" / "scan_jsonl"
    lines = "".join(json.dumps({"text": document["text"]}) + "\n" for document in documents)
    started = time.perf_counter()
    output = subprocess.run([binary], input=lines, capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - started
    predictions = []
    for document, line in zip(documents, output.splitlines()):
        encoded = document["text"].encode()
        spans = []
        for finding in json.loads(line)["findings"]:
            if finding["entity"] not in OURS:
                continue
            # Byte offsets to character offsets.
            start = len(encoded[: finding["start"]].decode())
            end = len(encoded[: finding["end"]].decode())
            spans.append((OURS[finding["entity"]], start, end))
        predictions.append(spans)
    return predictions, elapsed


# ---------------------------------------------------------------- scoring


def score(documents, predictions):
    counts = defaultdict(Counter)
    errors = defaultdict(list)
    local = Counter()
    for document, predicted in zip(documents, predictions):
        gold = list(document["gold"])
        matched = [False] * len(gold)
        for kind, start, end in predicted:
            hit = next(
                (
                    index
                    for index, (gold_kind, gold_start, gold_end) in enumerate(gold)
                    if not matched[index] and gold_kind == kind and start < gold_end and gold_start < end
                ),
                None,
            )
            if hit is None:
                counts[kind]["fp"] += 1
                errors[kind].append(("fp", document["text"][start:end], document["text"]))
            else:
                matched[hit] = True
                counts[kind]["tp"] += 1
        for index, (kind, start, end) in enumerate(gold):
            if not matched[index]:
                counts[kind]["fn"] += 1
                errors[kind].append(("fn", document["text"][start:end], document["text"]))
        sensitive = bool(gold)
        flagged = bool(predicted)
        local[("sensitive" if sensitive else "clean", flagged)] += 1
    return counts, errors, local


def ratio(numerator, denominator):
    return numerator / denominator if denominator else float("nan")


def prf(counter):
    precision = ratio(counter["tp"], counter["tp"] + counter["fp"])
    recall = ratio(counter["tp"], counter["tp"] + counter["fn"])
    f1 = ratio(2 * precision * recall, precision + recall) if precision == precision and recall == recall else float("nan")
    return precision, recall, f1


def report(documents, results, args):
    lines = [
        "# PII recognizers: Isthmus against Presidio",
        "",
        f"Set: {sum(d['source'] == 'faker' for d in documents)} presidio-evaluator sentences "
        f"(seed {args.seed}) + {sum(d['source'] == 'hard_negative' for d in documents)} hard negatives; "
        f"gold entities: {dict(Counter(kind for d in documents for kind, _, _ in d['gold']))}.",
        "Reproduce: `/var/cache/isthmus/pii-venv/bin/python bench/pii/compare.py "
        f"--samples {args.samples} --seed {args.seed}`.",
        "",
        "| entity | Presidio P | Presidio R | Presidio F1 | Isthmus P | Isthmus R | Isthmus F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in TYPES + ["all"]:
        row = [kind]
        for name, (counts, _, _, _) in results.items():
            if kind == "all":
                counter = Counter()
                for value in counts.values():
                    counter.update(value)
            else:
                counter = counts[kind]
            row += [f"{value:.3f}" for value in prf(counter)]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "| document level | Presidio | Isthmus |",
        "|---|---|---|",
    ]
    rows = defaultdict(list)
    for name, (_, _, local, elapsed) in results.items():
        sensitive = local[("sensitive", True)] + local[("sensitive", False)]
        clean = local[("clean", True)] + local[("clean", False)]
        rows["must-stay-local recall"].append(f"{ratio(local[('sensitive', True)], sensitive):.4f} ({local[('sensitive', True)]}/{sensitive})")
        rows["clean documents flagged"].append(f"{ratio(local[('clean', True)], clean):.4f} ({local[('clean', True)]}/{clean})")
        rows["seconds for the set"].append(f"{elapsed:.2f}")
    for label, values in rows.items():
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--negatives", type=int, default=1000)
    parser.add_argument("--errors", type=int, default=0, help="print this many errors per entity and side")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "pii" / "RESULTS.md")
    args = parser.parse_args()
    documents = faker_documents(args.samples, args.seed) + hard_negatives(args.seed, args.negatives)
    results = {}
    for name, run in [("Presidio", run_presidio), ("Isthmus", run_isthmus)]:
        predictions, elapsed = run(documents)
        counts, errors, local = score(documents, predictions)
        results[name] = (counts, errors, local, elapsed)
        for kind in TYPES:
            for error in errors[kind][: args.errors]:
                print(name, kind, error[0], repr(error[1]), "|", repr(error[2][:160]), file=sys.stderr)
    text = report(documents, results, args)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
