//! Tests of the grammars requests with tools and formats become.

use super::{choice_seed, hoisted, tool_call_grammar};
use crate::openai::{ResponseFormat, Tool, ToolCall};

/// A function whose parameters refer to a local definition, as pydantic writes nested models.
fn tool_with_definitions(name: &str) -> Tool {
    Tool {
        name: name.to_owned(),
        description: None,
        parameters: r##"{"type":"object","properties":{"place":{"$ref":"#/$defs/Place"}},"required":["place"],"$defs":{"Place":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}"##.to_owned(),
    }
}

#[test]
fn local_definitions_move_to_the_root_under_their_own_names() {
    let mut definitions = Vec::new();
    let text = hoisted(
        r##"{"properties":{"a":{"$ref":"#/$defs/A"},"b":{"$ref":"#/definitions/B"}},"$defs":{"A":{"$ref":"#/$defs/B"}},"definitions":{"B":{"type":"string"}}}"##,
        "t3_",
        &mut definitions,
    );
    assert!(text.contains(r##""$ref":"#/$defs/t3_A""##), "{text}");
    assert!(text.contains(r##""$ref":"#/$defs/t3_B""##), "{text}");
    assert_eq!(
        definitions,
        [
            ("t3_A".to_owned(), r##"{"$ref":"#/$defs/t3_B"}"##.to_owned()),
            ("t3_B".to_owned(), r#"{"type":"string"}"#.to_owned()),
        ]
    );
}

#[test]
fn tools_and_a_format_with_local_definitions_make_one_grammar() {
    let call = ToolCall {
        tools: vec![tool_with_definitions("a"), tool_with_definitions("b")],
        text_allowed: true,
        parallel: false,
        legacy: false,
    };
    let format = ResponseFormat::JsonSchema {
        schema: r##"{"type":"object","properties":{"reply":{"$ref":"#/$defs/Reply"}},"required":["reply"],"$defs":{"Reply":{"type":"string"}}}"##.to_owned(),
    };
    let grammar =
        tool_call_grammar(&call, Some(&format)).unwrap_or_else(|error| panic!("{error:?}"));
    assert!(grammar.gbnf().contains("city"), "{}", grammar.gbnf());
}

#[test]
fn the_choices_of_one_request_never_share_a_seed() {
    for seed in [0, 7, u32::MAX - 2, u32::MAX - 1, u32::MAX] {
        let seeds: Vec<u32> = (0..16).map(|choice| choice_seed(seed, choice)).collect();
        let mut distinct = seeds.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), seeds.len(), "seed {seed}: {seeds:?}");
        assert!(!seeds.contains(&u32::MAX), "seed {seed}: {seeds:?}");
    }
    assert_eq!(choice_seed(7, 0), 7);
}
