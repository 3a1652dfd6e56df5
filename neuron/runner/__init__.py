"""The runner: a scheduler plan -> flat device arrays -> one model pass -> one batched sampler."""
