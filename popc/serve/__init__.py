"""``popc serve``: an OpenAI-compatible server over one export, with continuous batching."""
