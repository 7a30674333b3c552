"""The OpenAI-compatible server: the HTTP API (api), the continuous-batching engine over the decode
core (engine) and the command line (cli).
"""
