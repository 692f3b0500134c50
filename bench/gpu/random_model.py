#!/usr/bin/env python3
"""Writes llama-architecture GGUF models with random Q4_0 weights, for GPU throughput runs
where a real model file cannot travel. Decode speed depends on the shapes, not on the values.

Two steps, because the tokenizer comes from a real model and the weights are made where they
are used:

    # here, next to the real model (a few MB out):
    python3 bench/gpu/random_model.py tokenizer models/SmolLM2-135M-Instruct.Q4_1.gguf tokenizer.gguf
    # on the GPU host:
    python3 bench/gpu/random_model.py model --shape 135m --tokenizer tokenizer.gguf --out m135.gguf
    python3 bench/gpu/random_model.py model --shape 1b --tokenizer tokenizer.gguf --out m1b.gguf

Needs the `gguf` and `numpy` packages.
"""

import argparse
import sys

import numpy as np

import gguf

# name: (embedding, layers, heads, kv heads, feed-forward)
SHAPES = {
    # SmolLM2-135M.
    "135m": (576, 30, 9, 3, 1536),
    # Llama-3.2-1B's body (2,048 wide, 16 layers, GQA 32/8, 8,192 feed-forward).
    "1b": (2048, 16, 32, 8, 8192),
}
TOKENIZER_PREFIXES = ("tokenizer.",)


def copy_tokenizer(source: str, target: str) -> None:
    writer = gguf.GGUFWriter(target, arch="llama")
    copy_into(writer, gguf.GGUFReader(source))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def q4_0_random(rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_0 blocks: an f16 scale of 0.01 and random 4-bit values, 18 bytes per 32."""
    blocks = rows * columns // 32
    data = np.empty((blocks, 18), dtype=np.uint8)
    data[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    data[:, 2:] = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
    return data.reshape(rows, columns // 32 * 18)


def make_model(shape: str, tokenizer: str, target: str) -> None:
    embedding, layers, heads, kv_heads, feed_forward = SHAPES[shape]
    head_dim = embedding // heads
    source = gguf.GGUFReader(tokenizer)
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    writer = gguf.GGUFWriter(target, arch="llama")
    writer.add_name(f"random-{shape}")
    writer.add_context_length(8192)
    writer.add_embedding_length(embedding)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_vocab_size(vocab)
    copy_into(writer, source)
    rng = np.random.default_rng(0)
    q4 = gguf.GGMLQuantizationType.Q4_0

    def matrix(name: str, rows: int, columns: int) -> None:
        writer.add_tensor(name, q4_0_random(rows, columns, rng), raw_dtype=q4)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(embedding, dtype=np.float32))

    matrix("token_embd.weight", vocab, embedding)
    norm("output_norm.weight")
    matrix("output.weight", vocab, embedding)
    for layer in range(layers):
        prefix = f"blk.{layer}"
        norm(f"{prefix}.attn_norm.weight")
        matrix(f"{prefix}.attn_q.weight", heads * head_dim, embedding)
        matrix(f"{prefix}.attn_k.weight", kv_heads * head_dim, embedding)
        matrix(f"{prefix}.attn_v.weight", kv_heads * head_dim, embedding)
        matrix(f"{prefix}.attn_output.weight", embedding, heads * head_dim)
        norm(f"{prefix}.ffn_norm.weight")
        matrix(f"{prefix}.ffn_gate.weight", feed_forward, embedding)
        matrix(f"{prefix}.ffn_up.weight", feed_forward, embedding)
        matrix(f"{prefix}.ffn_down.weight", embedding, feed_forward)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parameters = vocab * embedding * 2 + layers * (
        embedding * (heads + 2 * kv_heads) * head_dim + embedding * heads * head_dim + 3 * embedding * feed_forward
    )
    print(f"{target}: {shape}, {parameters / 1e6:.0f}M parameters, vocab {vocab}")


def copy_into(writer: "gguf.GGUFWriter", reader: "gguf.GGUFReader") -> None:
    """Copies the tokenizer's metadata (vocabulary, merges, special tokens, chat template)."""
    for field in reader.fields.values():
        if not field.name.startswith(TOKENIZER_PREFIXES):
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            element_type = field.types[-1]
            if element_type == gguf.GGUFValueType.STRING:
                values = [bytes(field.parts[index]).decode("utf-8", "replace") for index in field.data]
            else:
                values = [field.parts[index].tolist()[0] for index in field.data]
            writer.add_array(field.name, values)
        elif value_type == gguf.GGUFValueType.STRING:
            writer.add_string(field.name, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            writer.add_key_value(field.name, field.parts[field.data[0]].tolist()[0], value_type)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tokenizer = commands.add_parser("tokenizer")
    tokenizer.add_argument("source")
    tokenizer.add_argument("target")
    model = commands.add_parser("model")
    model.add_argument("--shape", choices=sorted(SHAPES), required=True)
    model.add_argument("--tokenizer", required=True)
    model.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "tokenizer":
        copy_tokenizer(args.source, args.target)
    else:
        make_model(args.shape, args.tokenizer, args.out)


if __name__ == "__main__":
    sys.exit(main())
