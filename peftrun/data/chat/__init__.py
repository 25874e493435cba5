"""Chat data: conversations read in the shapes datasets use (messages.py), the spans of one rendering the
model writes (turns.py: each family's turn markers), and rendering + tokenizing with those masks (encode.py).
"""
