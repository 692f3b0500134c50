use std::fmt::Write as _;

use expect_test::{Expect, expect};
use proptest::prelude::*;

use super::{
    CUE_LETTERS_MAX, CUE_WORDS, ComplexityFacts, ComplexityModel, FEATURE_COUNT, FEATURE_NAMES,
    WEIGHT_ABS_MAX, WEIGHTS_HEADER, cue, features,
};

/// The non-zero features of `facts`, one `name value` per line.
fn render_features(facts: &ComplexityFacts<'_>) -> String {
    let mut out = String::new();
    for (name, value) in FEATURE_NAMES.iter().zip(features(facts)) {
        if value != 0.0 {
            let _ = writeln!(out, "{name} {value:.3}");
        }
    }
    out
}

fn check(text: &str, expect: Expect) {
    let facts = ComplexityFacts {
        texts: &[text],
        turns: 1,
        ..ComplexityFacts::default()
    };
    expect.assert_eq(&render_features(&facts));
}

#[test]
fn features_of_prompts() {
    check("", expect![""]);
    check(
        "What is the capital of France?",
        expect![[r#"
            tokens_log 2.140
            sentences_log 0.693
            questions_log 0.693
            mean_word_letters 4.000
            question_words_log 0.693
        "#]],
    );
    check(
        "Olivia has 72 pictures. She put them into 8 albums, then gave 3.5 albums to her friend. \
         How many pictures are left in total?",
        expect![[r#"
            tokens_log 3.466
            sentences_log 1.386
            questions_log 0.693
            digits_share 0.040
            numbers_log 1.386
            mean_word_letters 4.333
            third_person_share 0.143
            multi_step_share 0.143
            question_words_log 0.693
        "#]],
    );
    check(
        "Prove step by step that x^2 + 2x + 1 >= 0 for every real x; explain why.",
        expect![[r#"
            tokens_log 2.944
            sentences_log 0.693
            digits_share 0.056
            numbers_log 1.609
            math_share 0.069
            code_log 0.693
            mean_word_letters 3.385
            multi_step_share 0.077
            reasoning_log 1.609
            question_words_log 0.693
        "#]],
    );
    check(
        "```c\nvoid main() { printf(\"%d\", a->b()); }\n```",
        expect![[r#"
            tokens_log 2.526
            lines_log 1.099
            math_share 0.043
            code_log 2.708
            mean_word_letters 2.571
        "#]],
    );
    check(
        "Scenario 1 | I took my neighbour's bike. Scenario 2 | I did NOT lie.\nA. Wrong, Wrong",
        expect![[r#"
            tokens_log 3.091
            lines_log 0.693
            sentences_log 1.386
            digits_share 0.024
            numbers_log 1.099
            upper_words_share 0.067
            mean_word_letters 3.867
            pipes_log 1.099
            first_person_share 0.200
            parts_log 1.099
            negations_log 0.693
        "#]],
    );
    check(
        "Erklären Sie die Größe 北京",
        expect![[r#"
            tokens_log 2.197
            non_ascii_share 0.375
            mean_word_letters 2.667
        "#]],
    );
}

#[test]
fn cue_table_finds_every_cue_word_and_nothing_else() {
    for (word, expected) in CUE_WORDS {
        assert!(word.len() <= CUE_LETTERS_MAX, "{word:?} is too long");
        assert_eq!(cue(word), Some(*expected), "{word:?}");
        assert_eq!(cue(&word.to_ascii_uppercase()), Some(*expected), "{word:?}");
    }
    for word in [
        "a",
        "the",
        "thence",
        "mys",
        "steppe",
        "printfs",
        "notwithstand",
    ] {
        assert_eq!(cue(word.as_bytes()), None, "{word}");
    }
}

#[test]
fn features_of_request_shape() {
    let render = |turns, max_tokens, tools| {
        render_features(&ComplexityFacts {
            texts: &["Hi", "there"],
            turns,
            max_tokens,
            tools,
        })
    };
    expect![[r#"
        tokens_log 1.012
        mean_word_letters 3.500
    "#]]
    .assert_eq(&render(0, None, 0));
    expect![[r#"
        tokens_log 1.012
        turns_log 1.386
        max_tokens_log 2.773
        tools_log 1.099
        mean_word_letters 3.500
    "#]]
    .assert_eq(&render(4, Some(4096), 2));
    expect![[r#"
        tokens_log 1.012
        max_tokens_log -4.000
        mean_word_letters 3.500
    "#]]
    .assert_eq(&render(1, Some(0), 0));
}

/// A weights file with every weight, `bias` first, and `edit` applied to its lines.
fn weights_text(edit: impl FnOnce(&mut Vec<String>)) -> String {
    let mut lines = vec![
        WEIGHTS_HEADER.to_owned(),
        "# comment".to_owned(),
        String::new(),
    ];
    lines.push("bias -1.5".to_owned());
    lines.extend(FEATURE_NAMES.iter().map(|name| format!("{name} 0.25")));
    edit(&mut lines);
    lines.join("\n")
}

fn check_parse(text: &str, expect: Expect) {
    let actual = match ComplexityModel::parse(text) {
        Ok(model) => format!("ok bias {} tokens_log {}", model.bias(), model.weights()[0]),
        Err(error) => format!("error: {error}"),
    };
    expect.assert_eq(&actual);
}

#[test]
fn parse_weights() {
    check_parse(
        &weights_text(|_| {}),
        expect!["ok bias -1.5 tokens_log 0.25"],
    );
    check_parse(
        "",
        expect![
            "error: line 1 is not the header `isthmus-complexity-weights 1`: not a weights file of this version"
        ],
    );
    check_parse(
        &weights_text(|lines| lines[0] = "isthmus-complexity-weights 2".to_owned()),
        expect![
            "error: line 1 is not the header `isthmus-complexity-weights 1`: not a weights file of this version"
        ],
    );
    check_parse(
        &weights_text(|lines| lines.insert(3, "tokens_log".to_owned())),
        expect!["error: line 4: expected `NAME VALUE`"],
    );
    check_parse(
        &weights_text(|lines| lines.insert(5, "tokens_log 1 2".to_owned())),
        expect!["error: line 6: expected `NAME VALUE`"],
    );
    check_parse(
        &weights_text(|lines| lines.push("prompt_vibes 1.0".to_owned())),
        expect!["error: line 28: unknown weight `prompt_vibes`"],
    );
    check_parse(
        &weights_text(|lines| lines.push("bias 1.0".to_owned())),
        expect!["error: line 28: weight `bias` is given twice"],
    );
    check_parse(
        &weights_text(|lines| lines[4] = "tokens_log one".to_owned()),
        expect!["error: line 5: `one` is not a number between -1000 and 1000"],
    );
    check_parse(
        &weights_text(|lines| lines[4] = "tokens_log NaN".to_owned()),
        expect!["error: line 5: `NaN` is not a number between -1000 and 1000"],
    );
    check_parse(
        &weights_text(|lines| lines[4] = "tokens_log 1e9".to_owned()),
        expect!["error: line 5: `1e9` is not a number between -1000 and 1000"],
    );
    check_parse(
        &weights_text(|lines| {
            lines.remove(6);
        }),
        expect!["error: weight `max_tokens_log` is missing"],
    );
    check_parse(
        &weights_text(|lines| {
            lines.remove(3);
        }),
        expect!["error: weight `bias` is missing"],
    );
}

#[test]
fn builtin_weights_parse_and_name_every_feature() {
    let model = ComplexityModel::builtin();
    assert_eq!(model.weights().len(), FEATURE_COUNT);
    assert!(model.bias().is_finite());
}

fn builtin_score(text: &str) -> f32 {
    ComplexityModel::builtin().score(&ComplexityFacts {
        texts: &[text],
        turns: 1,
        ..ComplexityFacts::default()
    })
}

#[test]
fn complex_prompts_score_above_simple_ones() {
    let simple = builtin_score("What is the capital of France?");
    let complex = builtin_score(
        "A store sells pencils at $3 each and pens at $5 each. Maria buys twice as many pencils \
         as pens, then returns 4 pencils, and spends $62 in total. First write the equations, \
         then solve them step by step: how many pens did she buy, and how much money is left \
         from her $100 after she pays?",
    );
    assert!(
        complex > simple + 0.05,
        "complex prompt scored {complex}, simple one {simple}"
    );
}

/// Weights files with any in-range values.
fn any_weights() -> impl Strategy<Value = ComplexityModel> {
    (
        -WEIGHT_ABS_MAX..=WEIGHT_ABS_MAX,
        prop::array::uniform23(-WEIGHT_ABS_MAX..=WEIGHT_ABS_MAX),
    )
        .prop_map(|(bias, weights)| {
            let mut text = format!("{WEIGHTS_HEADER}\nbias {bias}\n");
            for (name, weight) in FEATURE_NAMES.iter().zip(weights) {
                let _ = writeln!(text, "{name} {weight}");
            }
            match ComplexityModel::parse(&text) {
                Ok(model) => model,
                Err(error) => panic!("generated weights do not parse: {error}"),
            }
        })
}

proptest! {
    #[test]
    fn features_are_finite_and_scores_in_range(
        texts in prop::collection::vec(any::<String>(), 0..4),
        turns in any::<u32>(),
        max_tokens in any::<Option<u32>>(),
        tools in any::<u32>(),
        model in any_weights(),
    ) {
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let facts = ComplexityFacts { texts: &texts, turns, max_tokens, tools };
        prop_assert!(features(&facts).iter().all(|value| value.is_finite()));
        for score in [ComplexityModel::builtin().score(&facts), model.score(&facts)] {
            prop_assert!((0.0..=1.0).contains(&score), "score {score}");
        }
    }

    #[test]
    fn long_prompts_keep_features_bounded(
        byte in any::<u8>(),
        length in 0usize..100_000,
    ) {
        let text = String::from_utf8_lossy(&vec![byte; length]).into_owned();
        let facts = ComplexityFacts { texts: &[&text], turns: u32::MAX, max_tokens: Some(u32::MAX), tools: u32::MAX };
        prop_assert!(features(&facts).iter().all(|value| value.is_finite() && value.abs() <= 50.0));
    }
}
