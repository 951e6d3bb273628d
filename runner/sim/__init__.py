"""The simulator: an OpenAI-compatible server on loopback. Imports nothing else from `runner`."""
