"""Hugging Face interoperability: ``export`` (mixtrain -> transformers folder, with
``remote/`` the self-contained modeling code copied into remote-code exports) and
``importer`` (a transformers checkpoint -> a mixtrain model)."""
