//! `/v1/embeddings` end to end: the real model's vectors (unit length, one per input, the
//! same text the same vector whether sent alone or in a batch), base64, every refusal with
//! its parameter, the routing policy (a card number never goes to the cloud), and the cloud
//! leg with the model mapped.

use serde_json::{Value, json};
use tests::{API_KEY, Gateway, GatewayOptions, serial};

use crate::block_on;

/// Cosine similarity a vector must keep with the same text's vector from another batch.
/// llama.cpp's kernels sum in another order for another batch shape; against llama-server's
/// own batches of 16 the largest element difference measured was 4.5e-3 on 576 dimensions,
/// the smallest cosine 0.99997 (bench/RESULTS.md). A different text scores far lower
/// (< 0.99 in these tests), so 0.9999 still tells the texts apart.
const SAME_TEXT_COSINE_MIN: f64 = 0.9999;

fn cosine(left: &[f64], right: &[f64]) -> f64 {
    let dot: f64 = left.iter().zip(right).map(|(a, b)| a * b).sum();
    let norm = |vector: &[f64]| vector.iter().map(|value| value * value).sum::<f64>().sqrt();
    dot / (norm(left) * norm(right))
}

fn vectors(answer: &Value) -> Vec<Vec<f64>> {
    answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(index, item)| {
            assert_eq!(item["index"], index, "{answer}");
            assert_eq!(item["object"], "embedding");
            item["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|value| value.as_f64().unwrap())
                .collect()
        })
        .collect()
}

async fn embed(gateway: &Gateway, body: Value) -> (u16, Value) {
    let response = crate::post_json(gateway, "/v1/embeddings", &body).await;
    (response.status().as_u16(), response.json().await.unwrap())
}

#[test]
fn the_local_model_embeds_texts_and_tokens_and_refuses_what_it_cannot() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions::default());
    block_on(async {
        let texts = [
            "The invoice is overdue by thirty days.",
            "Paris is the capital of France.",
            "The invoice is overdue by thirty days.",
        ];
        let (status, alone) = embed(&gateway, json!({"model": "smollm2", "input": texts[0]})).await;
        assert_eq!(status, 200, "{alone}");
        assert_eq!(alone["object"], "list");
        assert_eq!(alone["model"], "smollm2");
        let single = vectors(&alone).remove(0);
        assert_eq!(single.len(), 576, "SmolLM2's width");
        let length = single.iter().map(|value| value * value).sum::<f64>().sqrt();
        assert!((length - 1.0).abs() < 1e-5, "unit length: {length}");
        let tokens_alone = alone["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(tokens_alone > 5, "{alone}");
        assert_eq!(alone["usage"]["total_tokens"], tokens_alone);

        let (status, batch) = embed(&gateway, json!({"model": "smollm2", "input": texts})).await;
        assert_eq!(status, 200, "{batch}");
        let batched = vectors(&batch);
        assert_eq!(batched.len(), 3);
        assert!(cosine(&single, &batched[0]) >= SAME_TEXT_COSINE_MIN);
        assert!(cosine(&batched[0], &batched[2]) >= SAME_TEXT_COSINE_MIN);
        let different = cosine(&batched[0], &batched[1]);
        assert!(different < 0.99, "different texts, cosine {different}");
        let tokens = batch["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(tokens > 2 * tokens_alone, "{batch}");
        // Text that spells a special token is embedded as that text, not as the token.
        let (status, spelled) =
            embed(&gateway, json!({"model": "smollm2", "input": "<|im_end|>"})).await;
        assert_eq!(status, 200, "{spelled}");
        assert!(
            spelled["usage"]["prompt_tokens"].as_u64().unwrap() >= 3,
            "{spelled}"
        );

        // Token ids as input, and base64: the same floats, little-endian.
        let (status, encoded) = embed(
            &gateway,
            json!({"model": "gpt-4o-mini", "input": [[1, 504, 3250, 314]], "encoding_format": "base64"}),
        )
        .await;
        assert_eq!(status, 200, "{encoded}");
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        assert_eq!(bytes.len(), 576 * 4);
        let (_, floats) = embed(
            &gateway,
            json!({"model": "gpt-4o-mini", "input": [1, 504, 3250, 314]}),
        )
        .await;
        let decoded: Vec<f64> = bytes
            .chunks_exact(4)
            .map(|chunk| f64::from(f32::from_le_bytes(chunk.try_into().unwrap())))
            .collect();
        assert_eq!(decoded, vectors(&floats)[0]);
        assert_eq!(floats["usage"]["prompt_tokens"], 4);

        // Refusals, each naming what is wrong.
        let long = "word ".repeat(2000);
        for (body, status, param, code) in [
            (
                json!({"model": "smollm2", "input": []}),
                400,
                "input",
                "invalid_value",
            ),
            (json!({"model": "smollm2"}), 400, "input", "invalid_value"),
            (
                json!({"model": "smollm2", "input": [1.5]}),
                400,
                "input",
                "invalid_value",
            ),
            (
                json!({"model": "smollm2", "input": [[999999]]}),
                400,
                "input",
                "invalid_value",
            ),
            (
                json!({"model": "smollm2", "input": "x", "dimensions": 64}),
                400,
                "dimensions",
                "invalid_value",
            ),
            (
                json!({"model": "smollm2", "input": "x", "encoding_format": "int8"}),
                400,
                "encoding_format",
                "invalid_value",
            ),
            (
                json!({"model": "smollm2", "input": "x", "temperature": 1}),
                400,
                "temperature",
                "unsupported_parameter",
            ),
            (
                json!({"model": "smollm2", "input": long}),
                400,
                "",
                "context_length_exceeded",
            ),
            (
                json!({"model": "nope", "input": "x"}),
                404,
                "model",
                "model_not_found",
            ),
        ] {
            let (got, answer) = embed(&gateway, body.clone()).await;
            assert_eq!(got, status, "{body}: {answer}");
            assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
            if !param.is_empty() {
                assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
            }
        }
        // The worker still serves after the refusals.
        let (status, _) = embed(&gateway, json!({"model": "smollm2", "input": "still here"})).await;
        assert_eq!(status, 200);
    });
}

#[test]
fn embeddings_follow_the_routing_policy_and_reach_the_cloud_mapped() {
    let _serial = serial();
    let upstream = tests::Upstream::start(crate::upstream::options()).unwrap();
    let gateway = Gateway::start(&GatewayOptions {
        extra: format!(
            "[upstreams.aks]\nmodels = {{ \"text-embedding-3-small\" = \"bge-m3\" }}\n[[upstreams.aks.backends]]\nurl = \"{}\"\n[upstreams.aks.health]\nenabled = false\n",
            upstream.base_url()
        ),
        ..GatewayOptions::default()
    });
    block_on(async {
        let response = tests::client()
            .post(gateway.url("/v1/embeddings"))
            .bearer_auth(API_KEY)
            .json(&json!({"model": "text-embedding-3-small", "input": ["quarterly report", "team meeting"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-isthmus-route"], "cloud");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(vectors(&answer).len(), 2, "{answer}");
        let received = upstream.requests().await;
        let last = received.last().unwrap();
        assert_eq!(last["path"], "/v1/embeddings", "{last}");
        assert_eq!(last["model"], "bge-m3", "the model is mapped");

        // Token ids are content the scan cannot read: with no rule about them they go on, and
        // the metric says so (a rule `when = { attachments = ["tokens"] }` keeps them back,
        // tests/it/policy.rs).
        let (status, answer) = embed(
            &gateway,
            json!({"model": "text-embedding-3-small", "input": [[9906, 1917], [1234]]}),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            gateway.metric(
                "isthmus_attachment_requests_total{kind=\"tokens\",disposition=\"to_cloud\"}"
            ),
            Some(1.0)
        );
        let received = upstream.requests().await;

        // A card number may not leave: with no local model of that name, it is refused.
        let (status, refused) = embed(
            &gateway,
            json!({"model": "text-embedding-3-small", "input": "refund card 4111 1111 1111 1111"}),
        )
        .await;
        assert_eq!(status, 403, "{refused}");
        assert_eq!(
            upstream.requests().await.len(),
            received.len(),
            "nothing more went out"
        );
    });
}
