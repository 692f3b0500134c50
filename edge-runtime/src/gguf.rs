//! Reads the metadata of a GGUF model file without loading the model, to size its KV cache
//! before anything is allocated (and so that `isthmus check-config` can refuse a context that
//! cannot fit).
//!
//! The file is untrusted input: every length is bounded before it is used. GGUF stores its
//! metadata pairs in no particular order, so all of them are walked; values that are not
//! needed (the tokenizer's large arrays) are skipped without being read into memory.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
/// Longest key or string value we read; tokenizer strings are far shorter.
const STRING_BYTES_MAX: u64 = 1 << 20;
/// Most metadata pairs we walk.
const PAIRS_MAX: u64 = 1 << 16;

/// Why metadata could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    #[error("{0}")]
    Io(String),
    #[error("not a GGUF file")]
    NotGguf,
    #[error("unsupported GGUF version {0}")]
    Version(u32),
    #[error("malformed GGUF metadata: {0}")]
    Malformed(String),
    #[error("GGUF metadata lacks `{0}`")]
    Missing(String),
}

/// The attention shape of a model, what its KV cache size depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvShape {
    pub architecture: String,
    pub layers: u64,
    pub kv_heads: u64,
    /// Width of one key head.
    pub key_dim: u64,
    /// Width of one value head.
    pub value_dim: u64,
    pub trained_context_tokens: Option<u64>,
}

/// How the KV cache stores its elements: llama.cpp's f16 by default; the quantized types
/// store blocks of 32 values with a scale (`q8_0`: 34 bytes per 32 values, about half of
/// f16) and need flash attention for V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheType {
    F32,
    #[default]
    F16,
    Bf16,
    Q8_0,
    Q5_1,
    Q5_0,
    Q4_1,
    Q4_0,
    Iq4Nl,
}

impl KvCacheType {
    pub const ALL: [KvCacheType; 9] = [
        KvCacheType::F32,
        KvCacheType::F16,
        KvCacheType::Bf16,
        KvCacheType::Q8_0,
        KvCacheType::Q5_1,
        KvCacheType::Q5_0,
        KvCacheType::Q4_1,
        KvCacheType::Q4_0,
        KvCacheType::Iq4Nl,
    ];

    /// The name in configuration files, as llama.cpp's tools spell it.
    pub fn name(self) -> &'static str {
        match self {
            KvCacheType::F32 => "f32",
            KvCacheType::F16 => "f16",
            KvCacheType::Bf16 => "bf16",
            KvCacheType::Q8_0 => "q8_0",
            KvCacheType::Q5_1 => "q5_1",
            KvCacheType::Q5_0 => "q5_0",
            KvCacheType::Q4_1 => "q4_1",
            KvCacheType::Q4_0 => "q4_0",
            KvCacheType::Iq4Nl => "iq4_nl",
        }
    }

    pub fn from_name(name: &str) -> Option<KvCacheType> {
        KvCacheType::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
    }

    /// (values per block, bytes per block), as ggml lays them out.
    pub fn block(self) -> (u64, u64) {
        match self {
            KvCacheType::F32 => (1, 4),
            KvCacheType::F16 | KvCacheType::Bf16 => (1, 2),
            KvCacheType::Q8_0 => (32, 34),
            KvCacheType::Q5_1 => (32, 24),
            KvCacheType::Q5_0 => (32, 22),
            KvCacheType::Q4_1 => (32, 20),
            KvCacheType::Q4_0 | KvCacheType::Iq4Nl => (32, 18),
        }
    }

    /// Stored in blocks with scales: V then needs flash attention.
    pub fn quantized(self) -> bool {
        self.block().0 > 1
    }

    /// Bytes of one row of `values` values; `None` when blocks do not divide the row.
    pub fn row_bytes(self, values: u64) -> Option<u64> {
        let (per_block, bytes) = self.block();
        values
            .is_multiple_of(per_block)
            .then(|| values / per_block * bytes)
    }
}

impl KvShape {
    /// KV cache bytes for `tokens` cells stored as `kind`: the usual 2 × layers × KV heads ×
    /// head dim × tokens × bytes per element, with K and V widths counted separately and a
    /// quantized type's blocks counted whole. `None` when `kind`'s blocks do not divide a
    /// head (llama.cpp refuses such a cache).
    pub fn kv_bytes(&self, tokens: u64, kind: KvCacheType) -> Option<u64> {
        let per_head = kind
            .row_bytes(self.key_dim)?
            .saturating_add(kind.row_bytes(self.value_dim)?);
        Some(
            self.layers
                .saturating_mul(self.kv_heads)
                .saturating_mul(per_head)
                .saturating_mul(tokens),
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Unsigned(u64),
    Signed(i64),
    Text(String),
    Other,
}

/// Reads the KV shape of the GGUF file at `path`.
pub fn read_kv_shape(path: &Path) -> Result<KvShape, GgufError> {
    let file = std::fs::File::open(path).map_err(|error| GgufError::Io(error.to_string()))?;
    kv_shape(&mut BufReader::new(file))
}

/// Reads the KV shape from GGUF bytes.
pub fn kv_shape<R: Read + Seek>(reader: &mut R) -> Result<KvShape, GgufError> {
    let metadata = read_metadata(reader)?;
    let text = |key: &str| match metadata.get(key) {
        Some(Scalar::Text(value)) => Ok(value.clone()),
        _ => Err(GgufError::Missing(key.to_owned())),
    };
    let number = |key: &str| match metadata.get(key) {
        Some(Scalar::Unsigned(value)) => Some(*value),
        Some(Scalar::Signed(value)) => u64::try_from(*value).ok(),
        _ => None,
    };
    let architecture = text("general.architecture")?;
    let required = |suffix: &str| {
        let key = format!("{architecture}.{suffix}");
        number(&key).ok_or(GgufError::Missing(key))
    };
    let layers = required("block_count")?;
    let heads = required("attention.head_count")?;
    let kv_heads = number(&format!("{architecture}.attention.head_count_kv")).unwrap_or(heads);
    let embedding = required("embedding_length")?;
    if heads == 0 {
        return Err(GgufError::Malformed("attention.head_count is 0".to_owned()));
    }
    let head_dim = embedding / heads;
    let key_dim = number(&format!("{architecture}.attention.key_length")).unwrap_or(head_dim);
    let value_dim = number(&format!("{architecture}.attention.value_length")).unwrap_or(head_dim);
    Ok(KvShape {
        trained_context_tokens: number(&format!("{architecture}.context_length")),
        architecture,
        layers,
        kv_heads,
        key_dim,
        value_dim,
    })
}

fn read_metadata<R: Read + Seek>(reader: &mut R) -> Result<HashMap<String, Scalar>, GgufError> {
    let mut magic = [0_u8; 4];
    read_exact(reader, &mut magic)?;
    if &magic != MAGIC {
        return Err(GgufError::NotGguf);
    }
    let version = read_u32(reader)?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    let _tensors = read_u64(reader)?;
    let pairs = read_u64(reader)?;
    if pairs > PAIRS_MAX {
        return Err(GgufError::Malformed(format!("{pairs} metadata pairs")));
    }
    let mut metadata = HashMap::new();
    for _ in 0..pairs {
        let key = read_string(reader)?;
        let kind = read_u32(reader)?;
        let value = read_value(reader, kind)?;
        metadata.insert(key, value);
    }
    Ok(metadata)
}

fn read_value<R: Read + Seek>(reader: &mut R, kind: u32) -> Result<Scalar, GgufError> {
    Ok(match kind {
        0 => Scalar::Unsigned(u64::from(read_array::<1, _>(reader)?[0])),
        1 => Scalar::Signed(i64::from(read_array::<1, _>(reader)?[0] as i8)),
        2 => Scalar::Unsigned(u64::from(u16::from_le_bytes(read_array(reader)?))),
        3 => Scalar::Signed(i64::from(i16::from_le_bytes(read_array(reader)?))),
        4 => Scalar::Unsigned(u64::from(read_u32(reader)?)),
        5 => Scalar::Signed(i64::from(i32::from_le_bytes(read_array(reader)?))),
        6 | 7 => {
            skip(reader, if kind == 6 { 4 } else { 1 })?;
            Scalar::Other
        }
        8 => Scalar::Text(read_string(reader)?),
        9 => {
            let element = read_u32(reader)?;
            let count = read_u64(reader)?;
            skip_array(reader, element, count)?;
            Scalar::Other
        }
        10 => Scalar::Unsigned(read_u64(reader)?),
        11 => Scalar::Signed(i64::from_le_bytes(read_array(reader)?)),
        12 => {
            skip(reader, 8)?;
            Scalar::Other
        }
        other => return Err(GgufError::Malformed(format!("value type {other}"))),
    })
}

fn skip_array<R: Read + Seek>(reader: &mut R, element: u32, count: u64) -> Result<(), GgufError> {
    let width = match element {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => {
            for _ in 0..count {
                let length = read_u64(reader)?;
                if length > STRING_BYTES_MAX {
                    return Err(GgufError::Malformed(format!("string of {length} bytes")));
                }
                skip(reader, length)?;
            }
            return Ok(());
        }
        other => {
            return Err(GgufError::Malformed(format!("array of value type {other}")));
        }
    };
    let bytes = count
        .checked_mul(width)
        .ok_or_else(|| GgufError::Malformed(format!("array of {count} elements")))?;
    skip(reader, bytes)
}

fn skip<R: Read + Seek>(reader: &mut R, bytes: u64) -> Result<(), GgufError> {
    let offset =
        i64::try_from(bytes).map_err(|_| GgufError::Malformed("offset too large".to_owned()))?;
    reader
        .seek(SeekFrom::Current(offset))
        .map_err(|error| GgufError::Io(error.to_string()))?;
    Ok(())
}

fn read_exact<R: Read>(reader: &mut R, buffer: &mut [u8]) -> Result<(), GgufError> {
    reader
        .read_exact(buffer)
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                GgufError::Malformed("truncated metadata".to_owned())
            }
            _ => GgufError::Io(error.to_string()),
        })
}

fn read_array<const N: usize, R: Read>(reader: &mut R) -> Result<[u8; N], GgufError> {
    let mut buffer = [0_u8; N];
    read_exact(reader, &mut buffer)?;
    Ok(buffer)
}

fn read_u32<R: Read>(reader: &mut R) -> Result<u32, GgufError> {
    Ok(u32::from_le_bytes(read_array(reader)?))
}

fn read_u64<R: Read>(reader: &mut R) -> Result<u64, GgufError> {
    Ok(u64::from_le_bytes(read_array(reader)?))
}

fn read_string<R: Read>(reader: &mut R) -> Result<String, GgufError> {
    let length = read_u64(reader)?;
    if length > STRING_BYTES_MAX {
        return Err(GgufError::Malformed(format!("string of {length} bytes")));
    }
    let mut bytes = vec![0_u8; usize::try_from(length).unwrap_or(0)];
    read_exact(reader, &mut bytes)?;
    String::from_utf8(bytes).map_err(|_| GgufError::Malformed("string is not UTF-8".to_owned()))
}

#[cfg(test)]
mod tests;
