"""Layer ops the models are written over (attention over the paged KV cache, ...)."""
