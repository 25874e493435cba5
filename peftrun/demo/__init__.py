"""`peftrun demo`: the tiny locally built models it trains, its data, and the MiniLM example helper."""
