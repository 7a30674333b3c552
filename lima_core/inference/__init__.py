"""Generation: the one decode core (decode), token choice (sampling), stop strings over streamed
text (text), the chat command (chat) and the OpenAI-compatible server (serve).
"""
