"""The Llama-family model: config parsing, rotary embeddings, weights layout, forward pass."""
