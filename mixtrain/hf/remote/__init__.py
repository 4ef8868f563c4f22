"""The remote code copied into Hugging Face exports (self-contained: transformers + torch).
Importable here so that mixtrain can build and save these models."""
