use std::io::Cursor;

use super::{GgufError, KvCacheType, KvShape, kv_shape};

/// A GGUF header with these metadata pairs (and no tensors).
fn gguf(pairs: &[(&str, Value)]) -> Vec<u8> {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3_u32.to_le_bytes());
    bytes.extend(0_u64.to_le_bytes());
    bytes.extend((pairs.len() as u64).to_le_bytes());
    for (key, value) in pairs {
        string(&mut bytes, key);
        match value {
            Value::U32(number) => {
                bytes.extend(4_u32.to_le_bytes());
                bytes.extend(number.to_le_bytes());
            }
            Value::Text(text) => {
                bytes.extend(8_u32.to_le_bytes());
                string(&mut bytes, text);
            }
            Value::Strings(items) => {
                bytes.extend(9_u32.to_le_bytes());
                bytes.extend(8_u32.to_le_bytes());
                bytes.extend((items.len() as u64).to_le_bytes());
                for item in *items {
                    string(&mut bytes, item);
                }
            }
        }
    }
    bytes
}

enum Value {
    U32(u32),
    Text(&'static str),
    Strings(&'static [&'static str]),
}

fn string(bytes: &mut Vec<u8>, text: &str) {
    bytes.extend((text.len() as u64).to_le_bytes());
    bytes.extend(text.as_bytes());
}

fn smollm2_like() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::Text("llama")),
        ("tokenizer.ggml.tokens", Value::Strings(&["<s>", "a", "b"])),
        ("llama.block_count", Value::U32(30)),
        ("llama.context_length", Value::U32(8192)),
        ("llama.embedding_length", Value::U32(576)),
        ("llama.attention.head_count", Value::U32(9)),
        ("llama.attention.head_count_kv", Value::U32(3)),
    ]
}

#[test]
fn the_kv_shape_comes_from_the_architecture_keys() {
    let shape = kv_shape(&mut Cursor::new(gguf(&smollm2_like()))).unwrap();
    assert_eq!(
        shape,
        KvShape {
            architecture: "llama".to_owned(),
            layers: 30,
            kv_heads: 3,
            key_dim: 64,
            value_dim: 64,
            trained_context_tokens: Some(8192),
        }
    );
    // 2 (K and V) x 30 layers x 3 heads x 64 x 2 bytes = 23,040 bytes per token.
    assert_eq!(shape.kv_bytes(1, KvCacheType::F16), Some(23_040));
    assert_eq!(
        shape.kv_bytes(2048 * 8, KvCacheType::F16),
        Some(377_487_360)
    );
    // q8_0: two blocks of 34 bytes per 64-wide head, 2 x 30 x 3 x 68 = 12,240 bytes.
    assert_eq!(shape.kv_bytes(1, KvCacheType::Q8_0), Some(12_240));
    assert_eq!(shape.kv_bytes(1, KvCacheType::F32), Some(46_080));
    assert_eq!(shape.kv_bytes(1, KvCacheType::Q4_0), Some(6_480));
    // Blocks of 32 do not divide a 48-wide head.
    let narrow = KvShape {
        key_dim: 48,
        value_dim: 48,
        ..shape
    };
    assert_eq!(narrow.kv_bytes(1, KvCacheType::Q8_0), None);
    assert_eq!(narrow.kv_bytes(1, KvCacheType::F16), Some(17_280));
}

#[test]
fn kv_cache_types_are_named_as_llama_cpp_names_them() {
    for kind in KvCacheType::ALL {
        assert_eq!(KvCacheType::from_name(kind.name()), Some(kind));
    }
    assert_eq!(KvCacheType::from_name("q8"), None);
    assert_eq!(KvCacheType::default(), KvCacheType::F16);
    assert!(KvCacheType::Q8_0.quantized() && !KvCacheType::Bf16.quantized());
}

#[test]
fn explicit_key_and_value_widths_win() {
    let mut pairs = smollm2_like();
    pairs.push(("llama.attention.key_length", Value::U32(128)));
    pairs.push(("llama.attention.value_length", Value::U32(96)));
    let shape = kv_shape(&mut Cursor::new(gguf(&pairs))).unwrap();
    assert_eq!((shape.key_dim, shape.value_dim), (128, 96));
}

#[test]
fn damaged_files_are_errors_not_panics() {
    assert_eq!(
        kv_shape(&mut Cursor::new(b"GGML....".to_vec())),
        Err(GgufError::NotGguf)
    );
    let bytes = gguf(&smollm2_like());
    for cut in [6, 20, 40, bytes.len() - 3] {
        let result = kv_shape(&mut Cursor::new(bytes[..cut].to_vec()));
        assert!(
            matches!(result, Err(GgufError::Malformed(_))),
            "cut at {cut}: {result:?}"
        );
    }
    let without_layers: Vec<_> = smollm2_like()
        .into_iter()
        .filter(|(key, _)| *key != "llama.block_count")
        .collect();
    assert_eq!(
        kv_shape(&mut Cursor::new(gguf(&without_layers))),
        Err(GgufError::Missing("llama.block_count".to_owned()))
    );
    // A huge declared string length is refused before any allocation.
    let mut huge = b"GGUF".to_vec();
    huge.extend(3_u32.to_le_bytes());
    huge.extend(0_u64.to_le_bytes());
    huge.extend(1_u64.to_le_bytes());
    huge.extend(u64::MAX.to_le_bytes());
    assert!(matches!(
        kv_shape(&mut Cursor::new(huge)),
        Err(GgufError::Malformed(_))
    ));
}
