"""Random-weight models for tests, benchmarks and the fallback demo: the preset shapes and a writer
of real on-disk checkpoints (Hugging Face and Mistral layouts, the real Mistral tokenizer) that the
engine then loads like any other model. Not part of the engine: nothing in workers/ imports it."""
