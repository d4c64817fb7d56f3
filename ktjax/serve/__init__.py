"""The OpenAI-compatible server: HTTP API (app), continuous batching (scheduler)."""
