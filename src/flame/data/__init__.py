"""The data engine: sources -> tokenizer -> store (prepared) or stream -> loader."""
