"""The OpenAI-compatible server: the HTTP API (api), the continuous-batching engine over the decode
core (engine) and what a request may hold (schemas); the command is lima_core.serve.
"""
