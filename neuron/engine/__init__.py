"""The serving engine of one shard, run on its device thread: requests, the scheduler that plans each
turn, the KV block manager (paged cache + prefix cache) and the output side."""
