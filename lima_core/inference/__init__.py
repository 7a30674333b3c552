"""Generation: the one decode core (decode), token choice (sampling), stop strings over streamed
text (text) and the OpenAI-compatible server (serve); their commands are lima_core.chat and lima_core.serve.
"""
