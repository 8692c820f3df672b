"""Causal language models (design section 6b), grouped: `model` (hf: folders and GGUF files, perplexity),
`text` (text into token blocks and splits), `prune` (magnitude, Wanda, SparseGPT, N:M, calibrated block by
block), `structured` (whole MLP neurons and KV groups), `perp` (PERP retraining that keeps the mask) and
`task` (the language-model task behind the pipeline's task interface, and its retraining unit)."""
