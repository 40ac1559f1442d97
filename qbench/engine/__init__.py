"""The engine: resolve a request, load and quantize, encode once into the feature cache, score every task,
write the result document with its evidence; the store, locks, checkpoints and the sweep runner."""
