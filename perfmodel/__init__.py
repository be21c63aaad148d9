"""ServeGym performance model: what one engine step of an LLM server costs."""
