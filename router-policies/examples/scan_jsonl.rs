//! Scans JSON lines from standard input with the built-in recognizers and writes one JSON
//! line of findings per input line: the harness of the Presidio comparison (`bench/pii/`).
//!
//! Input: `{"text": "..."}` per line. Output: `{"findings": [{"entity": "email", "start": 5,
//! "end": 21, "confidence": 0.9}]}`, offsets in bytes of the UTF-8 text.

use std::io::{BufRead, BufWriter, Write};

use router_policies::sensitivity::Recognizers;
use serde_json::{Value, json};

fn main() -> std::io::Result<()> {
    let recognizers = Recognizers::default();
    let stdin = std::io::stdin().lock();
    let mut stdout = BufWriter::new(std::io::stdout().lock());
    for line in stdin.lines() {
        let line = line?;
        let input: Value = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        let text = input
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let findings: Vec<Value> = recognizers
            .scan(text)
            .into_iter()
            .map(|finding| {
                json!({
                    "entity": finding.entity.as_str(),
                    "start": finding.span.start,
                    "end": finding.span.end,
                    "confidence": finding.confidence,
                })
            })
            .collect();
        writeln!(stdout, "{}", json!({ "findings": findings }))?;
    }
    stdout.flush()
}
