"""HTTP: one attempt at a chat completion (aiohttp's only home) and the retry policy."""
