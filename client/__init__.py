"""Clients for the served model: a library (client.llm) and a CLI (python -m client)."""
