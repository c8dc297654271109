"""Training plumbing: a LLaMA-style causal LM (``model``) and the embedded corpus (``data``)."""
