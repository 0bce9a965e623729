"""Text to conditioning: the tokenizer, placeholder words, 77-token windows and the text encoders' outputs."""
