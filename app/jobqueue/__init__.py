"""Jobs: accepted generations kept in a store (SQLite + PNG files under DATA_DIR), run through the one
request path (`GenerationService.generate`), followed step by step, cancellable, called back by webhook."""
