"""SentencePiece tokenizers and chat formats of each GLM release."""
