"""The inference stage: scoring photos with an exported model (`scoring`: decode, one batched
forward, top-k, explanations), the one path that Serve, the benchmarks and batch prediction run,
and batch prediction's inputs and sharded outputs (`batch_files`)."""
