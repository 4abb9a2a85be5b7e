"""The stage kinds: the catalogue, the protocol every kind implements (stage.py), and one module per kind."""
