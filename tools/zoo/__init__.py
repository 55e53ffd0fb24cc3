"""optc's zoo of real trained models: ``python tools/zoo fetch|build|list`` (see __main__.py)."""
