"""Bulk batch job runner for OpenAI-compatible chat-completion APIs."""
