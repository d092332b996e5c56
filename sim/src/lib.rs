//! A vLLM-compatible model-server simulator (placeholder; see issue 3).
