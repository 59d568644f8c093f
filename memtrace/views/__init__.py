"""Views of the model: JSON Lines, the live terminal table."""
